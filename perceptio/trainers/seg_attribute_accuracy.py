"""How well a model's `[SEG]` states carry what their phrases name or refer to, measured on held-out referring rows.

The mask can only follow the sentence through the `[SEG]` state, so whether that state carries the phrase is the
first thing to check when masks ignore their sentence. This scores the model's own `seg_attribute_heads` on the
teacher-forced `[SEG]` states of synthetic referring rows, labelled for the heads' target, per attribute, beside the
majority-class prior of the same labels (what a state that carries nothing of the phrase scores), overall and per
kind of referring expression (a superlative's `[SEG]` must resolve depth order, a relation's the layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from ..data.seg_attributes import (
    SEG_ATTRIBUTE_COLUMN,
    add_seg_attribute_column,
    seg_attribute_names,
    seg_attribute_target_for_classes,
)
from ..models.perceptio import PerceptioForConditionalGeneration, PerceptioProcessor
from ..models.perceptio.loss_perceptio import UNLABELLED_SEG_ATTRIBUTE
from .collator_perceptio import PerceptioDataCollator
from .data_mixture import rows_with_masks


@dataclass
class SegAttributeAccuracy:
    """Per attribute (in the labels' order): the heads' accuracy on the `[SEG]`s labelled for it and the
    majority-class prior of those labels; `by_kind`, the accuracy per attribute on each kind of referring expression's
    `[SEG]`s; `num_seg` is the number of `[SEG]` states read."""

    num_seg: int
    accuracy: dict[str, float]
    majority_prior: dict[str, float]
    by_kind: dict[str, dict[str, float]]


def seg_attribute_accuracy(
    model: PerceptioForConditionalGeneration,
    processor: PerceptioProcessor,
    rows: Dataset,
    batch_size: int = 16,
) -> SegAttributeAccuracy:
    """Score `model.seg_attribute_heads` on the `[SEG]`s of `rows` (synthetic rows; those without masks are skipped)
    against the labels its heads are sized for (named or referred attributes, see `seg_attributes`).

    Raises:
        ValueError: the model has no attribute heads, or heads sized for no target, or `rows` has no row with masks.
    """
    if model.seg_attribute_heads is None:
        raise ValueError("The model has no seg_attribute_heads (its config's seg_attribute_classes is None).")
    target = seg_attribute_target_for_classes(model.config.seg_attribute_classes)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    with_masks = rows_with_masks(rows)
    if not len(with_masks):
        raise ValueError("No row has masks, so there is no [SEG] to score.")
    # Labelled afresh, so the labels are always those of the heads' target.
    if SEG_ATTRIBUTE_COLUMN in with_masks.column_names:
        with_masks = with_masks.remove_columns(SEG_ATTRIBUTE_COLUMN)
    with_masks = add_seg_attribute_column(with_masks, target)
    # The `[SEG]`s come before any depth block, so their states are the same without it, and no depth codes are needed.
    with_masks = with_masks.map(lambda row: {"use_depth_block": False}, desc="No depth blocks")
    collator = PerceptioDataCollator(processor, num_depth_tokens=model.config.num_depth_tokens)
    predictions, labels, kinds = [], [], []
    model.eval()
    for start in range(0, len(with_masks), batch_size):
        rows_of_batch = [with_masks[index] for index in range(start, min(start + batch_size, len(with_masks)))]
        batch = collator(rows_of_batch)
        predictions.append(_head_predictions(model, batch))
        labels.append(torch.cat(batch[SEG_ATTRIBUTE_COLUMN]))
        kinds += [json.loads(row["meta"]).get("kind") for row in rows_of_batch for _ in row["masks"]]
    return _accuracy(torch.cat(predictions), torch.cat(labels), seg_attribute_names(target), kinds)


@torch.no_grad()
def _head_predictions(model: PerceptioForConditionalGeneration, batch: dict[str, Any]) -> torch.Tensor:
    device = model.device
    outputs = model.model(
        input_ids=batch["input_ids"].to(device),
        pixel_values=batch["pixel_values"].to(device, model.dtype) if "pixel_values" in batch else None,
        attention_mask=batch["attention_mask"].to(device),
    )
    states = outputs.last_hidden_state[batch["input_ids"].to(device) == model.config.seg_token_id]
    return torch.stack([head(states).argmax(-1) for head in model.seg_attribute_heads], dim=-1).cpu()


def _accuracy(
    predictions: torch.Tensor, labels: torch.Tensor, names: list[str], kinds: list[str | None]
) -> SegAttributeAccuracy:
    labelled = labels != UNLABELLED_SEG_ATTRIBUTE
    hits = predictions == labels
    accuracy, prior = {}, {}
    for column, name in enumerate(names):
        column_labels = labels[labelled[:, column], column]
        accuracy[name] = _rounded_mean(hits[labelled[:, column], column])
        prior[name] = _rounded_mean(column_labels == column_labels.mode().values) if len(column_labels) else 0.0
    by_kind = {}
    for kind in sorted({kind for kind in kinds if kind is not None}):
        of_kind = torch.tensor([seg_kind == kind for seg_kind in kinds])
        by_kind[kind] = {
            name: _rounded_mean(hits[of_kind & labelled[:, column], column]) for column, name in enumerate(names)
        }
    return SegAttributeAccuracy(num_seg=int(labels.shape[0]), accuracy=accuracy, majority_prior=prior, by_kind=by_kind)


def _rounded_mean(hits: torch.Tensor) -> float:
    return round(float(hits.float().mean()), 4) if len(hits) else 0.0


__all__ = ["SegAttributeAccuracy", "seg_attribute_accuracy"]
