"""Image pre-processing for Perceptio with PIL and numpy only (no torchvision).

Two views of each image are made: InternVL's dynamic tiles (square tiles at the aspect ratio closest to the
image's, plus a thumbnail) for the language model, and one square resize for the SAM2 grounding encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAM_RESAMPLE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
ACCEPTED_IMAGES = (
    "a PIL image (any mode: RGB, RGBA, L, LA, P, CMYK, ...), a numpy array (H, W) or (H, W, C) with C in "
    "{1, 3, 4}, uint8 or float in [0, 1], or a torch tensor (H, W) or (C, H, W) with C in {1, 3, 4}"
)


def _array_to_rgb(array: np.ndarray, layout: str) -> np.ndarray:
    if array.size == 0 or 0 in array.shape:
        raise ValueError(f"Got a zero-sized image of shape {array.shape}; accepted: {ACCEPTED_IMAGES}.")
    if array.ndim == 3 and layout == "chw":
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Got an image array of shape {array.shape} ({layout} layout); accepted: {ACCEPTED_IMAGES}.")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("Got an image array with NaN or infinite values; values must be finite.")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"Got a float image with values in [{array.min():.3g}, {array.max():.3g}]; float images must be in "
                "[0, 1] (or pass uint8 in [0, 255])."
            )
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"Got an image array of dtype {array.dtype}; accepted dtypes: uint8, bool, float in [0, 1].")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        array = _composite_on_white(array)
    return np.ascontiguousarray(array)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    # Transparent pixels carry no colour; white is what a viewer shows behind them.
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.round(rgb).astype(np.uint8)


def to_rgb_array(image: Any) -> np.ndarray:
    """Convert a user image to a uint8 (H, W, 3) RGB array, or raise a `ValueError` saying what is accepted."""
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(
                f"Got a zero-sized PIL image ({image.width}x{image.height}); accepted: {ACCEPTED_IMAGES}."
            )
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
        converted = image.convert("RGBA" if has_alpha else "RGB")
        return _array_to_rgb(np.asarray(converted), "hwc")
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, "hwc")
    if isinstance(image, torch.Tensor):
        return _array_to_rgb(image.detach().cpu().numpy(), "chw")
    raise ValueError(f"Got an image of type {type(image).__name__}; accepted: {ACCEPTED_IMAGES}.")


def candidate_tile_grids(min_num_tiles: int, max_num_tiles: int) -> list[tuple[int, int]]:
    """All (columns, rows) grids with a tile count in [min, max], fewest tiles first (InternVL's order)."""
    grids = {
        (columns, rows)
        for count in range(min_num_tiles, max_num_tiles + 1)
        for columns in range(1, count + 1)
        for rows in range(1, count + 1)
        if min_num_tiles <= columns * rows <= max_num_tiles
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def closest_tile_grid(width: int, height: int, grids: Sequence[tuple[int, int]], tile_size: int) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to the image's; ties go to more tiles when the image is large."""
    aspect_ratio = width / height
    best_grid, best_difference = grids[0], float("inf")
    for grid in grids:
        difference = abs(aspect_ratio - grid[0] / grid[1])
        if difference < best_difference:
            best_grid, best_difference = grid, difference
        elif difference == best_difference and width * height > 0.5 * tile_size * tile_size * grid[0] * grid[1]:
            best_grid = grid
    return best_grid


class PerceptioImageProcessor(BaseImageProcessor):
    r"""
    Makes InternVL tiles (`pixel_values`) and the SAM2 view (`sam_pixel_values`) of each image.

    Args:
        tile_size (`int`, defaults to 448): side of each InternVL tile (the vision tower's input size).
        min_num_tiles, max_num_tiles (`int`, defaults to 1 and 12): bounds of the dynamic tiling.
        use_thumbnail (`bool`, defaults to `True`): add a whole-image tile when an image is split in several.
        sam_image_size (`int`, defaults to 1024): side of the square SAM2 input.
        image_mean, image_std (`list[float]`): normalisation of both views (ImageNet's, as InternVL and SAM2 use).
        sam_resample (`str`, defaults to "bilinear"): PIL filter of the SAM2 resize, one of `SAM_RESAMPLE_FILTERS`
            (Sa2VA's checkpoints: "bicubic", PIL's default).
        sam_image_mean, sam_image_std (`list[float]`, *optional*): normalisation of the SAM2 view when it differs from
            `image_mean`/`image_std` (Sa2VA normalises with the ImageNet values rounded to bfloat16).
        sam_mask_upsample (`bool`, defaults to `False`): bring mask logits to the SAM2 input size before the image size
            in post-processing, as Sa2VA does (two bilinear resizes), instead of resizing them once.
    """

    model_input_names = ["pixel_values", "sam_pixel_values"]

    def __init__(
        self,
        tile_size: int = 448,
        min_num_tiles: int = 1,
        max_num_tiles: int = 12,
        use_thumbnail: bool = True,
        sam_image_size: int = 1024,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        sam_resample: str = "bilinear",
        sam_image_mean: Sequence[float] | None = None,
        sam_image_std: Sequence[float] | None = None,
        sam_mask_upsample: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("tile_size", tile_size), ("sam_image_size", sam_image_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not (
            isinstance(min_num_tiles, int) and isinstance(max_num_tiles, int) and 1 <= min_num_tiles <= max_num_tiles
        ):
            raise ValueError(
                f"min_num_tiles and max_num_tiles must be integers with 1 <= min <= max, got {min_num_tiles} and "
                f"{max_num_tiles}."
            )
        self.tile_size = tile_size
        self.min_num_tiles = min_num_tiles
        self.max_num_tiles = max_num_tiles
        self.use_thumbnail = use_thumbnail
        self.sam_image_size = sam_image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        if sam_resample not in SAM_RESAMPLE_FILTERS:
            raise ValueError(f"sam_resample must be one of {sorted(SAM_RESAMPLE_FILTERS)}, got {sam_resample!r}.")
        self.sam_resample = sam_resample
        self.sam_image_mean = list(sam_image_mean) if sam_image_mean is not None else None
        self.sam_image_std = list(sam_image_std) if sam_image_std is not None else None
        self.sam_mask_upsample = bool(sam_mask_upsample)

    def _normalize(
        self, image: Image.Image, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> np.ndarray:
        array = np.asarray(image, dtype=np.float32) / 255.0
        mean = np.asarray(self.image_mean if mean is None else mean, dtype=np.float32)
        std = np.asarray(self.image_std if std is None else std, dtype=np.float32)
        array = (array - mean) / std
        return array.transpose(2, 0, 1)

    def tile(self, image: np.ndarray, max_num_tiles: int | None = None) -> list[Image.Image]:
        """Split an RGB array into InternVL tiles (plus a thumbnail when there are several)."""
        max_tiles = self.max_num_tiles if max_num_tiles is None else max_num_tiles
        if not isinstance(max_tiles, int) or max_tiles < self.min_num_tiles:
            raise ValueError(f"max_num_tiles must be an integer >= {self.min_num_tiles}, got {max_tiles!r}.")
        pil_image = Image.fromarray(image)
        width, height = pil_image.size
        columns, rows = closest_tile_grid(
            width, height, candidate_tile_grids(self.min_num_tiles, max_tiles), self.tile_size
        )
        resized = pil_image.resize((columns * self.tile_size, rows * self.tile_size), Image.Resampling.BICUBIC)
        tiles = [
            resized.crop((c * self.tile_size, r * self.tile_size, (c + 1) * self.tile_size, (r + 1) * self.tile_size))
            for r in range(rows)
            for c in range(columns)
        ]
        if self.use_thumbnail and len(tiles) > 1:
            tiles.append(pil_image.resize((self.tile_size, self.tile_size), Image.Resampling.BICUBIC))
        return tiles

    def sam_view(self, image: np.ndarray) -> np.ndarray:
        """The square, normalised SAM2 input (3, S, S) of an RGB array."""
        size = (self.sam_image_size, self.sam_image_size)
        resized = Image.fromarray(image).resize(size, SAM_RESAMPLE_FILTERS[self.sam_resample])
        return self._normalize(resized, self.sam_image_mean, self.sam_image_std)

    def __call__(self, images: Sequence[Any] | Any, max_num_tiles: int | None = None, **kwargs) -> BatchFeature:
        """Pre-process a list of images.

        Returns `pixel_values` (all tiles, stacked: (total_tiles, 3, tile, tile)), `num_tiles` (tiles per image),
        `sam_pixel_values` ((num_images, 3, S, S)) and `original_sizes` ((num_images, 2) as height, width).
        """
        if kwargs:
            raise ValueError(f"Unexpected image-processor arguments {sorted(kwargs)}; accepted: max_num_tiles.")
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        if not image_list:
            raise ValueError("Got an empty list of images; pass at least one image.")
        arrays = [to_rgb_array(image) for image in image_list]
        tiles_per_image = [self.tile(array, max_num_tiles) for array in arrays]
        pixel_values = np.stack([self._normalize(tile) for tiles in tiles_per_image for tile in tiles])
        sam_pixel_values = np.stack([self.sam_view(array) for array in arrays])
        return BatchFeature(
            data={
                "pixel_values": torch.from_numpy(pixel_values),
                "num_tiles": torch.tensor([len(tiles) for tiles in tiles_per_image], dtype=torch.long),
                "sam_pixel_values": torch.from_numpy(sam_pixel_values),
                "original_sizes": torch.tensor([array.shape[:2] for array in arrays], dtype=torch.long),
            }
        )


# Saved with an `auto_map` (see `PerceptioProcessor`) so a folder's processor can build its image processor too.
PerceptioImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["PerceptioImageProcessor", "to_rgb_array"]
