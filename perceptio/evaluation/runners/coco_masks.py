"""COCO segmentations (polygons or RLE) to boolean masks at the image size, with pycocotools.

Several polygons of one object are merged: a pixel covered by two overlapping polygons is foreground once, so
ground-truth masks are always binary. pycocotools is in the `eval` extra (`pip install "perceptio[eval]"`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


# An RLE dict: {"size": [height, width], "counts": str | list[int]}.
RLE_KEYS = frozenset({"size", "counts"})


def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as error:
        raise ImportError(
            'RefCOCO masks are decoded with pycocotools; install it with `pip install "perceptio[eval]"` '
            "(or `pip install pycocotools`)."
        ) from error
    return mask_utils


def _as_polygons(segmentation: Any) -> list[list[float]]:
    """A COCO polygon list [[x0, y0, x1, y1, ...], ...]; a single flat polygon is wrapped."""
    polygons = (
        [segmentation] if segmentation and not isinstance(segmentation[0], (list, tuple, np.ndarray)) else segmentation
    )
    checked = []
    for index, polygon in enumerate(polygons):
        values = [float(value) for value in polygon]
        if len(values) < 6 or len(values) % 2:
            raise ValueError(
                f"polygon {index} has {len(values)} coordinates; a polygon is x0, y0, x1, y1, ... with at least "
                "3 points (an even count >= 6)."
            )
        checked.append(values)
    return checked


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation to a bool (height, width) mask.

    Args:
        segmentation: polygons (a list of flat coordinate lists, or one flat list), an RLE dict with `size` and
            `counts` (compressed str/bytes or uncompressed list), or a list of RLE dicts.
        height, width: the image size (an RLE's own size must match it).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive; got {height} x {width}.")
    mask_utils = _mask_utils()
    if isinstance(segmentation, dict):
        rles = [_as_rle(segmentation, height, width, mask_utils)]
    elif isinstance(segmentation, Sequence) and segmentation and isinstance(segmentation[0], dict):
        rles = [_as_rle(item, height, width, mask_utils) for item in segmentation]
    elif isinstance(segmentation, (Sequence, np.ndarray)) and len(segmentation):
        rles = mask_utils.frPyObjects(_as_polygons(segmentation), height, width)
    else:
        raise ValueError(
            f"segmentation must be COCO polygons or an RLE dict with 'size' and 'counts'; got {segmentation!r:.80}."
        )
    merged = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    return mask_utils.decode(merged).astype(bool)


def _as_rle(rle: dict, height: int, width: int, mask_utils) -> dict:
    if not RLE_KEYS <= set(rle):
        raise ValueError(f"an RLE segmentation needs keys {sorted(RLE_KEYS)}; got {sorted(rle)}.")
    if [int(value) for value in rle["size"]] != [height, width]:
        raise ValueError(f"the RLE's size {list(rle['size'])} differs from the image's [{height}, {width}].")
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(rle, height, width)
    return {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
