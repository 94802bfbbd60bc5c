"""The optimisation loop of the recipe's component pretraining stages (the vision tower, SAM2).

These stages train one component on rendered scenes with their own objectives, outside `PerceptioTrainer`, whose
batches are language-model samples. They share this loop: a step draws its batch and returns its loss, and the loop
steps the optimiser, logs and shows progress.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm


def run_pretraining_steps(
    step_loss: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    logging_steps: int,
    description: str,
) -> list[dict[str, float]]:
    """Run `steps` optimiser steps on `step_loss()` (which draws its own batch); returns the log of (step, loss)
    every `logging_steps` steps and at the last."""
    log: list[dict[str, float]] = []
    progress = tqdm(range(steps), desc=description)
    for step in progress:
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % logging_steps == 0 or step + 1 == steps:
            log.append({"step": step + 1, "loss": loss.item()})
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return log
