"""PEFT presets: Sa2VA's LoRA recipe for Perceptio.

LoRA (r=128, α=256 by default) on the LLM's attention and MLP projections; the SAM2 mask decoder and
`text_hidden_fcs` trained in full (PEFT `modules_to_save`); the embedding and LM-head rows of the spatial tokens
(`[SEG]`, `<DEPTH_START>`, `<DEPTH_END>`, `<DEPTH_k>`) trained in full (PEFT `trainable_token_indices`), every other
row frozen; vision tower, projector, SAM2 image encoder and depth tokenizer frozen. A model with `[SEG]` attribute
heads trains each head in full as well (they are small, and exist only for `loss_seg_attribute`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model

from perceptio.models.perceptio.modeling_perceptio import PerceptioForConditionalGeneration


# The language model's projections only: the vision tower and SAM2 also have modules named `q_proj`.
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLM_LAYERS_PATTERN = r"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{})"
FULLY_TRAINED_MODULES = ("mask_decoder", "text_hidden_fcs")
EMBEDDING_MODULE = "embed_tokens"
LM_HEAD_MODULE = "lm_head"


@dataclass
class PerceptioLoraPreset:
    """The knobs of the LoRA recipe (defaults: Sa2VA's).

    Attributes:
        r: LoRA rank.
        alpha: LoRA scaling numerator (effective scale alpha / r).
        dropout: dropout on the LoRA input.
        projections: LLM projection names that get LoRA.
        fully_trained_modules: module names trained in full and saved with the adapter.
        train_spatial_token_rows: train the spatial tokens' embedding and LM-head rows.
    """

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    projections: tuple[str, ...] = LLM_PROJECTIONS
    fully_trained_modules: tuple[str, ...] = FULLY_TRAINED_MODULES
    train_spatial_token_rows: bool = True

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        unknown = sorted(set(self.projections) - set(LLM_PROJECTIONS))
        if not self.projections or unknown:
            raise ValueError(f"projections must be a non-empty subset of {LLM_PROJECTIONS}, got {self.projections!r}.")


def spatial_token_ids(model: PerceptioForConditionalGeneration) -> list[int]:
    """Ids of `[SEG]`, `<DEPTH_START>`, `<DEPTH_END>` and the K code tokens that the config defines."""
    vocabulary = model.config.spatial_vocabulary
    return [] if vocabulary is None else vocabulary.spatial_token_ids


def seg_attribute_head_names(model: PerceptioForConditionalGeneration) -> list[str]:
    """The module names of the model's `[SEG]` attribute heads (none without heads), one per head: PEFT wraps each
    `nn.Linear`, where wrapping their `ModuleList` would hide the heads from the loss that iterates over them."""
    heads = model.seg_attribute_heads
    return [] if heads is None else [f"seg_attribute_heads.{index}" for index in range(len(heads))]


def perceptio_lora_config(
    model: PerceptioForConditionalGeneration, preset: PerceptioLoraPreset | None = None
) -> LoraConfig:
    """The `LoraConfig` of `preset` for `model`."""
    preset = preset or PerceptioLoraPreset()
    if not isinstance(model, PerceptioForConditionalGeneration):
        raise ValueError(f"model must be a PerceptioForConditionalGeneration, got {type(model).__name__}.")
    trainable_tokens = None
    if preset.train_spatial_token_rows:
        token_ids = spatial_token_ids(model)
        if not token_ids:
            raise ValueError("train_spatial_token_rows is set but the model's config defines no spatial token ids.")
        trainable_tokens = {EMBEDDING_MODULE: token_ids}
        if not model.config.tie_word_embeddings:
            trainable_tokens[LM_HEAD_MODULE] = token_ids
    return LoraConfig(
        r=preset.r,
        lora_alpha=preset.alpha,
        lora_dropout=preset.dropout,
        target_modules=LLM_LAYERS_PATTERN.format("|".join(preset.projections)),
        modules_to_save=[*preset.fully_trained_modules, *seg_attribute_head_names(model)],
        trainable_token_indices=trainable_tokens,
        task_type=None,
    )


def apply_perceptio_lora(
    model: PerceptioForConditionalGeneration, preset: PerceptioLoraPreset | None = None
) -> PeftModel:
    """Wrap `model` with the LoRA preset; everything outside the adapter, the fully trained modules and the spatial
    token rows is frozen."""
    return get_peft_model(model, perceptio_lora_config(model, preset))


def load_perceptio_adapter(
    model: PerceptioForConditionalGeneration, adapter_path: str | os.PathLike, is_trainable: bool = False
) -> PeftModel:
    """Load an adapter saved with `PeftModel.save_pretrained` onto a base Perceptio model."""
    if not os.path.isfile(os.path.join(adapter_path, "adapter_config.json")):
        raise ValueError(f"{str(adapter_path)!r} is not a saved adapter folder (no adapter_config.json).")
    return PeftModel.from_pretrained(model, adapter_path, is_trainable=is_trainable)


def merge_perceptio_adapter(peft_model: PeftModel) -> PerceptioForConditionalGeneration:
    """Fold the LoRA weights, fully trained modules and token rows into the base model and return it."""
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}.")
    return peft_model.merge_and_unload()


__all__ = [
    "PerceptioLoraPreset",
    "apply_perceptio_lora",
    "load_perceptio_adapter",
    "merge_perceptio_adapter",
    "perceptio_lora_config",
    "spatial_token_ids",
]
