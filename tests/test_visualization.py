"""Mask overlays and colour-mapped depth pictures."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from perceptio.models.perceptio.visualization_perceptio import (
    DEPTH_COLORMAP_ANCHORS,
    apply_depth_colormap,
    render_depth,
    render_mask_overlay,
)


def test_overlay_colours_only_masked_pixels():
    image = np.full((10, 12, 3), 100, dtype=np.uint8)
    first = np.zeros((10, 12), dtype=bool)
    first[:3] = True
    second = np.zeros((10, 12), dtype=bool)
    second[-2:, -2:] = True
    overlay = np.asarray(render_mask_overlay(image, [first, second], alpha=1.0, colors=[(255, 0, 0), (0, 0, 255)]))
    assert overlay.shape == (10, 12, 3)
    assert (overlay[first] == (255, 0, 0)).all() and (overlay[second] == (0, 0, 255)).all()
    untouched = ~(first | second)
    assert (overlay[untouched] == 100).all()


def test_overlay_without_masks_is_the_image_and_accepts_pil():
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    overlay = render_mask_overlay(image, [])
    assert overlay.mode == "RGB" and (np.asarray(overlay) == np.asarray(image)).all()


@pytest.mark.parametrize(
    "masks, kwargs, message",
    [
        ([np.zeros((3, 3), bool)], {}, "shape"),
        ([np.zeros((4, 4), np.uint8)], {}, "boolean"),
        ([], {"alpha": 1.5}, "alpha"),
        ([], {"colors": []}, "colour"),
        (np.zeros((1, 4, 4), bool), {}, "list"),
    ],
)
def test_bad_overlay_input_raises(masks, kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_mask_overlay(np.zeros((4, 4, 3), np.uint8), masks, **kwargs)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=20))
def test_depth_picture_is_brighter_where_nearer(values):
    depth = np.array(values, dtype=np.float32)[None, :]
    picture = np.asarray(render_depth(depth)).astype(int)
    assert picture.shape == (1, len(values), 3)
    brightness = picture.sum(-1)[0]
    order = np.argsort(depth[0], kind="stable")
    # Larger value -> at least as bright (the ramp is monotone in brightness).
    assert np.all(np.diff(brightness[order]) >= -1)
    if depth.max() > depth.min():
        assert brightness[depth[0].argmax()] > brightness[depth[0].argmin()]


def test_colormap_hits_its_anchors():
    ends = apply_depth_colormap(np.array([0.0, 1.0]))
    assert (ends == DEPTH_COLORMAP_ANCHORS[[0, -1]].astype(np.uint8)).all()


def test_constant_depth_renders_and_bad_depth_raises():
    assert render_depth(np.ones((3, 4))).size == (4, 3)
    for bad in (np.ones(3), np.array([[np.nan, 1.0]]), np.zeros((0, 3)), np.array([["a"]])):
        with pytest.raises(ValueError):
            render_depth(bad)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        apply_depth_colormap(np.array([1.5]))
