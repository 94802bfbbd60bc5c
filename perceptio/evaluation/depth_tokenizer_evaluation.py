"""Evaluate a depth tokenizer on held-out maps: how much of each map survives decode(encode(d)).

RMSE and pair-order accuracy are computed in the tokenizer's normalised space ([-1, 1] relative inverse depth,
larger = nearer; the pair margin is in those units); AbsRel and delta < 1.25 after `normalized_to_positive`, which
shifts that space to [1, 2] (see `perceptio.evaluation.depth_metrics`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from perceptio.evaluation.depth_metrics import normalized_to_positive, pair_order_counts
from perceptio.models.perceptio.modeling_perceptio_depth_tokenizer import PerceptioDepthTokenizer


@dataclass
class DepthTokenizerEvaluation:
    """Reconstruction quality and codebook use of a depth tokenizer on a set of maps."""

    abs_rel: float
    rmse: float
    delta1: float
    pair_order_accuracy: float
    codebook_usage: float
    perplexity: float
    num_maps: int
    num_pairs: int

    def to_dict(self) -> dict[str, float | int]:
        """The figures as a JSON-ready dict."""
        return asdict(self)

    def to_table(self) -> str:
        """A two-column text table of every figure."""
        rows = [
            ("AbsRel (shifted [1, 2] domain)", f"{self.abs_rel:.4f}"),
            ("RMSE (normalised [-1, 1])", f"{self.rmse:.4f}"),
            ("delta < 1.25", f"{self.delta1:.4f}"),
            ("pair-order accuracy", f"{self.pair_order_accuracy:.2%}"),
            ("codebook usage", f"{self.codebook_usage:.2%}"),
            ("codebook perplexity", f"{self.perplexity:.2f}"),
            ("maps", str(self.num_maps)),
            ("pairs", str(self.num_pairs)),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)

    def save(self, path: str | os.PathLike) -> None:
        """Write the figures as JSON."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@torch.no_grad()
def evaluate_depth_tokenizer(
    tokenizer: PerceptioDepthTokenizer,
    depth_maps: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
    batch_size: int = 16,
    num_pairs: int = 1000,
    margin: float = 0.05,
    seed: int = 0,
    show_progress: bool = True,
) -> DepthTokenizerEvaluation:
    """Compare decode(encode(d)) with the normalised d for every relative inverse depth map d.

    `depth_maps` is an (M, H, W) array/tensor or an iterable of (H, W) maps; `num_pairs` point pairs per map whose
    normalised depths differ by more than `margin` are scored for pair-order accuracy.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    maps = [torch.as_tensor(np.asarray(depth), dtype=torch.float32) for depth in depth_maps]
    if not maps:
        raise ValueError("depth_maps is empty: give at least one map.")
    totals = {"absolute_relative": 0.0, "squared": 0.0, "delta": 0.0, "pixels": 0, "correct": 0, "pairs": 0}
    all_codes = []
    for start in tqdm(range(0, len(maps), batch_size), desc="Evaluating depth tokenizer", disable=not show_progress):
        batch = maps[start : start + batch_size]
        if len({tuple(depth.shape) for depth in batch}) > 1:
            batch = [tokenizer.normalize(depth.unsqueeze(0))[0][0] for depth in batch]
        target, _ = tokenizer.normalize(torch.stack(batch))
        codes = tokenizer.encode(target)
        reconstruction = tokenizer.decode(codes)
        _accumulate(totals, reconstruction.cpu(), target.cpu(), num_pairs, margin, seed + start)
        all_codes.append(codes.cpu())
    statistics = tokenizer.codebook_statistics(torch.cat(all_codes))
    if totals["pairs"] == 0:
        raise ValueError(f"no map has two points whose depths differ by more than margin={margin}.")
    return DepthTokenizerEvaluation(
        abs_rel=totals["absolute_relative"] / totals["pixels"],
        rmse=(totals["squared"] / totals["pixels"]) ** 0.5,
        delta1=totals["delta"] / totals["pixels"],
        pair_order_accuracy=totals["correct"] / totals["pairs"],
        codebook_usage=statistics.usage_fraction,
        perplexity=statistics.perplexity,
        num_maps=len(maps),
        num_pairs=totals["pairs"],
    )


def _accumulate(
    totals: dict, reconstruction: torch.Tensor, target: torch.Tensor, num_pairs: int, margin: float, seed: int
) -> None:
    """Add one batch's pixel sums and pair counts, so the set's figures are exact pooled means."""
    predicted_positive, target_positive = normalized_to_positive(reconstruction), normalized_to_positive(target)
    ratio = torch.maximum(predicted_positive / target_positive, target_positive / predicted_positive)
    totals["absolute_relative"] += float(((predicted_positive - target_positive).abs() / target_positive).sum())
    totals["squared"] += float((reconstruction.double() - target.double()).pow(2).sum())
    totals["delta"] += int((ratio < 1.25).sum())
    totals["pixels"] += target.numel()
    correct, counted = pair_order_counts(reconstruction, target, num_pairs=num_pairs, margin=margin, seed=seed)
    totals["correct"] += correct
    totals["pairs"] += counted


__all__ = ["DepthTokenizerEvaluation", "evaluate_depth_tokenizer"]
