"""Referring-segmentation metrics: per-sample intersection/union counts, cIoU and gIoU.

Masks are scored at the ground truth's (the original image's) size: a prediction of another size is resized to it
with nearest-neighbour sampling before counting. Both masks are binarised first, a pixel being foreground when its
value is greater than zero. That one rule covers boolean masks, 0/1 masks, masks rasterised by summing overlapping
polygons (where two polygons overlap the pixel holds 2 and still counts once) and mask logits (logit > 0 is
probability > 0.5).

Benchmarks report two numbers (LISA, Sa2VA and the Perceptio paper use these definitions):

- cIoU (cumulative IoU): total intersection over total union across the split, so large objects weigh more;
- gIoU (generalised IoU): the mean of the per-sample IoUs, where a sample whose prediction and target are both empty
  scores 1 (a correct "nothing there").

Large splits never need every mask in memory: compute `mask_intersection_union` per sample and feed the counts to a
`ReferringSegmentationScore`, which keeps only running sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch


ArrayLike = np.ndarray | torch.Tensor | Sequence

# The IoU of a sample whose prediction and target are both empty: predicting "no object" there is right.
EMPTY_SAMPLE_IOU = 1.0


def _as_binary_mask(mask: ArrayLike, name: str) -> np.ndarray:
    """Return `mask` as a 2-D boolean array (foreground = value > 0), or raise ValueError saying why it cannot be."""
    if isinstance(mask, torch.Tensor):
        array = mask.detach().cpu().numpy()
    else:
        try:
            array = np.asarray(mask)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{name} must be a 2-D array (height, width); could not read it as an array: {error}"
            ) from error
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (height, width); got shape {tuple(array.shape)}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must have a non-zero height and width; got shape {tuple(array.shape)}.")
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must hold booleans or numbers; got dtype {array.dtype}.")
    if np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
        raise ValueError(f"{name} contains NaN; masks must hold booleans or numbers (foreground = value > 0).")
    return array > 0


def nearest_source_indices(source_length: int, target_length: int) -> np.ndarray:
    """For each output pixel along one axis, the input pixel whose centre is nearest its centre.

    Output pixel i reads input pixel floor((i + 0.5) * source_length / target_length), computed in exact integer
    arithmetic. It is the rule of torch's "nearest-exact" mode, which computes it in floating point and can land one
    pixel off where the product is exactly an integer; the exact form makes scores reproducible across libraries.
    """
    if source_length <= 0 or target_length <= 0:
        raise ValueError(f"lengths must be positive; got source {source_length} and target {target_length}.")
    return (2 * np.arange(target_length, dtype=np.int64) + 1) * source_length // (2 * target_length)


def resize_mask_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D mask to `size` = (height, width) with nearest-neighbour sampling of pixel centres.

    Upscaling by an integer factor repeats each pixel exactly; see `nearest_source_indices` for the rule.
    """
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be two positive integers (height, width); got {size}.")
    rows = nearest_source_indices(mask.shape[0], height)
    cols = nearest_source_indices(mask.shape[1], width)
    return mask[rows[:, None], cols[None, :]]


def mask_intersection_union(pred: ArrayLike, target: ArrayLike) -> tuple[int, int]:
    """Count the intersection and union pixels of a predicted and a ground-truth mask.

    Args:
        pred: predicted mask (height, width): booleans or numbers, foreground = value > 0. Resized with
            nearest-neighbour sampling to the target's size when the sizes differ.
        target: ground-truth mask (height, width) at the original image size, same binarisation.

    Returns:
        `(intersection, union)` as Python ints, counted at the target's size.
    """
    target_mask = _as_binary_mask(target, "target")
    pred_mask = _as_binary_mask(pred, "pred")
    if pred_mask.shape != target_mask.shape:
        pred_mask = resize_mask_nearest(pred_mask, target_mask.shape)
    intersection = int(np.count_nonzero(pred_mask & target_mask))
    union = int(np.count_nonzero(pred_mask | target_mask))
    return intersection, union


def _validated_counts(intersection: Real, union: Real, index: int | None = None) -> tuple[float, float]:
    """Check one sample's counts: finite, non-negative, intersection <= union."""
    where = "" if index is None else f" at sample {index}"
    if isinstance(intersection, torch.Tensor) and intersection.numel() == 1:
        intersection = intersection.item()
    if isinstance(union, torch.Tensor) and union.numel() == 1:
        union = union.item()
    for name, value in (("intersection", intersection), ("union", union)):
        if isinstance(value, bool | np.bool_) or not isinstance(value, Real):
            raise ValueError(f"{name}{where} must be a non-negative number; got {value!r}.")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}{where} must be a finite non-negative number; got {value!r}.")
    if intersection > union:
        raise ValueError(
            f"intersection{where} ({intersection}) is larger than the union ({union}); an intersection is never "
            "larger than its union — were the two arguments swapped?"
        )
    return float(intersection), float(union)


def sample_iou(intersection: Real, union: Real) -> float:
    """IoU of one sample from its counts; an empty prediction on an empty target (union 0) scores 1."""
    intersection, union = _validated_counts(intersection, union)
    return EMPTY_SAMPLE_IOU if union == 0 else intersection / union


def _validated_count_lists(intersections: Sequence[Real], unions: Sequence[Real]) -> list[tuple[float, float]]:
    """Check two per-sample count lists have the same, non-zero length and valid entries."""
    intersections, unions = list(intersections), list(unions)
    if len(intersections) != len(unions):
        raise ValueError(
            f"intersections and unions must have one entry per sample; got {len(intersections)} and {len(unions)}."
        )
    if not intersections:
        raise ValueError("intersections and unions are empty; at least one sample is needed to score.")
    return [_validated_counts(i, u, index) for index, (i, u) in enumerate(zip(intersections, unions))]


def ciou(intersections: Sequence[Real], unions: Sequence[Real]) -> float:
    """Cumulative IoU: the split's total intersection over its total union.

    When every sample has an empty prediction and an empty target (total union 0) the score is 1, as for gIoU.
    """
    counts = _validated_count_lists(intersections, unions)
    total_intersection = sum(intersection for intersection, _ in counts)
    total_union = sum(union for _, union in counts)
    return EMPTY_SAMPLE_IOU if total_union == 0 else total_intersection / total_union


def giou(intersections: Sequence[Real], unions: Sequence[Real]) -> float:
    """Generalised IoU: the mean over samples of each sample's IoU (empty prediction on empty target = 1)."""
    counts = _validated_count_lists(intersections, unions)
    return sum(sample_iou(intersection, union) for intersection, union in counts) / len(counts)


class ReferringSegmentationScore:
    """Running cIoU / gIoU over a split, fed one sample at a time.

    Only four running sums are kept, so a split of any size is scored without holding its masks.

    Example:
        >>> score = ReferringSegmentationScore()
        >>> score.add_masks([[1, 1], [0, 0]], [[1, 0], [0, 0]])
        >>> score.add_counts(intersection=0, union=0)
        >>> score.compute()
        {'ciou': 0.5, 'giou': 0.75, 'num_samples': 2}
    """

    def __init__(self) -> None:
        self.total_intersection = 0.0
        self.total_union = 0.0
        self.sum_of_ious = 0.0
        self.num_samples = 0

    def add_counts(self, intersection: Real, union: Real) -> None:
        """Add one sample from its intersection and union pixel counts."""
        intersection, union = _validated_counts(intersection, union)
        self.total_intersection += intersection
        self.total_union += union
        self.sum_of_ious += sample_iou(intersection, union)
        self.num_samples += 1

    def add_masks(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one sample from its predicted and ground-truth masks (see `mask_intersection_union`)."""
        self.add_counts(*mask_intersection_union(pred, target))

    def _require_samples(self) -> None:
        if self.num_samples == 0:
            raise ValueError("No samples were added; call add_counts or add_masks before reading a score.")

    @property
    def ciou(self) -> float:
        """Total intersection over total union of the samples added so far."""
        self._require_samples()
        return EMPTY_SAMPLE_IOU if self.total_union == 0 else self.total_intersection / self.total_union

    @property
    def giou(self) -> float:
        """Mean per-sample IoU of the samples added so far."""
        self._require_samples()
        return self.sum_of_ious / self.num_samples

    def compute(self) -> dict[str, float | int]:
        """The scores as a dict: `ciou`, `giou` (fractions in [0, 1]) and `num_samples`."""
        return {"ciou": self.ciou, "giou": self.giou, "num_samples": self.num_samples}
