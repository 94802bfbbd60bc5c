"""Configuration of Perceptio: InternVL plus a SAM2 grounding encoder, a depth tokenizer and spatial tokens."""

from __future__ import annotations

from transformers import InternVLConfig, PreTrainedConfig, Sam2Config
from transformers.configuration_utils import SubConfigSpec

from .configuration_perceptio_depth_tokenizer import PerceptioDepthTokenizerConfig
from .loss_perceptio import loss_weight_fields
from .spatial_vocabulary_perceptio import PerceptioSpatialVocabulary
from .vision_stem_perceptio import stem_patch_size


LM_LOSS_REDUCTIONS = ("token", "segment")
SPATIAL_TOKEN_ID_FIELDS = ("seg_token_id", "depth_start_token_id", "depth_end_token_id", "depth_code_token_offset")


class PerceptioConfig(InternVLConfig):
    r"""
    Configuration of [`PerceptioForConditionalGeneration`].

    Everything of [`InternVLConfig`] (vision tower, text model, projector, image tokens) plus:

    Args:
        sam2_config (`Sam2Config` or `dict`): the SAM2 model whose mask decoder the `[SEG]` hidden states prompt.
        depth_tokenizer_config (`PerceptioDepthTokenizerConfig` or `dict`, *optional*): the VQ-VAE whose codes are
            the depth tokens. `None` makes a segmentation-only model: depth features then raise a `ValueError`.
        seg_token_id (`int`, *optional*): id of `[SEG]`.
        depth_start_token_id, depth_end_token_id (`int`, *optional*): ids of `<DEPTH_START>` and `<DEPTH_END>`.
        depth_code_token_offset (`int`, *optional*): id of `<DEPTH_0>`; code `k` has id `offset + k`.
        num_depth_codes (`int`, defaults to 128): K, the number of depth code tokens (the codebook size).
        num_depth_tokens (`int`, defaults to 100): N, the number of codes in one depth block (the code grid size).
            A segmentation-only vocabulary has `num_depth_codes=0`, `num_depth_tokens=0` and no depth token ids.
            The token fields together are `spatial_vocabulary`, which checks them against each other.
        mask_loss_weight (`float`, defaults to 1.0): λ_mask in the total loss. Each `*_loss_weight` field is the λ of
            one term of `LOSS_TERMS` (`loss_perceptio.py`), which sums them.
        mask_bce_weight, mask_dice_weight (`float`, defaults to 2.0 and 0.5): weights inside `loss_mask`.
        mask_dice_epsilon (`float`, defaults to 1.0): smoothing of the Dice loss.
        mask_iou_loss_weight (`float`, defaults to 1.0): λ of `loss_mask_iou`, the MSE that trains SAM2's IoU head (it
            picks the best of the multimask candidates at inference).
        sam2_multimask_output (`bool`, defaults to True): decode each `[SEG]` into SAM2's three candidates and keep
            the one with the best predicted IoU, as Sa2VA does (its SAM2 takes the multimask path whenever no point
            prompt is given), or, when False, into SAM2's single-mask output; single is the better choice when SAM2 is
            trained from scratch, whose IoU head cannot yet rank candidates.
        depth_marker_loss_weight, depth_token_loss_weight, depth_count_loss_weight, depth_recon_loss_weight
            (`float`, defaults to 1.0): λ of the four depth-token objectives.
        depth_soft_merge_temperature (`float`, defaults to 1.0): τ of the soft-merged depth reconstruction.
        lm_loss_reduction (`str`, defaults to "token"): how `loss_lm` averages the next-token cross-entropy. "token":
            over all supervised tokens of the batch (transformers' convention). "segment": first within each segment
            of a sample (its depth block, and its other answer tokens), then over the segments of the batch, so a
            64-code depth block weighs as much as a one-word answer instead of 64 times more.
        seg_attribute_classes (`list[int]`, *optional*): the number of classes of each attribute a referring phrase
            names (for the synthetic scenes: colour, shape and size, each plus "not named"). When set, the model has
            one linear head per attribute on the `[SEG]` hidden states (`seg_attribute_heads`), and `forward` takes
            `seg_attributes` labels: `loss_seg_attribute` then asks each `[SEG]` state to carry what its phrase names,
            which the language-model loss never asks for. `None` (the default): no heads.
        seg_attribute_loss_weight (`float`, defaults to 1.0): λ of `loss_seg_attribute`.
        seg_prompt_loss_weight (`float`, defaults to 1.0): λ of `loss_seg_prompt`, which pulls each `[SEG]`'s SAM2
            prompt toward a target prompt when `forward` is given `seg_prompt_targets` (0 otherwise).
        vision_stem_channels (`list[int]`, *optional*): the widths of a convolutional stem that replaces the vision
            tower's patch projection: 3×3 stride-2 convolutions, one per width plus one to the tower's hidden size, so
            the vision config's patch size must be `2 ** (len(vision_stem_channels) + 1)`. For towers trained from
            scratch, which learn shapes slowly through one patch-sized linear map. `None` (the default): InternViT's
            patch projection, as released checkpoints have.
    """

    model_type = "perceptio"
    sub_configs_defaults = {
        **InternVLConfig.sub_configs_defaults,
        "sam2_config": SubConfigSpec(Sam2Config),
        "depth_tokenizer_config": SubConfigSpec(PerceptioDepthTokenizerConfig, optional=True),
    }

    sam2_config: dict | PreTrainedConfig | None = None
    depth_tokenizer_config: dict | PreTrainedConfig | None = None
    seg_token_id: int | None = None
    depth_start_token_id: int | None = None
    depth_end_token_id: int | None = None
    depth_code_token_offset: int | None = None
    num_depth_codes: int = 128
    num_depth_tokens: int = 100
    mask_loss_weight: float | int = 1.0
    mask_bce_weight: float | int = 2.0
    mask_dice_weight: float | int = 0.5
    mask_dice_epsilon: float | int = 1.0
    mask_iou_loss_weight: float | int = 1.0
    sam2_multimask_output: bool = True
    depth_marker_loss_weight: float | int = 1.0
    depth_token_loss_weight: float | int = 1.0
    depth_count_loss_weight: float | int = 1.0
    depth_recon_loss_weight: float | int = 1.0
    depth_soft_merge_temperature: float | int = 1.0
    lm_loss_reduction: str = "token"
    seg_attribute_classes: list[int] | None = None
    seg_attribute_loss_weight: float | int = 1.0
    seg_prompt_loss_weight: float | int = 1.0
    vision_stem_channels: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_spatial_tokens()

    @property
    def has_depth_tokenizer(self) -> bool:
        """Whether this checkpoint carries a depth tokenizer (and so can read and write depth blocks)."""
        return self.depth_tokenizer_config is not None

    @property
    def spatial_vocabulary(self) -> PerceptioSpatialVocabulary | None:
        """The spatial token ids and the format's rules; `None` while no spatial token id is set (a config not yet
        tied to a tokenizer)."""
        if all(getattr(self, name) is None for name in SPATIAL_TOKEN_ID_FIELDS):
            return None
        return PerceptioSpatialVocabulary.from_config(self)

    def check_spatial_tokens(self) -> None:
        """Raise a `ValueError` naming the field when the spatial-token fields disagree with each other."""
        if self.lm_loss_reduction not in LM_LOSS_REDUCTIONS:
            raise ValueError(f"lm_loss_reduction must be one of {LM_LOSS_REDUCTIONS}, got {self.lm_loss_reduction!r}.")
        classes = self.seg_attribute_classes
        if classes is not None and (
            not isinstance(classes, (list, tuple))
            or not classes
            or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 2 for size in classes)
        ):
            raise ValueError(
                f"seg_attribute_classes must be None or a non-empty list of class counts >= 2, got {classes!r}."
            )
        self.check_vision_stem()
        if not isinstance(self.sam2_multimask_output, bool):
            raise ValueError(f"sam2_multimask_output must be True or False, got {self.sam2_multimask_output!r}.")
        if self.num_depth_tokens is None:
            raise ValueError("num_depth_tokens must be a positive integer (0 without depth block), got None.")
        PerceptioSpatialVocabulary.check_sizes(self.num_depth_codes, self.num_depth_tokens)
        for name in (*loss_weight_fields(), "mask_bce_weight", "mask_dice_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if self.mask_dice_epsilon <= 0 or self.depth_soft_merge_temperature <= 0:
            raise ValueError(
                "mask_dice_epsilon and depth_soft_merge_temperature must be > 0, got "
                f"{self.mask_dice_epsilon!r} and {self.depth_soft_merge_temperature!r}."
            )
        if self.depth_tokenizer_config is not None:
            tokenizer_config = self.depth_tokenizer_config
            if self.num_depth_tokens != tokenizer_config.num_tokens:
                raise ValueError(
                    f"num_depth_tokens ({self.num_depth_tokens}) must equal the depth tokenizer's grid size "
                    f"({tokenizer_config.grid_size}x{tokenizer_config.grid_size} = {tokenizer_config.num_tokens})."
                )
            if self.num_depth_codes != tokenizer_config.num_codes:
                raise ValueError(
                    f"num_depth_codes ({self.num_depth_codes}) must equal the depth tokenizer's codebook size "
                    f"({tokenizer_config.num_codes})."
                )
        vocab_size = self.text_config.vocab_size
        for name in SPATIAL_TOKEN_ID_FIELDS:
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab_size:
                raise ValueError(f"{name} ({value}) must lie inside the vocabulary [0, {vocab_size}).")
        if (
            self.depth_code_token_offset is not None
            and self.depth_code_token_offset + self.num_depth_codes > vocab_size
        ):
            raise ValueError(
                f"depth code ids [{self.depth_code_token_offset}, {self.depth_code_token_offset + self.num_depth_codes})"
                f" must lie inside the vocabulary [0, {vocab_size}): depth_code_token_offset + num_depth_codes is too "
                "large."
            )
        # Building the vocabulary checks the ids against each other: distinct, outside the codes, complete.
        _ = self.spatial_vocabulary

    def check_vision_stem(self) -> None:
        """Raise a `ValueError` when `vision_stem_channels` is malformed or disagrees with the patch size."""
        channels = self.vision_stem_channels
        if channels is None:
            return
        if not isinstance(channels, (list, tuple)) or not all(
            isinstance(width, int) and not isinstance(width, bool) and width > 0 for width in channels
        ):
            raise ValueError(f"vision_stem_channels must be None or a list of positive widths, got {channels!r}.")
        patch_size = self.vision_config.patch_size
        patch_size = tuple(patch_size) if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
        side = stem_patch_size(list(channels))
        if patch_size != (side, side):
            raise ValueError(
                f"vision_stem_channels {list(channels)} makes {side}-pixel patches, but the vision config's patch_size "
                f"is {patch_size}; give log2(patch_size) - 1 widths."
            )


__all__ = ["PerceptioConfig"]
