"""Perceptio's loss terms beyond language modelling (DESIGN.md §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_bce_loss(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sigmoid binary cross-entropy per mask, averaged over pixels: (M, H, W) -> (M,)."""
    return F.binary_cross_entropy_with_logits(mask_logits, targets, reduction="none").flatten(1).mean(-1)


def mask_dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """1 − Dice coefficient per mask, smoothed by `epsilon` so empty masks give a finite loss: (M, H, W) -> (M,)."""
    probabilities = mask_logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2.0 * (probabilities * targets).sum(-1)
    denominator = probabilities.sum(-1) + targets.sum(-1)
    return 1.0 - (numerator + epsilon) / (denominator + epsilon)


def resize_masks_to_logits(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Ground-truth masks (M, H, W) of any size and dtype -> float targets at the low-res logit size."""
    masks = masks.float().unsqueeze(1)
    if tuple(masks.shape[-2:]) != tuple(size):
        downsampling = masks.shape[-2] > size[0] or masks.shape[-1] > size[1]
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False, antialias=downsampling)
    return masks.squeeze(1).clamp(0.0, 1.0)


def segmentation_loss(
    mask_logits: torch.Tensor, targets: torch.Tensor, bce_weight: float, dice_weight: float, dice_epsilon: float
) -> torch.Tensor:
    """`bce_weight` × BCE + `dice_weight` × Dice, averaged over masks (M, H, W) -> scalar."""
    per_mask = bce_weight * mask_bce_loss(mask_logits, targets) + dice_weight * mask_dice_loss(
        mask_logits, targets, dice_epsilon
    )
    return per_mask.mean()
