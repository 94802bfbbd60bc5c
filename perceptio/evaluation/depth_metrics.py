"""Dense depth metrics: AbsRel, RMSE, delta < 1.25 and relative-depth pair-order accuracy.

Every function takes a prediction and a target of the same shape, (H, W) or (B, H, W), as numpy arrays or torch
tensors, and an optional boolean `valid` mask of that shape. Metrics are computed in whatever domain the caller
passes; AbsRel and delta are ratios and so need strictly positive values (they raise ValueError otherwise).

Domains used across Perceptio: the depth tokenizer works in normalised relative inverse depth in [-1, 1]
(larger = nearer). Its evaluation computes RMSE and pair-order accuracy directly in that space and AbsRel / delta
after `normalized_to_positive`, which shifts [-1, 1] to [1, 2]; the shift keeps every value positive and bounded
away from zero, so one far pixel cannot make the ratio explode. `normalised_inverse_depth` brings a ground-truth map
into that space at its own size.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.perceptio.modeling_perceptio_depth_tokenizer import min_max_normalize


ArrayLike = np.ndarray | torch.Tensor


def normalised_inverse_depth(inverse_depth: ArrayLike) -> np.ndarray:
    """Min-max normalise a relative inverse depth map to [-1, 1] at its own size (in float64) with the depth
    tokenizer's own `min_max_normalize`: a map constant up to float rounding becomes 0."""
    inverse_depth = torch.as_tensor(np.asarray(inverse_depth, dtype=np.float64))
    return min_max_normalize(inverse_depth)[0].numpy()


def normalized_to_positive(normalized: ArrayLike, offset: float = 1.0) -> torch.Tensor:
    """Map normalised maps in [-1, 1] to [offset, offset + 1], the positive domain AbsRel and delta are read in."""
    if offset <= 0:
        raise ValueError(f"offset must be > 0 so every value is positive, got {offset!r}.")
    return (_as_float_tensor(normalized, "normalized") + 1) / 2 + offset


def abs_rel(pred: ArrayLike, target: ArrayLike, valid: ArrayLike | None = None) -> float:
    """Mean absolute relative error mean(|pred - target| / target) over valid pixels; both maps must be > 0."""
    pred, target = _selected_values(pred, target, valid)
    _require_positive(pred, target, "abs_rel")
    return float(((pred - target).abs() / target).mean())


def rmse(pred: ArrayLike, target: ArrayLike, valid: ArrayLike | None = None) -> float:
    """Root mean squared error over valid pixels (any domain)."""
    pred, target = _selected_values(pred, target, valid)
    return float((pred - target).pow(2).mean().sqrt())


def delta1(pred: ArrayLike, target: ArrayLike, threshold: float = 1.25, valid: ArrayLike | None = None) -> float:
    """Fraction of valid pixels with max(pred / target, target / pred) < threshold; both maps must be > 0."""
    if threshold <= 1:
        raise ValueError(f"threshold must be > 1, got {threshold!r}.")
    pred, target = _selected_values(pred, target, valid)
    _require_positive(pred, target, "delta1")
    ratio = torch.maximum(pred / target, target / pred)
    return float((ratio < threshold).float().mean())


def pair_order_counts(
    pred: ArrayLike,
    target: ArrayLike,
    num_pairs: int = 10_000,
    margin: float = 0.05,
    seed: int = 0,
    larger_is_nearer: bool = True,
    valid: ArrayLike | None = None,
) -> tuple[int, int]:
    """(correct, counted) pairs of `pair_order_accuracy`, so several batches can be pooled exactly."""
    if not isinstance(num_pairs, int) or num_pairs <= 0:
        raise ValueError(f"num_pairs must be a positive integer, got {num_pairs!r}.")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}.")
    pred, target, valid = _batched(pred, target, valid)
    generator = torch.Generator().manual_seed(seed)
    correct = counted = 0
    for image_pred, image_target, image_valid in zip(pred, target, valid):
        pixels = image_valid.flatten().nonzero().flatten()
        if pixels.numel() < 2:
            continue
        # Draw more candidates than needed: pairs closer than the margin are discarded.
        candidates = torch.randint(pixels.numel(), (2, 4 * num_pairs), generator=generator)
        first, second = pixels[candidates[0]], pixels[candidates[1]]
        true_difference = image_target.flatten()[first] - image_target.flatten()[second]
        kept = true_difference.abs() > margin
        first, second, true_difference = (
            first[kept][:num_pairs],
            second[kept][:num_pairs],
            true_difference[kept][:num_pairs],
        )
        predicted_difference = image_pred.flatten()[first] - image_pred.flatten()[second]
        if not larger_is_nearer:
            predicted_difference = -predicted_difference
        correct += int((torch.sign(predicted_difference) == torch.sign(true_difference)).sum())
        counted += int(true_difference.numel())
    return correct, counted


def pair_order_accuracy(
    pred: ArrayLike,
    target: ArrayLike,
    num_pairs: int = 10_000,
    margin: float = 0.05,
    seed: int = 0,
    larger_is_nearer: bool = True,
    valid: ArrayLike | None = None,
) -> float:
    """Fraction of random point pairs whose nearer point the prediction gets right (the relative-depth question
    HardBLINK asks).

    Per image, up to `num_pairs` pairs of valid pixels are drawn (reproducibly from `seed`) among those whose target
    values differ by more than `margin` (in target units); a pair is right when the prediction orders it the same
    way (a predicted tie is wrong). `target` is relative inverse depth (larger = nearer); `larger_is_nearer` states
    the prediction's convention, so set it to False for a metric-depth prediction. Raises ValueError when no pair
    differs by more than the margin.
    """
    correct, counted = pair_order_counts(pred, target, num_pairs, margin, seed, larger_is_nearer, valid)
    if counted == 0:
        raise ValueError(f"no pair of valid pixels has target values differing by more than margin={margin}.")
    return correct / counted


def _as_float_tensor(values: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    if not torch.is_tensor(values):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(values).__name__}.")
    values = values.detach().cpu().double()
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return values


def _batched(
    pred: ArrayLike, target: ArrayLike, valid: ArrayLike | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated (B, H, W) prediction, target and boolean valid mask."""
    pred, target = _as_float_tensor(pred, "pred"), _as_float_tensor(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}."
        )
    if pred.dim() not in (2, 3):
        raise ValueError(f"depth maps must be (H, W) or (B, H, W), got shape {tuple(pred.shape)}.")
    if valid is None:
        valid = torch.ones_like(pred, dtype=torch.bool)
    else:
        valid = torch.from_numpy(valid) if isinstance(valid, np.ndarray) else valid
        if not torch.is_tensor(valid) or valid.shape != pred.shape:
            raise ValueError(
                f"valid must be a mask of shape {tuple(pred.shape)}, got {getattr(valid, 'shape', valid)!r}."
            )
        valid = valid.detach().cpu().bool()
    if pred.dim() == 2:
        pred, target, valid = pred.unsqueeze(0), target.unsqueeze(0), valid.unsqueeze(0)
    return pred, target, valid


def _selected_values(pred: ArrayLike, target: ArrayLike, valid: ArrayLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target, valid = _batched(pred, target, valid)
    if not valid.any():
        raise ValueError("valid selects no pixel.")
    return pred[valid], target[valid]


def _require_positive(pred: torch.Tensor, target: torch.Tensor, metric: str) -> None:
    if (pred <= 0).any() or (target <= 0).any():
        raise ValueError(
            f"{metric} needs strictly positive maps; map normalised depth with normalized_to_positive first."
        )


__all__ = [
    "abs_rel",
    "delta1",
    "normalised_inverse_depth",
    "normalized_to_positive",
    "pair_order_accuracy",
    "pair_order_counts",
    "rmse",
]
