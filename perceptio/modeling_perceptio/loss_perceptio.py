"""Perceptio's loss terms: language modelling averaged per sample or per segment, masks, and the depth-token objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..processing.spatial_vocabulary_perceptio import DepthBlocks, PerceptioSpatialVocabulary


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


def mask_iou(predicted: torch.Tensor, target: torch.Tensor, empty_iou: float = 1.0) -> torch.Tensor:
    """IoU of boolean masks over their last two dimensions (the others broadcast); two empty masks score `empty_iou`.

    The batched torch counterpart of `perceptio.evaluation.segmentation_metrics` (whose `sample_iou` also scores two
    empty masks 1), kept here because the Hub-shipped model code cannot import `perceptio.evaluation`.
    """
    intersection = (predicted & target).flatten(-2).sum(-1).float()
    union = (predicted | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp_min(1.0), torch.full_like(union, empty_iou))


def mask_iou_prediction_loss(
    candidate_logits: torch.Tensor, predicted_iou: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean squared error between SAM2's predicted IoU of each candidate (M, C) and its actual IoU with the target.

    It trains the IoU head that picks the best candidate at inference, as SAM's own training does; the actual IoU
    (candidates (M, C, H, W) thresholded at 0 against targets (M, H, W) above 0.5) is a constant target.
    """
    with torch.no_grad():
        actual_iou = mask_iou(candidate_logits > 0, (targets > 0.5).unsqueeze(1))
    return F.mse_loss(predicted_iou.float(), actual_iou)


def segmentation_loss(
    candidate_logits: torch.Tensor, targets: torch.Tensor, bce_weight: float, dice_weight: float, dice_epsilon: float
) -> torch.Tensor:
    """`bce_weight` × BCE + `dice_weight` × Dice of each mask's best candidate, averaged over masks -> scalar.

    `candidate_logits` is SAM2's multimask output (M, C, H, W) for targets (M, H, W). Only the candidate with the
    lowest loss is supervised, as in SAM's own training: the candidates specialise and the IoU head learns to pick.
    """
    num_masks, num_candidates = candidate_logits.shape[:2]
    flat_logits = candidate_logits.flatten(0, 1)
    repeated = targets.repeat_interleave(num_candidates, dim=0)
    per_candidate = bce_weight * mask_bce_loss(flat_logits, repeated) + dice_weight * mask_dice_loss(
        flat_logits, repeated, dice_epsilon
    )
    return per_candidate.view(num_masks, num_candidates).min(-1).values.mean()


# Logit rows (batch x positions) per chunk of the per-token cross-entropy: its float32 copy and log-softmax stay
# bounded (2 x 1024 rows x 4 bytes x vocabulary, 1.2 GB for a 150k vocabulary) instead of twice the full logits.
CROSS_ENTROPY_CHUNK_ROWS = 1024


def next_token_losses(
    logits: torch.Tensor, labels: torch.LongTensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of each next token (B, T - 1), in float32 and 0 where the label is `ignore_index`, and the
    mask of supervised tokens. Logits (B, T, V) and labels (B, T) are unshifted, as transformers' causal-LM loss takes
    them: logits[:, t] predict labels[:, t + 1]."""
    batch, length = labels.shape
    targets = labels[:, 1:].to(logits.device)
    supervised = targets != ignore_index
    step = max(1, CROSS_ENTROPY_CHUNK_ROWS // batch)
    chunks = [
        F.cross_entropy(
            logits[:, start : min(start + step, length - 1)].float().transpose(1, 2),
            targets[:, start : start + step].clamp_min(0),
            reduction="none",
        )
        for start in range(0, length - 1, step)
    ]
    return torch.cat(chunks, dim=1) * supervised, supervised


def per_sample_lm_loss(logits: torch.Tensor, labels: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's mean next-token cross-entropy over its supervised tokens (0 when it has none), and their count."""
    token_losses, supervised = next_token_losses(logits, labels)
    counts = supervised.sum(1)
    return token_losses.sum(1) / counts.clamp_min(1), counts


def segment_averaged_lm_loss(
    logits: torch.Tensor, labels: torch.LongTensor, vocabulary: PerceptioSpatialVocabulary | None
) -> torch.Tensor:
    """Next-token cross-entropy averaged within each segment of each sample, then over the batch's segments.

    A sample's segments are its depth block and the rest of its supervised tokens (`[SEG]`s and the text answer), so a
    long depth block does not outweigh a one-word answer. Without a vocabulary each sample is one segment.
    """
    token_losses, supervised = next_token_losses(logits, labels)
    targets = labels[:, 1:].to(logits.device)
    segment = vocabulary.is_depth_block_token(targets).long() if vocabulary is not None else torch.zeros_like(targets)
    sums = token_losses.new_zeros(targets.shape[0], 2).scatter_add_(1, segment, token_losses)
    counts = token_losses.new_zeros(targets.shape[0], 2).scatter_add_(1, segment, supervised.float())
    return (sums / counts.clamp_min(1.0)).sum() / (counts > 0).sum().clamp_min(1)


def gather_block_steps(values: torch.Tensor, blocks: DepthBlocks, num_tokens: int) -> torch.Tensor:
    """Rows of `values` (B, L, X) at the N + 2 steps of each block that emit `<DEPTH_START>`, the N codes and
    `<DEPTH_END>`: (num_blocks, N + 2, X). The step that emits the label at position t is position t − 1."""
    offsets = torch.arange(num_tokens + 2, device=blocks.starts.device)
    positions = blocks.starts[:, None] + offsets[None, :] - 1
    samples = blocks.samples[:, None].expand_as(positions)
    return values[samples, positions]


def depth_marker_loss(step_logits: torch.Tensor, vocabulary: PerceptioSpatialVocabulary) -> torch.Tensor:
    """Cross-entropy (full vocabulary) at the steps that must emit `<DEPTH_START>` and `<DEPTH_END>`.

    `step_logits` is (num_blocks, N + 2, V) from `gather_block_steps`.
    """
    boundaries = step_logits[:, [0, -1]].reshape(-1, step_logits.shape[-1]).float()
    markers = [vocabulary.depth_start, vocabulary.depth_end]
    targets = torch.tensor(markers, device=step_logits.device).repeat(step_logits.shape[0])
    return F.cross_entropy(boundaries, targets)


def depth_code_logits(step_logits: torch.Tensor, vocabulary: PerceptioSpatialVocabulary) -> torch.Tensor:
    """The K code logits at the N code steps of each block: (num_blocks, N, K)."""
    codes = vocabulary.depth_code_ids
    return step_logits[:, 1:-1, codes.start : codes.stop]


def depth_code_targets(
    labels: torch.LongTensor, blocks: DepthBlocks, vocabulary: PerceptioSpatialVocabulary
) -> torch.LongTensor:
    """The ground-truth codes of each block: (num_blocks, N) in [0, K)."""
    offsets = torch.arange(1, vocabulary.num_depth_tokens + 1, device=blocks.starts.device)
    positions = blocks.starts[:, None] + offsets[None, :]
    return labels[blocks.samples[:, None].expand_as(positions), positions] - vocabulary.depth_code_ids.start


def depth_token_loss(code_logits: torch.Tensor, code_targets: torch.LongTensor) -> torch.Tensor:
    """Cross-entropy over the K code logits only (restricted softmax) at every code step."""
    return F.cross_entropy(code_logits.reshape(-1, code_logits.shape[-1]).float(), code_targets.reshape(-1))


def depth_count_loss(step_logits: torch.Tensor, vocabulary: PerceptioSpatialVocabulary) -> torch.Tensor:
    """Mean over blocks of ((Σ_t p_t − N) / N)², p_t the probability mass on the K codes at each step from the first
    code to `<DEPTH_END>` — a differentiable penalty on emitting too many or too few codes."""
    span = step_logits[:, 1:].float()
    codes, num_tokens = vocabulary.depth_code_ids, vocabulary.num_depth_tokens
    code_mass = torch.exp(torch.logsumexp(span[..., codes.start : codes.stop], dim=-1) - torch.logsumexp(span, dim=-1))
    return (((code_mass.sum(-1) - num_tokens) / num_tokens) ** 2).mean()
