"""The transforms Sa2VA composes: Compose, Lambda, Resize, ToTensor, Normalize (PIL input)."""

from __future__ import annotations

from . import functional
from .functional import InterpolationMode


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, value):
        for transform in self.transforms:
            value = transform(value)
        return value


class Lambda:
    def __init__(self, function):
        self.function = function

    def __call__(self, value):
        return self.function(value)


class Resize:
    def __init__(self, size, interpolation: InterpolationMode = InterpolationMode.BILINEAR):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, image):
        return functional.resize(image, self.size, self.interpolation)


class ToTensor:
    def __call__(self, image):
        return functional.to_tensor(image)


class Normalize:
    def __init__(self, mean, std):
        self.mean = mean
        self.std = std

    def __call__(self, tensor):
        return functional.normalize(tensor, self.mean, self.std)


__all__ = ["Compose", "InterpolationMode", "Lambda", "Normalize", "Resize", "ToTensor", "functional"]
