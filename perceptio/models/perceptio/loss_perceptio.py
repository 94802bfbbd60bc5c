"""Perceptio's loss terms: language modelling averaged per sample or per segment, masks, and the depth-token objectives."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from .spatial_vocabulary_perceptio import DepthBlocks, PerceptioSpatialVocabulary


class LossTerm(NamedTuple):
    """How one term enters the composite loss.

    Attributes:
        weight_field: the `PerceptioConfig` field holding its λ (the `loss:` key of a `perceptio train` YAML file);
            `None` for a term weighted 1 that no setting changes.
        kind: the forward stage that computes it: "lm" (the next-token cross-entropy), "mask" (from the `[SEG]`
            masks) or "depth" (from the depth-block steps). A stage with nothing to supervise gives its terms 0.
    """

    weight_field: str | None
    kind: Literal["lm", "mask", "depth"]


# Every term of the composite loss, in summation order: loss = Σ λ · term. The key is the term's name on the model
# output (`output.loss_dict`), in the trainer's logs and in docs/training.md; this mapping is the only list of them.
LOSS_TERMS: dict[str, LossTerm] = {
    "loss_lm": LossTerm(None, "lm"),
    "loss_mask": LossTerm("mask_loss_weight", "mask"),
    "loss_mask_iou": LossTerm("mask_iou_loss_weight", "mask"),
    "loss_seg_attribute": LossTerm("seg_attribute_loss_weight", "mask"),
    "loss_seg_prompt": LossTerm("seg_prompt_loss_weight", "mask"),
    "loss_marker": LossTerm("depth_marker_loss_weight", "depth"),
    "loss_token": LossTerm("depth_token_loss_weight", "depth"),
    "loss_count": LossTerm("depth_count_loss_weight", "depth"),
    "loss_depth_recon": LossTerm("depth_recon_loss_weight", "depth"),
}


def loss_term_names(kind: str | None = None) -> tuple[str, ...]:
    """The names of the terms of one `kind` ("lm", "mask", "depth"), or of every term, in summation order."""
    return tuple(name for name, term in LOSS_TERMS.items() if kind is None or term.kind == kind)


def loss_weight_fields(kind: str | None = None) -> tuple[str, ...]:
    """The config fields that weight the terms of one `kind`, or of every term (`mask_loss_weight`, ...)."""
    return tuple(
        term.weight_field
        for term in LOSS_TERMS.values()
        if term.weight_field is not None and (kind is None or term.kind == kind)
    )


def weighted_loss_sum(losses: dict[str, torch.Tensor], config) -> torch.Tensor:
    """Σ over `LOSS_TERMS` of the config's λ × the term, in the registry's order; `losses` must hold every term."""
    missing = sorted(set(LOSS_TERMS) - set(losses))
    if missing:
        raise ValueError(f"No value for the loss terms {missing}; every entry of LOSS_TERMS needs one.")
    total = None
    for name, term in LOSS_TERMS.items():
        weighted = losses[name] if term.weight_field is None else getattr(config, term.weight_field) * losses[name]
        total = weighted if total is None else total + weighted
    return total


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


# The `seg_attributes` label of a `[SEG]` whose phrase has no label for that attribute (skipped by the loss).
UNLABELLED_SEG_ATTRIBUTE = -100


def seg_attribute_loss(attribute_logits: list[torch.Tensor], labels: torch.LongTensor) -> torch.Tensor:
    """Cross-entropy of each attribute head's logits (M, classes_a) against its column of `labels` (M, A), averaged
    over the labelled `[SEG]`s (`UNLABELLED_SEG_ATTRIBUTE` marks a `[SEG]` without a label), then over the attributes.

    It divides by the count instead of branching on it, so a batch with no label gives 0 and still reaches every head
    (distributed processes build the same graph).
    """
    per_attribute = [
        F.cross_entropy(logits.float(), labels[:, column], ignore_index=UNLABELLED_SEG_ATTRIBUTE, reduction="sum")
        / (labels[:, column] >= 0).sum().clamp_min(1)
        for column, logits in enumerate(attribute_logits)
    ]
    return torch.stack(per_attribute).mean()


def seg_prompt_loss(prompts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The squared error of `[SEG]` prompts (M, C) against target prompts (M, C), over the rows whose target is
    finite (a row of NaN marks a `[SEG]` without one), divided by the targets' squared norm: 0 is a perfect match and
    1 is as far as predicting zeros.

    A batch without targets gives 0 and still reaches every prompt (distributed processes build the same graph).
    """
    supervised = torch.isfinite(targets).all(-1, keepdim=True)
    targets = torch.where(supervised, targets.float(), 0.0)
    squared_error = ((prompts.float() - targets) ** 2 * supervised).sum()
    return squared_error / (targets**2).sum().clamp_min(torch.finfo(torch.float32).tiny)


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
    return per_sample_mean(*next_token_losses(logits, labels))


def per_sample_mean(token_losses: torch.Tensor, supervised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_sample_lm_loss` from the output of `next_token_losses`, for a caller that already has it."""
    counts = supervised.sum(1)
    return token_losses.sum(1) / counts.clamp_min(1), counts


class PerSampleLosses(NamedTuple):
    """Each sample's mean next-token cross-entropy over all its supervised tokens (`lm`) and over those outside its
    depth block (`answer`: its `[SEG]`s and text, which a long depth block would otherwise hide), detached, with the
    number of tokens of each; a mean is 0 where its count is."""

    lm: torch.Tensor
    lm_tokens: torch.Tensor
    answer: torch.Tensor
    answer_tokens: torch.Tensor


def per_sample_losses(
    token_losses: torch.Tensor,
    supervised: torch.Tensor,
    labels: torch.LongTensor,
    vocabulary: PerceptioSpatialVocabulary | None,
) -> PerSampleLosses:
    """`PerSampleLosses` from the output of `next_token_losses` and the unshifted labels (B, T); without a vocabulary
    no token is a depth block's."""
    token_losses = token_losses.detach()
    targets = labels[:, 1:].to(token_losses.device)
    answer = supervised & ~vocabulary.is_depth_block_token(targets) if vocabulary is not None else supervised
    return PerSampleLosses(*per_sample_mean(token_losses, supervised), *per_sample_mean(token_losses * answer, answer))


def segment_averaged_lm_loss(
    logits: torch.Tensor, labels: torch.LongTensor, vocabulary: PerceptioSpatialVocabulary | None
) -> torch.Tensor:
    """Next-token cross-entropy averaged within each segment of each sample, then over the batch's segments.

    A sample's segments are its depth block and the rest of its supervised tokens (`[SEG]`s and the text answer), so a
    long depth block does not outweigh a one-word answer. Without a vocabulary each sample is one segment.
    """
    return segment_mean(*next_token_losses(logits, labels), labels, vocabulary)


def segment_mean(
    token_losses: torch.Tensor,
    supervised: torch.Tensor,
    labels: torch.LongTensor,
    vocabulary: PerceptioSpatialVocabulary | None,
) -> torch.Tensor:
    """`segment_averaged_lm_loss` from the output of `next_token_losses` and the unshifted labels (B, T)."""
    targets = labels[:, 1:].to(token_losses.device)
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
