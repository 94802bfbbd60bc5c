"""The component pretraining stages' optimisation loop: steps, log and learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from perceptio.trainers.pretraining_loop import LEARNING_RATE_SCHEDULES, run_pretraining_steps


def descend(schedule: str, steps: int) -> tuple[float, list[dict[str, float]]]:
    """Where one weight ends after `steps` SGD steps of rate 1 on a loss of gradient 1, and the loop's log."""
    weight = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    log = run_pretraining_steps(lambda: weight * 1.0, optimizer, steps, 4, "test", schedule)
    return weight.item(), log


def test_constant_steps_at_the_peak_rate_and_cosine_decays_it_to_zero():
    constant, log = descend("constant", 10)
    assert constant == pytest.approx(-10.0)
    assert [entry["step"] for entry in log] == [4, 8, 10]
    cosine, _ = descend("cosine", 10)
    expected = sum(0.5 * (1 + math.cos(math.pi * step / 10)) for step in range(10))
    assert cosine == pytest.approx(-expected) and -cosine < 0.6 * 10


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule must be one of"):
        descend("linear", 2)
    assert LEARNING_RATE_SCHEDULES == ("constant", "cosine")
