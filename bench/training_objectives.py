"""The two training objectives the benchmarks compare, on the same forward pass: the full Perceptio objective, and LM
+ mask alone (no depth term is computed, not just weighted 0). Kept apart from `training_step.py` so that
`gpu_report.py` needs neither its collator nor the `datasets` package it pulls in."""

from __future__ import annotations

import torch


def full_objective(model, batch) -> torch.Tensor:
    """`model(**batch).loss`: loss_lm + loss_mask + loss_mask_iou + the depth-token terms, as trained."""
    return model(**batch).loss


def lm_and_mask_objective(model, batch) -> torch.Tensor:
    """The same call without `labels` (so the model computes the mask terms from `gt_masks` but no depth term), and
    `loss_lm` from the returned logits by the model's own `loss_function`."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    outputs = model(**inputs)
    loss_lm = model.loss_function(
        logits=outputs.logits, labels=batch["labels"], vocab_size=model.config.text_config.vocab_size
    )
    config = model.config
    return loss_lm + config.mask_loss_weight * outputs.loss_mask + config.mask_iou_loss_weight * outputs.loss_mask_iou
