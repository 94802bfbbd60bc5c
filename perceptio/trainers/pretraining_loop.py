"""The optimisation loop of the recipe's component stages (the vision tower, SAM2, the mask decoder).

These stages train one component with their own objectives, outside `PerceptioTrainer`, whose batches are
language-model samples. They share this loop: a step draws its batch and returns its loss, and the loop steps the
optimiser, logs and shows progress.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from tqdm.auto import tqdm


# How each parameter group's learning rate follows the steps: held at its peak, or decayed to zero along a half cosine.
LEARNING_RATE_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def validate_schedule(schedule: str, name: str = "schedule") -> None:
    """Refuse a `schedule` (the setting called `name`) that is not one of `LEARNING_RATE_SCHEDULES`."""
    if schedule not in LEARNING_RATE_SCHEDULES:
        raise ValueError(f"{name} must be one of {LEARNING_RATE_SCHEDULES}, got {schedule!r}.")


def learning_rate_factor(schedule: str, step: int, steps: int, warmup_steps: int = 0) -> float:
    """The share of its peak rate each parameter group trains with at `step` (0-based) of `steps`: rising linearly
    over the first `warmup_steps`, then as `schedule` says over the rest (as `transformers`' schedules do)."""
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))


# A step draws its batch and returns its loss, or named losses whose "loss" entry is the one optimised.
StepLoss = Callable[[], torch.Tensor | Mapping[str, torch.Tensor]]


def run_pretraining_steps(
    step_loss: StepLoss,
    optimizer: torch.optim.Optimizer,
    steps: int,
    logging_steps: int,
    description: str,
    schedule: str = "constant",
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
) -> list[dict[str, float]]:
    """Run `steps` optimiser steps on `step_loss()` (which draws its own batch), each group's rate following
    `schedule` after `warmup_steps` of linear warmup, gradients clipped to a total norm of `max_grad_norm` when set.

    `step_loss` returns the loss, or named losses whose `"loss"` entry is the one optimised. Returns the log of the
    step's values (and learning rate) every `logging_steps` steps and at the last.
    """
    validate_schedule(schedule)
    if not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps must be between 0 and the {steps} steps, got {warmup_steps}.")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}.")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(schedule, step, steps, warmup_steps)
    )
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    log: list[dict[str, float]] = []
    progress = tqdm(range(steps), desc=description)
    for step in progress:
        losses = step_loss()
        if not isinstance(losses, Mapping):
            losses = {"loss": losses}
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        if (step + 1) % logging_steps == 0 or step + 1 == steps:
            values = {name: value.item() for name, value in losses.items()}
            log.append({"step": step + 1, **values, "learning_rate": learning_rate})
            progress.set_postfix(loss=f"{values['loss']:.3f}")
    return log
