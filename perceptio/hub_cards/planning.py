"""Presets of full-size Perceptio models and a dry-run planner: parameter counts and memory, with no weights.

The planner builds the model on the meta device (shapes only, no memory), counts the parameters of each component,
and estimates the memory of inference and of LoRA / full fine-tuning in bf16 with AdamW:

- inference: every weight in bf16 (2 bytes each), except the depth tokenizer's, which a bf16 load keeps in float32
  (4), and integer buffers at their own size;
- fine-tuning: inference + for each trainable parameter its bf16 gradient (2), fp32 master copy (4) and Adam
  moments (8) — 14 bytes — plus, for LoRA, the bf16 adapter weights themselves (2).

Activations (which grow with batch size, sequence length and image tiles) and the KV cache are not included.

Preset sources (the numbers are written here so planning needs no download):

- `perceptio-8b`: OpenGVLab/InternVL3-8B-hf = InternViT-300M-448px-V2.5 + Qwen2.5-7B text model. Text numbers from
  the InternVL3-8B model description in Ascend/MindSpeed-MM `examples/internvl3/model_8B.json` (28 layers, hidden
  3584, MLP 18944, 28 heads, 4 KV heads, vocab 151674, rope θ 1e6, qkv bias), untied LM head (Qwen2.5-7B).
- `perceptio-4b`: OpenGVLab/InternVL2_5-4B-MPO-hf (the transformers conversion of InternVL2.5-4B; InternVL3 has no
  4B model) = InternViT-300M-448px-V2.5 + Qwen2.5-3B-Instruct text model (36 layers, hidden 2048, MLP 11008, 16
  heads, 2 KV heads, from Qwen/Qwen2.5-3B-Instruct's config.json), with InternVL's 151674-token vocabulary; the
  LM head is assumed untied (InternVL resizes the vocabulary), not checked against the released file.
- vision tower: InternViT-300M-448px-V2.5 (24 layers, hidden 1024, 16 heads, MLP 4096, 448 px, patch 14, qkv bias),
  which transformers' `InternVLVisionConfig` defaults also describe.
- SAM2: facebook/sam2.1-hiera-large, from the `sam2` package's `configs/sam2.1/sam2.1_hiera_l.yaml` (Hiera embed 144,
  heads 2, stages [2, 6, 36, 4], global blocks [23, 33, 43], windows [8, 4, 16, 8], background 7×7) and its
  hard-coded SAM heads (256-d prompt encoder and mask decoder, MLP 2048, 8 heads, IoU head 256).
- depth tokenizer: `PerceptioDepthTokenizerConfig()` defaults (320², 10×10 grid: N = 100, K = 128).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Sam2Config

from ..models.perceptio import PerceptioConfig, PerceptioDepthTokenizerConfig, PerceptioForConditionalGeneration
from ..models.perceptio.spatial_vocabulary_perceptio import spatial_tokens
from ..trainers.peft_presets import LLM_LAYERS_PATTERN, PerceptioLoraPreset


BF16_BYTES = 2
FP32_BYTES = 4
# Per trainable parameter: bf16 gradient + fp32 master weight + two fp32 Adam moments.
OPTIMIZER_BYTES_PER_TRAINABLE = 2 + 4 + 8
GIB = 1024**3
INTERNVL_VOCAB_SIZE = 151674
INTERNVL_IMAGE_CONTEXT_ID = 151667
INTERNVIT_300M = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "image_size": [448, 448],
    "patch_size": [14, 14],
    "attention_bias": True,
}
# Component name -> the module path prefix it covers (the parameter name starts with it).
COMPONENTS = {
    "vision_tower": "model.vision_tower.",
    "multi_modal_projector": "model.multi_modal_projector.",
    "language_model": "model.language_model.",
    "lm_head": "lm_head.",
    "grounding_encoder (SAM2)": "grounding_encoder.",
    "text_hidden_fcs": "text_hidden_fcs.",
    "depth_tokenizer": "depth_tokenizer.",
}


def sam2_1_hiera_large_config() -> Sam2Config:
    """transformers' config of facebook/sam2.1-hiera-large (see the module docstring for the source)."""
    return Sam2Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 144,
                "num_attention_heads": 2,
                "blocks_per_stage": [2, 6, 36, 4],
                "embed_dim_per_stage": [144, 288, 576, 1152],
                "num_attention_heads_per_stage": [2, 4, 8, 16],
                "window_size_per_stage": [8, 4, 16, 8],
                "global_attention_blocks": [23, 33, 43],
                "window_positional_embedding_background_size": [7, 7],
            },
            "backbone_channel_list": [1152, 576, 288, 144],
        },
    )


@dataclass(frozen=True)
class PerceptioPreset:
    """A full-size Perceptio: which released parts it is built from, and their configurations."""

    name: str
    base_model_id: str
    sam2_model_id: str
    text_config: dict = field(default_factory=dict)

    def config(self) -> PerceptioConfig:
        """The PerceptioConfig `perceptio build` makes from these parts (spatial tokens after the base vocabulary)."""
        depth_config = PerceptioDepthTokenizerConfig()
        added = [token for token in spatial_tokens(depth_config.num_codes) if token not in BASE_SPECIAL_TOKENS]
        offset = INTERNVL_VOCAB_SIZE
        seg, depth_start, depth_end = offset, offset + 1, offset + 2
        return PerceptioConfig(
            text_config={**self.text_config, "vocab_size": INTERNVL_VOCAB_SIZE + len(added)},
            vision_config=INTERNVIT_300M,
            image_token_id=INTERNVL_IMAGE_CONTEXT_ID,
            image_seq_length=256,
            downsample_ratio=0.5,
            tie_word_embeddings=self.text_config.get("tie_word_embeddings", False),
            sam2_config=sam2_1_hiera_large_config(),
            depth_tokenizer_config=depth_config,
            seg_token_id=seg,
            depth_start_token_id=depth_start,
            depth_end_token_id=depth_end,
            depth_code_token_offset=depth_end + 1,
            num_depth_codes=depth_config.num_codes,
            num_depth_tokens=depth_config.num_tokens,
        )


# InternVL's tokenizers already have the image tokens; Perceptio adds the rest.
BASE_SPECIAL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")
QWEN2_COMMON = {"model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768}
PRESETS = {
    "perceptio-4b": PerceptioPreset(
        name="perceptio-4b",
        base_model_id="OpenGVLab/InternVL2_5-4B-MPO-hf",
        sam2_model_id="facebook/sam2.1-hiera-large",
        text_config={
            **QWEN2_COMMON,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
        },
    ),
    "perceptio-8b": PerceptioPreset(
        name="perceptio-8b",
        base_model_id="OpenGVLab/InternVL3-8B-hf",
        sam2_model_id="facebook/sam2.1-hiera-large",
        text_config={
            **QWEN2_COMMON,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "tie_word_embeddings": False,
        },
    ),
}


def get_preset(name: str) -> PerceptioPreset:
    """The preset called `name`, or a `ValueError` listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]


@dataclass
class BuildPlan:
    """Parameter counts and memory estimates of one Perceptio configuration (bytes; activations excluded)."""

    component_parameters: dict[str, int]
    total_parameters: int
    lora_trainable_parameters: int
    full_trainable_parameters: int
    inference_bytes: int
    lora_bytes: int
    full_bytes: int

    def describe(self, title: str = "Perceptio") -> str:
        """A printable table of the plan."""
        lines = [f"{title}: parameters per component"]
        for name, count in self.component_parameters.items():
            lines.append(f"  {name:<26} {count:>15,}")
        lines.append(f"  {'total':<26} {self.total_parameters:>15,}")
        lines.append("memory in bf16, weights + optimizer states (AdamW), activations excluded:")
        lines.append(f"  {'inference':<26} {self.inference_bytes / GIB:>11.2f} GiB")
        lines.append(
            f"  {'LoRA fine-tuning':<26} {self.lora_bytes / GIB:>11.2f} GiB "
            f"({self.lora_trainable_parameters:,} trainable)"
        )
        lines.append(
            f"  {'full fine-tuning':<26} {self.full_bytes / GIB:>11.2f} GiB "
            f"({self.full_trainable_parameters:,} trainable)"
        )
        return "\n".join(lines)


def build_on_meta(config: PerceptioConfig) -> PerceptioForConditionalGeneration:
    """The model with every parameter and buffer on the meta device (shapes only; no memory)."""
    if not isinstance(config, PerceptioConfig):
        raise ValueError(f"config must be a PerceptioConfig, got {type(config).__name__}.")
    with torch.device("meta"):
        return PerceptioForConditionalGeneration(config)


def component_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per component of `COMPONENTS`; a `ValueError` if some parameter belongs to none."""
    counts = dict.fromkeys(COMPONENTS, 0)
    # named_parameters yields a tied parameter once, under its first name.
    for name, parameter in model.named_parameters():
        component = next((label for label, prefix in COMPONENTS.items() if name.startswith(prefix)), None)
        if component is None:
            raise ValueError(f"Parameter {name} belongs to no known component; update COMPONENTS.")
        counts[component] += parameter.numel()
    return counts


def lora_trainable_parameters(model: PerceptioForConditionalGeneration, preset: PerceptioLoraPreset) -> int:
    """Trainable parameters of `apply_perceptio_lora(model, preset)`, counted from shapes.

    LoRA A and B of rank r on each targeted LLM projection, full copies of the `modules_to_save`, and the spatial
    token rows of the embedding (and of the LM head when it is not tied).
    """
    pattern = re.compile(LLM_LAYERS_PATTERN.format("|".join(preset.projections)))
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and pattern.fullmatch(name):
            total += preset.r * (module.in_features + module.out_features)
        elif name.split(".")[-1] in preset.fully_trained_modules:
            total += sum(parameter.numel() for parameter in module.parameters())
    if preset.train_spatial_token_rows:
        config = model.config
        vocabulary = config.spatial_vocabulary
        num_ids = 0 if vocabulary is None else len(vocabulary.spatial_token_ids)
        matrices = 1 if config.tie_word_embeddings else 2
        total += num_ids * config.text_config.hidden_size * matrices
    return total


def bf16_state_bytes(model: PerceptioForConditionalGeneration) -> int:
    """Bytes of the saved state (parameters, tied ones once, and persistent buffers) as a bf16 load holds it: floats
    in bf16 except what the model keeps in float32 (`_keep_in_fp32_modules_strict`), integers at their own size."""
    kept_in_float32 = tuple(model._keep_in_fp32_modules_strict or ())
    unique = {id(tensor): (name, tensor) for name, tensor in model.state_dict(keep_vars=True).items()}
    total = 0
    for name, tensor in unique.values():
        if not tensor.is_floating_point():
            total += tensor.numel() * tensor.element_size()
        elif any(pattern in name for pattern in kept_in_float32):
            total += tensor.numel() * FP32_BYTES
        else:
            total += tensor.numel() * BF16_BYTES
    return total


def plan_build(config: PerceptioConfig, lora: PerceptioLoraPreset | None = None) -> BuildPlan:
    """Count parameters per component and estimate bf16 memory for `config`, on the meta device."""
    lora = lora or PerceptioLoraPreset()
    model = build_on_meta(config)
    components = component_parameter_counts(model)
    lora_trainable = lora_trainable_parameters(model, lora)
    full_trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    inference = bf16_state_bytes(model)
    return BuildPlan(
        component_parameters=components,
        total_parameters=sum(components.values()),
        lora_trainable_parameters=lora_trainable,
        full_trainable_parameters=full_trainable,
        inference_bytes=inference,
        lora_bytes=inference + lora_trainable * (BF16_BYTES + OPTIMIZER_BYTES_PER_TRAINABLE),
        full_bytes=inference + full_trainable * OPTIMIZER_BYTES_PER_TRAINABLE,
    )


__all__ = [
    "PRESETS",
    "BuildPlan",
    "PerceptioPreset",
    "build_on_meta",
    "component_parameter_counts",
    "get_preset",
    "lora_trainable_parameters",
    "plan_build",
    "sam2_1_hiera_large_config",
]
