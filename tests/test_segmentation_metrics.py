"""Referring-segmentation metrics against hand-worked examples."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from perceptio.evaluation.segmentation_metrics import (
    ReferringSegmentationScore,
    ciou,
    giou,
    mask_intersection_union,
    nearest_source_indices,
    resize_mask_nearest,
    sample_iou,
)


def rasterise_by_summing(polygons, size):
    """Rasterise each polygon to 0/1 and add them up, as COCO annotations with several polygons can be."""
    width, height = size
    total = np.zeros((height, width), dtype=np.int64)
    for polygon in polygons:
        canvas = Image.new("L", size, 0)
        ImageDraw.Draw(canvas).polygon(polygon, fill=1)
        total += np.asarray(canvas, dtype=np.int64)
    return total


def test_empty_prediction_on_empty_target_scores_one():
    empty = np.zeros((5, 7), dtype=bool)
    assert mask_intersection_union(empty, empty) == (0, 0)
    score = ReferringSegmentationScore()
    score.add_masks(empty, empty)
    assert score.compute() == {"ciou": 1.0, "giou": 1.0, "num_samples": 1}


def test_empty_prediction_on_object_scores_zero():
    target = np.zeros((4, 4), dtype=bool)
    target[1:3, 1:3] = True
    assert mask_intersection_union(np.zeros((4, 4)), target) == (0, 4)
    assert sample_iou(0, 4) == 0.0


def test_prediction_on_empty_target_scores_zero():
    prediction = np.zeros((4, 4))
    prediction[0, :] = 1
    assert mask_intersection_union(prediction, np.zeros((4, 4))) == (0, 4)


def test_overlapping_polygons_summing_to_two_count_once():
    # Two 4x4 squares overlapping on a 2x2 block: the summed raster holds 2 there.
    target = rasterise_by_summing([[(0, 0), (3, 0), (3, 3), (0, 3)], [(2, 2), (5, 2), (5, 5), (2, 5)]], (8, 8))
    assert target.max() == 2
    assert np.count_nonzero(target == 2) == 4
    # The objects cover 16 + 16 - 4 = 28 pixels.
    union_of_squares = target > 0
    assert mask_intersection_union(union_of_squares, target) == (28, 28)
    # Predicting only the first square: 16 of the 28 pixels.
    first_square = rasterise_by_summing([[(0, 0), (3, 0), (3, 3), (0, 3)]], (8, 8))
    assert mask_intersection_union(first_square, target) == (16, 28)


def test_prediction_upscaled_to_target_size():
    # A 2x2 prediction with its top-left pixel on covers the top-left 2x2 block of a 4x4 target.
    prediction = np.array([[1, 0], [0, 0]])
    target = np.zeros((4, 4), dtype=bool)
    target[0:2, 0:3] = True  # 6 pixels, 4 of them under the prediction
    assert mask_intersection_union(prediction, target) == (4, 6)


def test_prediction_downscaled_to_target_size():
    # 3x3 -> 2x2 reads rows/cols floor((i + 0.5) * 3 / 2) = 0 and 2: the four corners.
    prediction = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    assert resize_mask_nearest(prediction.astype(bool), (2, 2)).tolist() == [[True, False], [False, True]]
    target = np.array([[1, 1], [0, 0]])
    assert mask_intersection_union(prediction, target) == (1, 3)


def test_counts_are_taken_at_target_size_not_prediction_size():
    prediction = np.ones((10, 10), dtype=bool)
    target = np.ones((3, 5), dtype=bool)
    assert mask_intersection_union(prediction, target) == (15, 15)


def test_ciou_and_giou_differ_on_worked_example():
    # A large object predicted well (90/100) and a small one missed (0/10).
    big_pred = np.zeros((10, 10), dtype=bool)
    big_pred[:9, :] = True
    big_target = np.ones((10, 10), dtype=bool)
    small_pred = np.zeros((10, 10), dtype=bool)
    small_target = np.zeros((10, 10), dtype=bool)
    small_target[0, :] = True
    counts = [mask_intersection_union(big_pred, big_target), mask_intersection_union(small_pred, small_target)]
    assert counts == [(90, 100), (0, 10)]
    intersections, unions = zip(*counts)
    assert ciou(intersections, unions) == pytest.approx(90 / 110)
    assert giou(intersections, unions) == pytest.approx((0.9 + 0.0) / 2)


def test_accumulator_matches_functions_with_empty_sample():
    intersections, unions = [3, 0, 5], [4, 0, 10]
    score = ReferringSegmentationScore()
    for intersection, union in zip(intersections, unions):
        score.add_counts(intersection, union)
    assert score.ciou == pytest.approx(ciou(intersections, unions)) == pytest.approx(8 / 14)
    assert score.giou == pytest.approx(giou(intersections, unions)) == pytest.approx((0.75 + 1.0 + 0.5) / 3)
    assert score.num_samples == 3


def test_logits_and_tensors_are_binarised_at_zero():
    logits = torch.tensor([[2.5, -1.0], [0.0, 0.3]])
    target = torch.tensor([[True, True], [False, False]])
    assert mask_intersection_union(logits, target) == (1, 3)


@given(
    source=st.integers(min_value=1, max_value=64),
    target=st.integers(min_value=1, max_value=64),
)
def test_nearest_indices_pick_the_input_pixel_whose_centre_is_nearest(source, target):
    indices = nearest_source_indices(source, target)
    centres = (np.arange(target) + 0.5) * source / target
    # The chosen input pixel's span [j, j + 1) contains the output centre (ties go to the right, as in torch).
    assert np.all(indices <= centres + 1e-9) and np.all(centres < indices + 1 + 1e-9)
    assert indices.min() >= 0 and indices.max() <= source - 1


def test_resize_agrees_with_torch_nearest_exact_away_from_exact_ties():
    mask = np.random.default_rng(0).random((13, 17)) > 0.5
    ours = resize_mask_nearest(mask, (29, 7))
    theirs = F.interpolate(torch.from_numpy(mask).float()[None, None], size=(29, 7), mode="nearest-exact")[0, 0] > 0.5
    assert np.array_equal(ours, theirs.numpy())


@settings(max_examples=50, deadline=None)
@given(
    samples=st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 50)).map(lambda pair: (min(pair), max(pair))),
        min_size=1,
        max_size=20,
    )
)
def test_scores_are_fractions_and_accumulator_agrees(samples):
    intersections, unions = zip(*samples)
    score = ReferringSegmentationScore()
    for intersection, union in samples:
        score.add_counts(intersection, union)
    assert 0.0 <= ciou(intersections, unions) <= 1.0
    assert 0.0 <= giou(intersections, unions) <= 1.0
    assert score.ciou == pytest.approx(ciou(intersections, unions))
    assert score.giou == pytest.approx(giou(intersections, unions))


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (np.zeros((2, 2, 2)), np.zeros((2, 2)), "2-D"),
        (np.zeros((2, 2)), np.zeros((0, 2)), "non-zero"),
        (np.array([[np.nan, 0.0]]), np.zeros((1, 2)), "NaN"),
        (np.array([["a", "b"]]), np.zeros((1, 2)), "dtype"),
    ],
)
def test_bad_masks_raise(pred, target, message):
    with pytest.raises(ValueError, match=message):
        mask_intersection_union(pred, target)


@pytest.mark.parametrize(
    ("intersections", "unions", "message"),
    [
        ([1, 2], [3], "one entry per sample"),
        ([], [], "empty"),
        ([5], [3], "larger than the union"),
        ([-1], [3], "non-negative"),
        ([float("nan")], [3], "finite"),
        (["1"], [3], "number"),
    ],
)
def test_bad_counts_raise(intersections, unions, message):
    with pytest.raises(ValueError, match=message):
        ciou(intersections, unions)
    with pytest.raises(ValueError, match=message):
        giou(intersections, unions)


def test_reading_an_empty_accumulator_raises():
    with pytest.raises(ValueError, match="No samples"):
        ReferringSegmentationScore().compute()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), density=st.sampled_from([0.0, 0.1, 0.5]))
def test_torch_batched_mask_iou_equals_the_numpy_metric(seed, density):
    from perceptio.models.perceptio.loss_perceptio import mask_iou

    generator = torch.Generator().manual_seed(seed)
    predicted = torch.rand(3, 2, 5, 6, generator=generator) < density
    target = torch.rand(3, 1, 5, 6, generator=generator) < density  # broadcast over the candidate dimension
    expected = [
        [sample_iou(*mask_intersection_union(predicted[m, c].numpy(), target[m, 0].numpy())) for c in range(2)]
        for m in range(3)
    ]
    assert mask_iou(predicted, target).numpy() == pytest.approx(np.array(expected))
    empty = torch.zeros(2, 4, 4, dtype=torch.bool)
    assert mask_iou(empty, empty).tolist() == [1.0, 1.0]
    assert mask_iou(empty, empty, empty_iou=0.0).tolist() == [0.0, 0.0]
