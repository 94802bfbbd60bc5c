"""A convolutional stem that can replace the vision tower's patch projection, for towers trained from scratch."""

from __future__ import annotations

import torch
from torch import nn


def stem_patch_size(stem_channels: list[int]) -> int:
    """The patch side a stem makes: each of its `len(stem_channels) + 1` convolutions halves the resolution."""
    return 2 ** (len(stem_channels) + 1)


class PerceptioConvolutionalPatchEmbeddings(nn.Module):
    """Stride-2 3×3 convolutions with GELU between them, in place of InternViT's one patch-sized convolution.

    A ViT sees each patch through one linear map; trained from scratch on a few thousand images it learns colour
    quickly but edges and silhouettes (what tells a cube from a cylinder) slowly. Overlapping small convolutions give
    it the locality a CNN has and keep the tower's token grid: the output is `(batch, patches, hidden_size)` as the
    patch projection's is. Released InternViT weights have no stem; it is for the recipe's tower trained here.
    """

    def __init__(self, num_channels: int, hidden_size: int, stem_channels: list[int], image_size: tuple[int, int]):
        super().__init__()
        widths = [num_channels, *stem_channels]
        layers: list[nn.Module] = []
        for in_channels, out_channels in zip(widths, widths[1:]):
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1), nn.GELU()]
        layers.append(nn.Conv2d(widths[-1], hidden_size, kernel_size=3, stride=2, padding=1))
        self.stem = nn.Sequential(*layers)
        self.num_channels = num_channels
        patch_size = stem_patch_size(stem_channels)
        self.patch_size = (patch_size, patch_size)
        self.patch_shape = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]

    def reset_parameters(self) -> None:
        """PyTorch's fan-in scaled initialisation of every convolution, the scale a GELU stack trains from."""
        for layer in self.stem:
            if isinstance(layer, nn.Conv2d):
                layer.reset_parameters()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must have {self.num_channels} channels (the vision config's num_channels), got "
                f"{pixel_values.shape[1]}."
            )
        features = self.stem(pixel_values.to(self.stem[0].weight.dtype))
        return features.flatten(2).transpose(1, 2)


__all__ = ["PerceptioConvolutionalPatchEmbeddings", "stem_patch_size"]
