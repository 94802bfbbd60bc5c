"""Stand-in for the part of torchvision that Sa2VA's Hub code uses (see ../README.md)."""

from . import transforms


__all__ = ["transforms"]
