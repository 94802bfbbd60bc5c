"""`resize`, `to_pil_image` and `InterpolationMode` on PIL images, as torchvision implements them for PIL input."""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch
from PIL import Image


class InterpolationMode(Enum):
    """torchvision's names of the PIL resampling filters."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


def resize(image: Image.Image, size, interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> Image.Image:
    """Resize a PIL image to `size` = (height, width) (a pair only: Sa2VA never passes a single side)."""
    if not isinstance(image, Image.Image) or len(size) != 2:
        raise TypeError("This stand-in resizes PIL images to an explicit (height, width) only.")
    height, width = size
    return image.resize((width, height), PIL_FILTERS[interpolation])


def to_pil_image(picture, mode: str | None = None) -> Image.Image:
    """A PIL image of an (H, W, C) uint8 array (the only input Sa2VA passes)."""
    if isinstance(picture, torch.Tensor):
        picture = picture.numpy()
    if not isinstance(picture, np.ndarray) or picture.dtype != np.uint8 or picture.ndim != 3:
        raise TypeError("This stand-in converts (H, W, C) uint8 arrays only.")
    return Image.fromarray(picture, mode=mode)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1] of an RGB PIL image."""
    array = np.array(image, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def normalize(tensor: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel."""
    mean = torch.as_tensor(mean, dtype=tensor.dtype)[:, None, None]
    std = torch.as_tensor(std, dtype=tensor.dtype)[:, None, None]
    return tensor.sub(mean).div(std)
