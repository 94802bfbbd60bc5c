"""The optimisation loop of the recipe's component pretraining stages (the vision tower, SAM2).

These stages train one component on rendered scenes with their own objectives, outside `PerceptioTrainer`, whose
batches are language-model samples. They share this loop: a step draws its batch and returns its loss, and the loop
steps the optimiser, logs and shows progress.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm


# How each parameter group's learning rate follows the steps: held at its peak, or decayed to zero along a half cosine.
LEARNING_RATE_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def validate_schedule(schedule: str, name: str = "schedule") -> None:
    """Refuse a `schedule` (the setting called `name`) that is not one of `LEARNING_RATE_SCHEDULES`."""
    if schedule not in LEARNING_RATE_SCHEDULES:
        raise ValueError(f"{name} must be one of {LEARNING_RATE_SCHEDULES}, got {schedule!r}.")


def learning_rate_factor(schedule: str, step: int, steps: int) -> float:
    """The share of its peak rate each parameter group trains with at `step` (0-based) of `steps`."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / steps))


def run_pretraining_steps(
    step_loss: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    logging_steps: int,
    description: str,
    schedule: str = "constant",
) -> list[dict[str, float]]:
    """Run `steps` optimiser steps on `step_loss()` (which draws its own batch), each group's rate following
    `schedule`; returns the log of (step, loss) every `logging_steps` steps and at the last."""
    validate_schedule(schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(schedule, step, steps))
    log: list[dict[str, float]] = []
    progress = tqdm(range(steps), desc=description)
    for step in progress:
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % logging_steps == 0 or step + 1 == steps:
            log.append({"step": step + 1, "loss": loss.item()})
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return log
