"""Configuration of the Perceptio depth tokenizer: a VQ-VAE that turns a depth map into N discrete codes."""

from __future__ import annotations

from transformers import PreTrainedConfig


RECONSTRUCTION_LOSS_TYPES = ("l1", "mse")


class PerceptioDepthTokenizerConfig(PreTrainedConfig):
    r"""
    Configuration of [`PerceptioDepthTokenizer`], the VQ-VAE whose codes are Perceptio's depth tokens.

    The defaults follow Aurora's depth tokenizer: a 320x320 single-channel map normalised per image to [-1, 1],
    five stride-2 4x4 convolutions (1 -> 16 -> 32 -> 64 -> 128 -> 256), two residual blocks, a 1x1 projection to a
    512-dimensional codebook of 128 entries updated by exponential moving averages, so each map becomes a 10x10
    grid of N = 100 codes. The decoder mirrors the encoder.

    Args:
        image_size (`int`, defaults to 320): side of the square map the tokenizer works on.
        num_channels (`int`, defaults to 1): channels of the depth map (relative inverse depth: one).
        hidden_channels (`list[int]`, defaults to `[16, 32, 64, 128, 256]`): output channels of each stride-2
            4x4 convolution; its length sets the downsampling factor `2 ** len(hidden_channels)`.
        num_residual_blocks (`int`, defaults to 2): residual blocks after the convolutions (and mirrored before
            the decoder's transposed convolutions).
        codebook_dim (`int`, defaults to 512): dimension D of each codebook entry.
        num_codes (`int`, defaults to 128): number K of codebook entries.
        ema_decay (`float`, defaults to 0.99): decay of the exponential moving averages that update the codebook.
        commitment_cost (`float`, defaults to 0.25): weight of the commitment loss pulling encoder outputs to
            their codes.
        epsilon (`float`, defaults to 1e-5): Laplace smoothing of EMA cluster sizes, so no code divides by zero.
        revive_dead_codes (`bool`, defaults to `True`): re-seed codes that went unused from recent encoder outputs.
        dead_code_threshold_steps (`int`, defaults to 100): training steps a code may go unused before it is
            revived.
        initialize_codebook_from_data (`bool`, defaults to `True`): seed the codebook from the encoder outputs of
            the first training batch instead of keeping its random initialisation, so training starts with every
            code near the data.
        reconstruction_loss_type (`str`, defaults to `"l1"`): `"l1"` or `"mse"` between reconstruction and input.
    """

    model_type = "perceptio_depth_tokenizer"

    image_size: int = 320
    num_channels: int = 1
    hidden_channels: list[int] | None = None
    num_residual_blocks: int = 2
    codebook_dim: int = 512
    num_codes: int = 128
    ema_decay: float = 0.99
    commitment_cost: float = 0.25
    epsilon: float = 1e-5
    revive_dead_codes: bool = True
    dead_code_threshold_steps: int = 100
    initialize_codebook_from_data: bool = True
    reconstruction_loss_type: str = "l1"

    def __post_init__(self, **kwargs):
        self.hidden_channels = (
            list(self.hidden_channels) if self.hidden_channels is not None else [16, 32, 64, 128, 256]
        )
        self._validate_sizes()
        self._validate_rates()
        super().__post_init__(**kwargs)

    def _validate_sizes(self) -> None:
        for name in ("image_size", "num_channels", "codebook_dim", "num_codes", "dead_code_threshold_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.num_residual_blocks, int) or self.num_residual_blocks < 0:
            raise ValueError(f"num_residual_blocks must be a non-negative integer, got {self.num_residual_blocks!r}.")
        if not self.hidden_channels or any(
            not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0
            for channels in self.hidden_channels
        ):
            raise ValueError(
                f"hidden_channels must be a non-empty list of positive integers, got {self.hidden_channels!r}."
            )
        downsampling = 2 ** len(self.hidden_channels)
        if self.image_size % downsampling != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by 2 ** len(hidden_channels) = {downsampling}, "
                "so the code grid is whole."
            )

    def _validate_rates(self) -> None:
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}.")
        if self.commitment_cost < 0.0:
            raise ValueError(f"commitment_cost must be >= 0, got {self.commitment_cost!r}.")
        if self.epsilon <= 0.0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon!r}.")
        if self.reconstruction_loss_type not in RECONSTRUCTION_LOSS_TYPES:
            raise ValueError(
                f"reconstruction_loss_type must be one of {RECONSTRUCTION_LOSS_TYPES}, "
                f"got {self.reconstruction_loss_type!r}."
            )

    @property
    def grid_size(self) -> int:
        """Side of the code grid: `image_size // 2 ** len(hidden_channels)` (10 with the defaults)."""
        return self.image_size // 2 ** len(self.hidden_channels)

    @property
    def num_tokens(self) -> int:
        """Number N of codes per depth map: `grid_size ** 2` (100 with the defaults)."""
        return self.grid_size**2


__all__ = ["PerceptioDepthTokenizerConfig"]
