"""Pictures of Perceptio's outputs: masks blended over the image, and a colour-mapped depth map (numpy + PIL only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .image_processing_perceptio import to_rgb_array


# Distinct, colour-blind-friendly mask colours (Okabe–Ito), cycled when there are more masks.
MASK_COLORS = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)
# Anchors of a perceptually ordered dark-blue -> teal -> yellow ramp (viridis' endpoints and midpoints), interpolated
# linearly; dark = far, bright = near, since Perceptio's depth is larger for nearer points.
DEPTH_COLORMAP_ANCHORS = np.array(
    [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float32
)


def render_mask_overlay(
    image: Any, masks: Sequence[np.ndarray], alpha: float = 0.5, colors: Sequence[tuple[int, int, int]] = MASK_COLORS
) -> Image.Image:
    """The image with each boolean (H, W) mask blended in its own colour (`alpha` = mask opacity); RGB PIL image."""
    rgb = to_rgb_array(image).astype(np.float32)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    if not colors:
        raise ValueError("colors is empty; give at least one (r, g, b) colour.")
    if not isinstance(masks, (list, tuple)):
        raise ValueError(f"masks must be a list of (H, W) arrays, got {type(masks).__name__}.")
    for index, mask in enumerate(masks):
        mask = np.asarray(mask)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask {index} has shape {mask.shape} but the image is {rgb.shape[:2]} (height, width).")
        if mask.dtype != np.bool_:
            raise ValueError(f"mask {index} must be boolean, got dtype {mask.dtype}.")
        color = np.asarray(colors[index % len(colors)], dtype=np.float32)
        rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * color
    return Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")


def render_depth(depth: np.ndarray) -> Image.Image:
    """A colour-mapped RGB picture of a (H, W) depth map, min-max scaled per map (bright = larger value = nearer)."""
    depth = np.asarray(depth)
    if depth.ndim != 2 or 0 in depth.shape:
        raise ValueError(f"depth must be a non-empty (H, W) array, got shape {depth.shape}.")
    if not np.issubdtype(depth.dtype, np.number) or np.issubdtype(depth.dtype, np.complexfloating):
        raise ValueError(f"depth must be real numbers, got dtype {depth.dtype}.")
    if not np.isfinite(depth).all():
        raise ValueError("depth contains NaN or infinite values.")
    depth = depth.astype(np.float64)
    value_range = depth.max() - depth.min()
    scaled = (depth - depth.min()) / value_range if value_range > 0 else np.zeros_like(depth)
    return Image.fromarray(apply_depth_colormap(scaled), mode="RGB")


def apply_depth_colormap(values: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) colours of values in [0, 1] on `DEPTH_COLORMAP_ANCHORS`."""
    values = np.asarray(values, dtype=np.float64)
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise ValueError(f"values must lie in [0, 1], got [{values.min():.3g}, {values.max():.3g}].")
    positions = np.linspace(0.0, 1.0, len(DEPTH_COLORMAP_ANCHORS))
    channels = [np.interp(values, positions, DEPTH_COLORMAP_ANCHORS[:, channel]) for channel in range(3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


__all__ = ["apply_depth_colormap", "render_depth", "render_mask_overlay"]
