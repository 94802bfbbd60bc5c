"""How well a model's `[SEG]` states carry what their phrases name, measured on held-out referring rows.

The mask can only follow the sentence through the `[SEG]` state, so whether that state carries the phrase is the
first thing to check when masks ignore their sentence. This scores the model's own `seg_attribute_heads` on the
teacher-forced `[SEG]` states of rows with a `seg_attributes` column, per attribute, beside the majority-class prior
of the same labels (what a state that carries nothing of the phrase scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from ..data.seg_attributes import SEG_ATTRIBUTE_COLUMN, SEG_ATTRIBUTES, add_seg_attribute_column
from ..models.perceptio import PerceptioForConditionalGeneration, PerceptioProcessor
from ..models.perceptio.loss_perceptio import UNLABELLED_SEG_ATTRIBUTE
from .collator_perceptio import PerceptioDataCollator
from .data_mixture import rows_with_masks


@dataclass
class SegAttributeAccuracy:
    """Per attribute (`SEG_ATTRIBUTES` order): the heads' accuracy on the `[SEG]`s labelled for it and the
    majority-class prior of those labels; `num_seg` is the number of `[SEG]` states read."""

    num_seg: int
    accuracy: dict[str, float]
    majority_prior: dict[str, float]


def seg_attribute_accuracy(
    model: PerceptioForConditionalGeneration,
    processor: PerceptioProcessor,
    rows: Dataset,
    batch_size: int = 16,
) -> SegAttributeAccuracy:
    """Score `model.seg_attribute_heads` on the `[SEG]`s of `rows` (synthetic rows; those without masks are skipped).

    Raises:
        ValueError: the model has no head per attribute of `SEG_ATTRIBUTES`, or `rows` has no row with masks.
    """
    if model.seg_attribute_heads is None or len(model.seg_attribute_heads) != len(SEG_ATTRIBUTES):
        raise ValueError(
            f"The model needs one seg_attribute_head per attribute of {list(SEG_ATTRIBUTES)} (its config's "
            f"seg_attribute_classes is {model.config.seg_attribute_classes})."
        )
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    with_masks = rows_with_masks(rows)
    if not len(with_masks):
        raise ValueError("No row has masks, so there is no [SEG] to score.")
    if SEG_ATTRIBUTE_COLUMN not in with_masks.column_names:
        with_masks = add_seg_attribute_column(with_masks)
    # The `[SEG]`s come before any depth block, so their states are the same without it, and no depth codes are needed.
    with_masks = with_masks.map(lambda row: {"use_depth_block": False}, desc="No depth blocks")
    collator = PerceptioDataCollator(processor, num_depth_tokens=model.config.num_depth_tokens)
    predictions, labels = [], []
    model.eval()
    for start in range(0, len(with_masks), batch_size):
        batch = collator([with_masks[index] for index in range(start, min(start + batch_size, len(with_masks)))])
        predictions.append(_head_predictions(model, batch))
        labels.append(torch.cat(batch[SEG_ATTRIBUTE_COLUMN]))
    return _accuracy(torch.cat(predictions), torch.cat(labels))


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


def _accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> SegAttributeAccuracy:
    accuracy, prior = {}, {}
    for column, name in enumerate(SEG_ATTRIBUTES):
        labelled = labels[:, column] != UNLABELLED_SEG_ATTRIBUTE
        column_labels = labels[labelled, column]
        accuracy[name] = _rounded_mean(predictions[labelled, column] == column_labels)
        prior[name] = _rounded_mean(column_labels == column_labels.mode().values) if len(column_labels) else 0.0
    return SegAttributeAccuracy(num_seg=int(labels.shape[0]), accuracy=accuracy, majority_prior=prior)


def _rounded_mean(hits: torch.Tensor) -> float:
    return round(float(hits.float().mean()), 4) if len(hits) else 0.0


__all__ = ["SegAttributeAccuracy", "seg_attribute_accuracy"]
