"""Depth metrics: known values, conventions, masks and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perceptio.evaluation.depth_metrics import (
    abs_rel,
    delta1,
    normalized_to_positive,
    pair_order_accuracy,
    pair_order_counts,
    rmse,
)


def ramp(batch: int = 2, size: int = 16) -> np.ndarray:
    rows = np.linspace(1.0, 3.0, size, dtype=np.float32)[:, None]
    return np.repeat((rows + np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :])[None], batch, axis=0)


def test_perfect_prediction_scores_perfectly():
    target = ramp()
    assert abs_rel(target, target) == 0 and rmse(target, target) == 0
    assert delta1(target, target) == 1 and pair_order_accuracy(target, target) == 1


def test_known_values():
    target = ramp()
    assert abs_rel(1.1 * target, target) == pytest.approx(0.1, rel=1e-5)
    assert rmse(target + 0.5, target) == pytest.approx(0.5, rel=1e-5)
    assert delta1(1.3 * target, target) == 0
    assert delta1(1.2 * target, target) == 1


def test_reversed_order_scores_zero_unless_the_prediction_is_in_the_opposite_convention():
    target = ramp()
    assert pair_order_accuracy(-target, target) == 0
    assert pair_order_accuracy(-target, target, larger_is_nearer=False) == 1


def test_pairs_closer_than_the_margin_are_not_scored():
    target = np.zeros((1, 8, 8), dtype=np.float32)
    target[0, :, 4:] = 1.0
    prediction = target + np.random.default_rng(0).normal(0, 0.01, target.shape)
    correct, counted = pair_order_counts(prediction, target, num_pairs=500, margin=0.5)
    assert 0 < counted <= 500 and correct == counted
    with pytest.raises(ValueError, match="margin"):
        pair_order_accuracy(target, target, margin=2.0)


def test_valid_mask_excludes_pixels():
    target = ramp()
    prediction = target.copy()
    prediction[:, 0, :] = 100.0
    valid = np.ones_like(target, dtype=bool)
    valid[:, 0, :] = False
    assert abs_rel(prediction, target, valid=valid) == 0
    assert abs_rel(prediction, target) > 0


def test_normalized_to_positive_maps_unit_range_to_one_two():
    mapped = normalized_to_positive(torch.tensor([-1.0, 0.0, 1.0]))
    assert mapped.tolist() == [1.0, 1.5, 2.0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: abs_rel(np.zeros((4, 4)), np.ones((4, 4))), "positive"),
        (lambda: rmse(np.ones((4, 4)), np.ones((4, 5))), "same shape"),
        (lambda: rmse(np.full((4, 4), np.nan), np.ones((4, 4))), "NaN"),
        (lambda: rmse(np.ones(4), np.ones(4)), "shape"),
        (lambda: delta1(np.ones((4, 4)), np.ones((4, 4)), threshold=1.0), "threshold"),
        (lambda: pair_order_accuracy(np.ones((4, 4)), np.ones((4, 4)), num_pairs=0), "num_pairs"),
        (lambda: rmse(np.ones((4, 4)), np.ones((4, 4)), valid=np.zeros((4, 4), dtype=bool)), "no pixel"),
    ],
)
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), power=st.floats(0.2, 5.0))
def test_pair_order_is_invariant_to_monotonic_transforms(seed, power):
    target = np.random.default_rng(seed).uniform(0.1, 1.0, (2, 12, 12))
    assert pair_order_accuracy(target**power, target, num_pairs=200, margin=0.01, seed=seed) == 1
    assert pair_order_accuracy(1.0 / target, target, num_pairs=200, margin=0.01, larger_is_nearer=False) == 1
