"""Perceptio depth tokenizer: a VQ-VAE with an EMA codebook whose codes are Perceptio's depth tokens.

A relative inverse depth map (larger = nearer, as Depth Anything V2 outputs) is resized to a square, normalised per
image to [-1, 1], encoded to a grid of latents and quantised to the nearest of K codebook entries. The decoder turns
a grid of codebook entries (or, for training the main model, a softmax mix of them) back into a depth map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_perceptio_depth_tokenizer import PerceptioDepthTokenizerConfig


# A map whose value range is below this fraction of its magnitude is constant up to float rounding.
CONSTANT_MAP_RELATIVE_RANGE = 1e-5


def min_max_normalize(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max each map of `depth` (..., H, W) to [-1, 1]; a map constant up to float rounding becomes 0. Returns
    the normalised maps and each map's minimum and maximum (...,).

    The one definition of the depth tokenizer's normalisation: its `normalize` and the evaluation's ground truth
    (`perceptio.evaluation.depth_metrics.normalised_inverse_depth`) both call it.
    """
    minimum = depth.amin(dim=(-2, -1), keepdim=True)
    maximum = depth.amax(dim=(-2, -1), keepdim=True)
    value_range = maximum - minimum
    magnitude = torch.maximum(minimum.abs(), maximum.abs())
    # Resampling a constant map leaves a few ulps of ripple; stretching that to [-1, 1] would invent structure.
    is_constant = value_range <= CONSTANT_MAP_RELATIVE_RANGE * magnitude
    scaled = (depth - minimum) / value_range.clamp_min(torch.finfo(depth.dtype).tiny)
    normalized = torch.where(is_constant, torch.zeros_like(depth), 2 * scaled - 1)
    return normalized, minimum[..., 0, 0], maximum[..., 0, 0]


@dataclass
class PerceptioDepthNormalization:
    """What `normalize` removed from each map, so `denormalize` can put it back.

    Attributes:
        minimum: (B,) per-image minimum of the resized input.
        maximum: (B,) per-image maximum of the resized input.
        original_size: (height, width) of the input before resizing.
    """

    minimum: torch.Tensor
    maximum: torch.Tensor
    original_size: tuple[int, int]


@dataclass
class PerceptioDepthCodebookStatistics:
    """How a set of codes uses the codebook.

    Attributes:
        histogram: (K,) number of times each code occurs.
        perplexity: exp of the entropy of the code distribution (K when all codes are equally used, 1 when one is).
        usage_fraction: fraction of the K codes that occur at least once.
    """

    histogram: torch.Tensor
    perplexity: float
    usage_fraction: float


@dataclass
class PerceptioDepthTokenizerOutput(ModelOutput):
    r"""
    Output of [`PerceptioDepthTokenizer.forward`].

    Args:
        loss: reconstruction loss + commitment_cost * commitment loss (the codebook itself is learned by EMA).
        reconstruction: (B, image_size, image_size) decoded map in normalised [-1, 1] space (not clamped).
        target: (B, image_size, image_size) the normalised input the reconstruction is compared with.
        codes: (B, N) indices of the nearest codebook entries.
        reconstruction_loss: L1 or MSE between reconstruction and target.
        commitment_loss: mean squared distance between encoder outputs and their (detached) codes.
        perplexity: exp of the entropy of the batch's code distribution.
        dead_code_count: codes unused for at least `dead_code_threshold_steps` training steps before this step's
            revival.
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    target: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    dead_code_count: torch.LongTensor | None = None


class PerceptioDepthResidualBlock(nn.Module):
    """ReLU -> 3x3 conv -> ReLU -> 1x1 conv with a skip connection (the VQ-VAE paper's block, no normalisation so
    tiny channel counts work)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.conv_out(F.relu(self.conv_in(F.relu(hidden_states))))
        return hidden_states + residual


class PerceptioDepthEncoder(nn.Module):
    """Stride-2 4x4 convolutions, residual blocks and a 1x1 projection to the codebook dimension."""

    def __init__(self, config: PerceptioDepthTokenizerConfig):
        super().__init__()
        channels = [config.num_channels, *config.hidden_channels]
        self.downsample = nn.ModuleList(
            nn.Conv2d(channels[index], channels[index + 1], kernel_size=4, stride=2, padding=1)
            for index in range(len(config.hidden_channels))
        )
        self.residual_blocks = nn.ModuleList(
            PerceptioDepthResidualBlock(config.hidden_channels[-1]) for _ in range(config.num_residual_blocks)
        )
        self.projection = nn.Conv2d(config.hidden_channels[-1], config.codebook_dim, kernel_size=1)

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        hidden_states = depth
        for index, convolution in enumerate(self.downsample):
            hidden_states = convolution(hidden_states)
            # The last convolution feeds the residual blocks, which start with their own ReLU.
            if index < len(self.downsample) - 1:
                hidden_states = F.relu(hidden_states)
        for block in self.residual_blocks:
            hidden_states = block(hidden_states)
        return self.projection(F.relu(hidden_states))


class PerceptioDepthDecoder(nn.Module):
    """Mirror of the encoder: 1x1 projection, residual blocks and stride-2 4x4 transposed convolutions."""

    def __init__(self, config: PerceptioDepthTokenizerConfig):
        super().__init__()
        channels = [*reversed(config.hidden_channels), config.num_channels]
        self.projection = nn.Conv2d(config.codebook_dim, config.hidden_channels[-1], kernel_size=1)
        self.residual_blocks = nn.ModuleList(
            PerceptioDepthResidualBlock(config.hidden_channels[-1]) for _ in range(config.num_residual_blocks)
        )
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(channels[index], channels[index + 1], kernel_size=4, stride=2, padding=1)
            for index in range(len(config.hidden_channels))
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden_states = self.projection(latents)
        for block in self.residual_blocks:
            hidden_states = block(hidden_states)
        for convolution in self.upsample:
            hidden_states = convolution(F.relu(hidden_states))
        return hidden_states


class PerceptioDepthVectorQuantizer(nn.Module):
    """Codebook of K entries learned by exponential moving averages, with dead-code revival.

    Every statistic is a persistent buffer so it is saved, loaded and moved with the model. Buffers:
    `codebook` (K, D); `cluster_size` (K,) EMA of assignments per code; `embedding_sum` (K, D) EMA of the
    latents assigned to each code; `steps_since_used` (K,) training steps since each code was last chosen;
    `initialized` (scalar) whether the codebook was already seeded from data.
    """

    def __init__(self, config: PerceptioDepthTokenizerConfig):
        super().__init__()
        self.num_codes = config.num_codes
        self.codebook_dim = config.codebook_dim
        self.decay = config.ema_decay
        self.epsilon = config.epsilon
        self.revive_dead_codes = config.revive_dead_codes
        self.dead_code_threshold_steps = config.dead_code_threshold_steps
        self.initialize_from_data = config.initialize_codebook_from_data
        self.register_buffer("codebook", torch.empty(config.num_codes, config.codebook_dim))
        self.register_buffer("cluster_size", torch.empty(config.num_codes))
        self.register_buffer("embedding_sum", torch.empty(config.num_codes, config.codebook_dim))
        self.register_buffer("steps_since_used", torch.empty(config.num_codes, dtype=torch.long))
        self.register_buffer("initialized", torch.empty((), dtype=torch.long))

    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry (squared L2) for each row of `latents` (M, D)."""
        codebook = self.codebook.to(latents.dtype)
        distances = (
            latents.pow(2).sum(dim=1, keepdim=True)
            - 2 * latents @ codebook.t()
            + codebook.pow(2).sum(dim=1).unsqueeze(0)
        )
        return distances.argmin(dim=1)

    @torch.no_grad()
    def seed_from_data_if_needed(self, latents: torch.Tensor) -> None:
        """On the first training step, seed every code from the batch's latents (M, D) if configured to."""
        if self.initialize_from_data and not bool(self.initialized):
            self._seed_codes(torch.arange(self.num_codes, device=latents.device), latents.detach().float())
            self.initialized.fill_(1)

    @torch.no_grad()
    def update(self, latents: torch.Tensor, codes: torch.Tensor) -> int:
        """One EMA step of the codebook from latents (M, D) and their codes (M,); returns the dead-code count
        measured before revival. Call only in training."""
        latents = latents.detach().float()
        assignments = F.one_hot(codes, self.num_codes).float()
        counts = assignments.sum(dim=0)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embedding_sum.mul_(self.decay).add_(assignments.t() @ latents, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed_size = (self.cluster_size + self.epsilon) / (total + self.num_codes * self.epsilon) * total
        self.codebook.copy_(self.embedding_sum / smoothed_size.unsqueeze(1))
        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        dead_codes = (self.steps_since_used >= self.dead_code_threshold_steps).nonzero().flatten()
        if self.revive_dead_codes and dead_codes.numel() > 0:
            self._seed_codes(dead_codes, latents)
        return int(dead_codes.numel())

    def _seed_codes(self, code_indices: torch.Tensor, latents: torch.Tensor) -> None:
        """Re-seed the given codes from randomly chosen latents, with fresh EMA statistics of one assignment."""
        replace = latents.shape[0] < code_indices.numel()
        chosen = torch.multinomial(
            torch.ones(latents.shape[0], device=latents.device), code_indices.numel(), replacement=replace
        )
        seeds = latents[chosen]
        if replace:
            # Duplicated latents would create identical codes that split the same data forever: jitter them.
            seeds = seeds + 1e-3 * seeds.std() * torch.randn_like(seeds)
        self.codebook[code_indices] = seeds.to(self.codebook.dtype)
        self.embedding_sum[code_indices] = seeds.to(self.embedding_sum.dtype)
        self.cluster_size[code_indices] = 1.0
        self.steps_since_used[code_indices] = 0


class PerceptioDepthTokenizerPreTrainedModel(PreTrainedModel):
    """Base class: config class, weight initialisation that leaves loaded EMA statistics untouched."""

    config_class = PerceptioDepthTokenizerConfig
    config: PerceptioDepthTokenizerConfig
    base_model_prefix = "depth_tokenizer"
    main_input_name = "depth"
    input_modalities = ("image",)
    # The composite loss is already a mean; Trainer must not rescale it by the number of items.
    accepts_loss_kwargs = False
    # No attention layers: the attention kernel a Perceptio model is loaded with ("sdpa", "flash_attention_2"…) is the
    # other parts' choice and must not be refused here.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            # PyTorch's default convolution init: a small fixed std would shrink the signal through the deep stack.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            init.zeros_(module.bias)
        elif isinstance(module, PerceptioDepthVectorQuantizer):
            # `init.*` skip tensors that were loaded from a checkpoint, so saved statistics survive.
            init.uniform_(module.codebook, -1.0 / module.num_codes, 1.0 / module.num_codes)
            init.copy_(module.embedding_sum, module.codebook)
            # One assignment per code makes codebook == embedding_sum / cluster_size from the first step.
            init.ones_(module.cluster_size)
            init.zeros_(module.steps_since_used)
            init.zeros_(module.initialized)


class PerceptioDepthTokenizer(PerceptioDepthTokenizerPreTrainedModel):
    """VQ-VAE depth tokenizer: `encode` depth maps to codes, `decode` codes (or `decode_soft` code logits) to maps.

    `encode`, `decode` and `decode_soft` never change the model; the codebook's EMA updates and dead-code revival
    happen only in `forward` in training mode.
    """

    def __init__(self, config: PerceptioDepthTokenizerConfig):
        super().__init__(config)
        self.encoder = PerceptioDepthEncoder(config)
        self.quantizer = PerceptioDepthVectorQuantizer(config)
        self.decoder = PerceptioDepthDecoder(config)
        self.post_init()

    @property
    def codebook(self) -> torch.Tensor:
        """The (K, D) codebook."""
        return self.quantizer.codebook

    def normalize(self, depth: torch.Tensor) -> tuple[torch.Tensor, PerceptioDepthNormalization]:
        """Resize relative inverse depth (B, H, W) or (B, 1, H, W) to `image_size` and min-max it to [-1, 1] per
        image; constant maps become 0. Returns the (B, image_size, image_size) map and what `denormalize` needs."""
        depth = self._validated_depth(depth)
        original_size = (depth.shape[-2], depth.shape[-1])
        side = self.config.image_size
        if original_size != (side, side):
            # Antialiasing averages the pixels a shrink drops, so thin structures do not alias.
            depth = F.interpolate(depth, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        normalized, minimum, maximum = min_max_normalize(depth[:, 0])
        return normalized, PerceptioDepthNormalization(minimum, maximum, original_size)

    def denormalize(self, normalized: torch.Tensor, stats: PerceptioDepthNormalization) -> torch.Tensor:
        """Invert `normalize`: map [-1, 1] maps (B, image_size, image_size) back to each image's value range and
        original size."""
        if normalized.dim() != 3 or normalized.shape[0] != stats.minimum.shape[0]:
            raise ValueError(
                f"normalized must be (B, H, W) with B = {stats.minimum.shape[0]} as in stats, "
                f"got shape {tuple(normalized.shape)}."
            )
        value_range = (stats.maximum - stats.minimum).view(-1, 1, 1)
        depth = (normalized + 1) / 2 * value_range + stats.minimum.view(-1, 1, 1)
        if tuple(depth.shape[-2:]) != tuple(stats.original_size):
            depth = F.interpolate(depth.unsqueeze(1), size=stats.original_size, mode="bilinear", align_corners=False)
            depth = depth[:, 0]
        return depth

    @torch.no_grad()
    def encode(self, depth: torch.Tensor) -> torch.LongTensor:
        """Codes (B, N) in [0, K) of relative inverse depth maps (B, H, W) or (B, 1, H, W), H and W >= grid size."""
        normalized, _ = self.normalize(depth)
        latents = self._latent_rows(normalized)
        return self.quantizer.nearest_codes(latents).view(normalized.shape[0], self.config.num_tokens)

    def decode(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """Normalised depth (B, image_size, image_size) in [-1, 1] from codes (B, N) in [0, K)."""
        codes = self._validated_codes(codes)
        return self._decode_latent_rows(self.codebook[codes])

    def decode_soft(self, code_logits: torch.Tensor, tau: float = 1.0) -> torch.FloatTensor:
        """Normalised depth (B, image_size, image_size) from code logits (B, N, K): softmax(logits / tau) mixes the
        codebook entries that the decoder then decodes. Differentiable with respect to the logits; non-finite logits
        raise a `ValueError` outside training."""
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau > 0:
            raise ValueError(f"tau must be a positive number, got {tau!r}.")
        expected = (self.config.num_tokens, self.config.num_codes)
        if not torch.is_tensor(code_logits) or code_logits.dim() != 3 or tuple(code_logits.shape[1:]) != expected:
            shape = tuple(code_logits.shape) if torch.is_tensor(code_logits) else type(code_logits).__name__
            raise ValueError(f"code_logits must be a (B, {expected[0]}, {expected[1]}) tensor (B, N, K), got {shape}.")
        # Checked outside training only: the check syncs host and device, and in training a non-finite logit reaches
        # the output, so `loss_depth_recon` is non-finite and PerceptioTrainer stops on it, naming it.
        if not self.training and not torch.isfinite(code_logits).all():
            raise ValueError("code_logits contain NaN or infinite values.")
        weights = torch.softmax(code_logits.float() / tau, dim=-1)
        latents = weights @ self.codebook.float()
        return self._decode_latent_rows(latents)

    def forward(self, depth: torch.Tensor) -> PerceptioDepthTokenizerOutput:
        """Encode, quantise (straight-through) and decode `depth`; in training mode also update the codebook by EMA
        and revive dead codes. Returns losses and codebook statistics."""
        target, _ = self.normalize(depth)
        batch_size = target.shape[0]
        latents = self._latent_rows(target)
        if self.training:
            self.quantizer.seed_from_data_if_needed(latents)
        codes = self.quantizer.nearest_codes(latents.detach())
        if self.training:
            dead_code_count = self.quantizer.update(latents, codes)
        else:
            dead_code_count = int((self.quantizer.steps_since_used >= self.config.dead_code_threshold_steps).sum())
        quantized = self.codebook[codes].to(latents.dtype)
        commitment_loss = F.mse_loss(latents, quantized.detach())
        # Straight-through estimator: the decoder's gradient reaches the encoder as if quantisation were identity.
        straight_through = latents + (quantized - latents).detach()
        reconstruction = self._decode_latent_rows(
            straight_through.view(batch_size, self.config.num_tokens, -1), clamp=False
        )
        reconstruction_loss = self._reconstruction_loss(reconstruction, target)
        codes = codes.view(batch_size, self.config.num_tokens)
        return PerceptioDepthTokenizerOutput(
            loss=reconstruction_loss + self.config.commitment_cost * commitment_loss,
            reconstruction=reconstruction,
            target=target,
            codes=codes,
            reconstruction_loss=reconstruction_loss,
            commitment_loss=commitment_loss,
            perplexity=torch.tensor(self.codebook_statistics(codes).perplexity, device=target.device),
            dead_code_count=torch.tensor(dead_code_count, device=target.device),
        )

    def codebook_statistics(self, codes: torch.Tensor) -> PerceptioDepthCodebookStatistics:
        """Usage histogram, perplexity and fraction of codes in use of `codes` (any shape, values in [0, K))."""
        codes = self._validated_code_values(codes)
        histogram = torch.bincount(codes.flatten(), minlength=self.config.num_codes)
        probabilities = histogram.float() / histogram.sum().clamp_min(1)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum()
        return PerceptioDepthCodebookStatistics(
            histogram=histogram,
            perplexity=float(entropy.exp()),
            usage_fraction=float((histogram > 0).float().mean()),
        )

    def _latent_rows(self, normalized: torch.Tensor) -> torch.Tensor:
        """Encoder outputs of normalised maps (B, S, S) as rows (B * N, D), in grid raster order."""
        latents = self.encoder(normalized.unsqueeze(1).to(self.dtype))
        return latents.permute(0, 2, 3, 1).reshape(-1, self.config.codebook_dim)

    def _decode_latent_rows(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Decode latents (B, N, D) in grid raster order to (B, S, S); clamp to the normalised range [-1, 1]."""
        grid = self.config.grid_size
        latents = latents.reshape(latents.shape[0], grid, grid, self.config.codebook_dim).permute(0, 3, 1, 2)
        depth = self.decoder(latents.to(self.dtype))[:, 0]
        return depth.clamp(-1.0, 1.0) if clamp else depth

    def _reconstruction_loss(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.config.reconstruction_loss_type == "mse":
            return F.mse_loss(reconstruction, target.to(reconstruction.dtype))
        return F.l1_loss(reconstruction, target.to(reconstruction.dtype))

    def _validated_depth(self, depth: torch.Tensor) -> torch.Tensor:
        """Check a depth batch and return it as a float (B, C, H, W) tensor on the model's device."""
        if not torch.is_tensor(depth):
            raise ValueError(
                f"depth must be a torch.Tensor of shape (B, H, W) or (B, 1, H, W), got {type(depth).__name__}."
            )
        if depth.dim() == 3:
            depth = depth.unsqueeze(1)
        if depth.dim() != 4:
            raise ValueError(f"depth must have shape (B, H, W) or (B, C, H, W), got {tuple(depth.shape)}.")
        if depth.shape[1] != self.config.num_channels:
            raise ValueError(
                f"depth must have {self.config.num_channels} channel(s), got {depth.shape[1]} "
                f"(shape {tuple(depth.shape)})."
            )
        if depth.shape[0] == 0:
            raise ValueError("depth is an empty batch.")
        grid = self.config.grid_size
        if depth.shape[-2] < grid or depth.shape[-1] < grid:
            raise ValueError(
                f"depth maps must be at least {grid}x{grid} (the code grid), got {depth.shape[-2]}x{depth.shape[-1]}."
            )
        if depth.is_complex() or depth.dtype == torch.bool:
            raise ValueError(f"depth must be real-valued, got dtype {depth.dtype}.")
        depth = depth.to(device=self.device, dtype=torch.float32)
        if not torch.isfinite(depth).all():
            raise ValueError("depth contains NaN or infinite values.")
        return depth

    def _validated_code_values(self, codes: torch.Tensor) -> torch.Tensor:
        if (
            not torch.is_tensor(codes)
            or codes.dtype.is_floating_point
            or codes.is_complex()
            or codes.dtype == torch.bool
        ):
            raise ValueError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}.")
        if codes.numel() > 0 and (codes.min() < 0 or codes.max() >= self.config.num_codes):
            raise ValueError(
                f"codes must be in [0, {self.config.num_codes}), got values from {int(codes.min())} to {int(codes.max())}."
            )
        return codes.to(device=self.codebook.device, dtype=torch.long)

    def _validated_codes(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self._validated_code_values(codes)
        if codes.dim() != 2 or codes.shape[1] != self.config.num_tokens or codes.shape[0] == 0:
            raise ValueError(f"codes must have shape (B, {self.config.num_tokens}), got {tuple(codes.shape)}.")
        return codes


__all__ = [
    "PerceptioDepthCodebookStatistics",
    "PerceptioDepthNormalization",
    "PerceptioDepthTokenizer",
    "PerceptioDepthTokenizerOutput",
    "PerceptioDepthTokenizerPreTrainedModel",
]
