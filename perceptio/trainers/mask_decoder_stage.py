"""The mask-decoder stage: `text_hidden_fcs` and SAM2's mask decoder learn to read the `[SEG]` states a trained
language model writes.

Everything the `[SEG]` states come from (the vision tower, the projector, the language model) is frozen in this
stage, so each referring row's states are computed once, in batches as training feeds them, and the stage trains on
them: the vision tower and the language model run once per row instead of once per row and pass (about eleven passes
in the `synthetic-tiny` recipe). The gradients are those of the full forward, where only the mask terms reach the
trained weights, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ..models.perceptio import PerceptioForConditionalGeneration
from ..models.perceptio.loss_perceptio import LOSS_TERMS, weighted_loss_sum
from .collator_perceptio import PerceptioDataCollator
from .pretraining_loop import run_pretraining_steps


@dataclass
class SegStateRows:
    """What the stage trains on, per referring row: its `[SEG]` states (num_seg, hidden), its SAM2 image (3, S, S)
    and its ground-truth masks (num_seg, H, W), one per `[SEG]` in order."""

    seg_states: list[torch.Tensor]
    sam_pixel_values: list[torch.Tensor]
    gt_masks: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.seg_states)


@dataclass
class MaskDecoderStageSettings:
    """How the stage trains: AdamW at `learning_rate` (no weight decay) with linear warmup over `warmup_steps`, then
    a cosine decay, gradients clipped to a total norm of `max_grad_norm`, `batch_size` rows a step."""

    steps: int
    learning_rate: float
    batch_size: int
    warmup_steps: int
    logging_steps: int
    seed: int
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "logging_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not self.learning_rate > 0 or not self.max_grad_norm > 0:
            raise ValueError(
                f"learning_rate and max_grad_norm must be positive, got {self.learning_rate} and {self.max_grad_norm}."
            )


def collect_seg_states(
    model: PerceptioForConditionalGeneration, collator: PerceptioDataCollator, rows: Dataset, batch_size: int
) -> SegStateRows:
    """Each row's `[SEG]` states from `model` (teacher-forced, as in training), with its SAM2 image and masks.

    The rows run in consecutive batches of `batch_size`, padded as training pads them; a row without a `[SEG]` is
    refused, since it gives the stage nothing to train on.
    """
    seg_token_id = model.config.seg_token_id
    if seg_token_id is None:
        raise ValueError("The model has no [SEG] token (config.seg_token_id is None): there is no mask to train.")
    collected = SegStateRows(seg_states=[], sam_pixel_values=[], gt_masks=[])
    device = model.device
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), desc="[SEG] states"):
            indices = range(start, min(start + batch_size, len(rows)))
            batch = collator([rows[index] for index in indices])
            if "pixel_values" not in batch:
                raise ValueError(f"Rows {start} to {indices[-1]} have no image; a [SEG] segments an image.")
            input_ids = batch["input_ids"].to(device)
            hidden = model.model(
                input_ids=input_ids,
                pixel_values=batch["pixel_values"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).last_hidden_state
            seg_positions = input_ids == seg_token_id
            for row in range(hidden.shape[0]):
                states = hidden[row][seg_positions[row]]
                if states.shape[0] == 0:
                    raise ValueError(
                        f"Row {start + row} has no [SEG] token; the mask-decoder stage needs one per mask."
                    )
                collected.seg_states.append(states.clone())
                collected.sam_pixel_values.append(batch["sam_pixel_values"][row])
                collected.gt_masks.append(batch["gt_masks"][row])
    return collected


def batch_indices(num_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Batches of row indices without end: each pass over the rows in a new random order, the last batch of a pass
    as short as the rows leave it (as a shuffling `DataLoader` draws them)."""
    while True:
        order = torch.randperm(num_rows, generator=generator).tolist()
        for start in range(0, num_rows, batch_size):
            yield order[start : start + batch_size]


def train_mask_decoder_on_seg_states(
    model: PerceptioForConditionalGeneration, data: SegStateRows, settings: MaskDecoderStageSettings
) -> list[dict[str, float]]:
    """Train the model's weights that require gradients (the stage leaves `text_hidden_fcs` and the mask decoder) on
    `data` with the model's weighted mask terms (`loss_mask`, `loss_mask_iou`); returns the stage's log."""
    if not len(data):
        raise ValueError("The mask-decoder stage got no rows to train on.")
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not trainable:
        raise ValueError("No weight of the model requires gradients: the mask-decoder stage would train nothing.")
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    batches = batch_indices(len(data), settings.batch_size, torch.Generator().manual_seed(settings.seed))
    device = model.device
    unsupervised = dict.fromkeys(LOSS_TERMS, torch.zeros((), device=device))

    def step_loss() -> dict[str, torch.Tensor]:
        indices = next(batches)
        states = [data.seg_states[index].to(device) for index in indices]
        sam_pixel_values = torch.stack([data.sam_pixel_values[index] for index in indices]).to(device)
        masks = model.predict_masks(states, sam_pixel_values)
        terms = model.predicted_mask_losses(masks, [data.gt_masks[index] for index in indices])
        return {"loss": weighted_loss_sum({**unsupervised, **terms}, model.config), **terms}

    model.train()
    return run_pretraining_steps(
        step_loss,
        optimizer,
        settings.steps,
        settings.logging_steps,
        "Training the mask decoder",
        schedule="cosine",
        warmup_steps=settings.warmup_steps,
        max_grad_norm=settings.max_grad_norm,
    )


__all__ = [
    "MaskDecoderStageSettings",
    "SegStateRows",
    "batch_indices",
    "collect_seg_states",
    "train_mask_decoder_on_seg_states",
]
