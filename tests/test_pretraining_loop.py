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


def test_warmup_rises_linearly_then_the_cosine_decays_over_the_remaining_steps():
    weight = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    log = run_pretraining_steps(lambda: weight * 1.0, optimizer, 6, 1, "test", "cosine", warmup_steps=2)
    expected = [0.0, 0.5, *(0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(4))]
    assert [entry["learning_rate"] for entry in log] == pytest.approx(expected)
    assert weight.item() == pytest.approx(-sum(expected))


def test_gradients_are_clipped_and_named_losses_logged():
    weight = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([weight], lr=1.0)

    def step_loss():
        return {"loss": weight * 10.0, "part": torch.tensor(3.0)}

    log = run_pretraining_steps(step_loss, optimizer, 2, 1, "test", max_grad_norm=0.5)
    assert weight.item() == pytest.approx(-1.0), "each step's gradient of 10 clipped to 0.5"
    assert [entry["part"] for entry in log] == [3.0, 3.0] and log[1]["loss"] == pytest.approx(-5.0)


@pytest.mark.parametrize(("option", "value"), [("warmup_steps", 3), ("warmup_steps", -1), ("max_grad_norm", 0.0)])
def test_loop_options_are_validated(option, value):
    weight = torch.nn.Parameter(torch.zeros(()))
    with pytest.raises(ValueError, match=option):
        run_pretraining_steps(lambda: weight * 1.0, torch.optim.SGD([weight], lr=1.0), 2, 1, "test", **{option: value})
