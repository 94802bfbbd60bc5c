"""Convert a released Sa2VA checkpoint (its Hub folder) into a segmentation-only Perceptio checkpoint.

Sa2VA (github.com/bytedance/Sa2VA) is InternVL2.5/InternVL3 with SAM2-L as its grounding encoder and `[SEG]` hidden
states projected by `text_hidden_fcs` into SAM2 prompts: Perceptio's architecture without depth tokens. Its Hub
checkpoints (`model_type: sa2va_chat`, remote code) hold `vision_model.*` (InternViT), `mlp1.*` (the projector),
`language_model.*` (Qwen2 or InternLM2), `grounding_encoder.sam2_model.*` (Meta's SAM2 layout, with its video modules)
and `text_hidden_fcs.*`. The weights are renamed to transformers' InternVL layout (InternLM2 becomes Llama, its fused
`wqkv` split by its grouped-heads layout, as transformers' InternVL conversion does) and SAM2's through the
original-SAM2 conversion; the video-only SAM2 weights are dropped and listed in the result.

Sa2VA's checkpoints do not record their SAM2's hyperparameters: `sam2.py` builds SAM2-L in code. Widths, depths and
sizes are read from the weights' shapes; the rest (heads, attention windows, global-attention blocks, the fixed SAM2
image size and decoder heads) are Sa2VA's constants below.

Sa2VA-Qwen2.5-VL and -Qwen3-VL checkpoints are a different architecture (Qwen-VL vision, no InternViT) and are refused.

Memory: the safetensors headers are read first (names, shapes, file sizes); then one source shard at a time is loaded,
converted and written as one output shard, so peak memory is about one source shard plus its converted copy.
Everything is written to a temporary folder next to `output_dir` and moved into place at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig, Sam2Config

from ..models.perceptio import PerceptioConfig, PerceptioForConditionalGeneration
from ..models.perceptio.image_processing_perceptio import IMAGENET_MEAN, IMAGENET_STD, PerceptioImageProcessor
from .convert_sam2_original import POINT_EMBEDDING, rename_original_key
from .model_card import PerceptioCardData, write_model_card


SA2VA_MODEL_TYPE = "sa2va_chat"
CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
SEG_TOKEN = "[SEG]"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# Sa2VA's language models -> the transformers text model type each becomes.
TEXT_MODEL_TYPES = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "llama"}
# Sa2VA variants built on Qwen-VL models (their own vision tower): another architecture, not convertible here.
QWEN_VL_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")
# Config keys of Sa2VA's sub-configs that describe the remote code, not the model.
NOT_CARRIED_KEYS = (
    "architectures",
    "auto_map",
    "_name_or_path",
    "_attn_implementation_autoset",
    "attn_implementation",
    "use_flash_attn",
    "transformers_version",
    "torch_dtype",
    "model_type",
)
# Defaults of Sa2VA's `configuration_intern_vit.py` and `configuration_internlm2.py`: a saved config omits the
# fields left at their default, so they are filled in from here.
INTERNVIT_CONFIG_DEFAULTS = {
    "patch_size": 14,
    "image_size": 224,
    "qkv_bias": False,
    "hidden_size": 3200,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "qk_normalization": True,
    "num_hidden_layers": 48,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
    "dropout": 0.0,
    "attention_dropout": 0.0,
}
INTERNLM2_CONFIG_DEFAULTS = {
    "vocab_size": 103168,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "bias": True,
    "rope_theta": 10000,
    "rope_scaling": None,
}
# Sa2VA's `templates.py`: the InternVL-based checkpoints use `qwen_chat` or `internlm2_chat`, whose user turn is
# '<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n'; `predict_forward` writes no system turn and puts
# the image tokens right before the text (no newline). Generation stops at the EOS or one of the stop words.
SA2VA_STOP_WORDS = {"qwen_chat": ["<|im_end|>", "<|endoftext|>"], "internlm2_chat": ["<|im_end|>"]}
SA2VA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Sa2VA's SAM2 (`sam2.py`: SAM2.build_image_encoder and SAM2Base._build_sam_heads): what the weights cannot tell.
SA2VA_SAM2_IMAGE_SIZE = 1024
SA2VA_SAM2_BACKBONE_STRIDE = 16
SA2VA_HIERA_FIRST_STAGE_HEADS = 2
SA2VA_HIERA_WINDOW_SPEC = [8, 4, 16, 8]
SA2VA_HIERA_GLOBAL_ATTENTION_BLOCKS = [23, 33, 43]
SA2VA_HIERA_QUERY_POOL_STAGES = 3
SA2VA_HIERA_QUERY_STRIDE = 2
SA2VA_HIERA_PATCH_STRIDE = 4
SA2VA_HIERA_PATCH_PADDING = 3
SA2VA_FPN_TOP_DOWN_LEVELS = [2, 3]
SA2VA_MASK_DECODER_HEADS = 8

# Sa2VA's inference preprocessing (`modeling_sa2va_chat.py`, `preparing_for_generation` and `predict_forward`).
SA2VA_TILE_SIZE = 448
SA2VA_MAX_NUM_TILES = 12
# SAM2 view: PIL's default `Image.resize` filter (bicubic) to 1024², then `SAM2.preprocess_image`, which builds the
# ImageNet mean and std as bfloat16 tensors: the image is normalised with these bfloat16-rounded values.
SA2VA_SAM_RESAMPLE = "bicubic"


def bfloat16_rounded(values: tuple[float, ...]) -> list[float]:
    """The float values of `values` stored as bfloat16."""
    return torch.tensor(values, dtype=torch.bfloat16).float().tolist()


@dataclass
class Sa2VAConversionResult:
    """What `convert_sa2va` wrote: the folder, the source's language model, and the SAM2 weights it dropped."""

    output_dir: Path
    llm_architecture: str
    seg_token_id: int
    vocab_size: int
    tie_word_embeddings: bool
    dropped_keys: list[str] = field(default_factory=list)


@dataclass
class TensorInfo:
    """A tensor of a safetensors file, from its header."""

    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of a safetensors file (header only), or a `ValueError` naming a truncated file."""
    try:
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    expected = 8 + header_size + data_end
    actual = path.stat().st_size
    if actual < expected:
        raise ValueError(
            f"{path} is truncated: its header describes {expected} bytes but the file has {actual}; download it again."
        )
    return {name: TensorInfo(entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}


def source_shards(source_dir: Path) -> dict[Path, dict[str, TensorInfo]]:
    """Each weight file of the checkpoint with its tensors (headers), checked against the index when there is one."""
    index_path = source_dir / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_path} has no readable 'weight_map': {error}") from error
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (source_dir / name).is_file()]
        if missing:
            raise ValueError(f"{index_path} lists shards that are missing from {source_dir}: {missing}.")
        shards = {source_dir / name: read_safetensors_header(source_dir / name) for name in files}
        for name, shard in weight_map.items():
            if name not in shards[source_dir / shard]:
                raise ValueError(f"{index_path} maps {name!r} to {shard}, whose header does not hold it.")
        return shards
    single = source_dir / SINGLE_WEIGHTS_FILE
    if single.is_file():
        return {single: read_safetensors_header(single)}
    raise ValueError(
        f"{source_dir} has neither {WEIGHTS_INDEX_FILE} nor {SINGLE_WEIGHTS_FILE}: expected Sa2VA's safetensors weights."
    )


def read_sa2va_config(source_dir: Path) -> dict[str, Any]:
    """Sa2VA's config.json, or a `ValueError` naming the file and field when it is not a convertible Sa2VA model."""
    where = source_dir / CONFIG_FILE
    if not where.is_file():
        raise ValueError(f"{where} does not exist: {source_dir} is not a Sa2VA checkpoint folder.")
    try:
        config = json.loads(where.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from error
    if config.get("model_type") != SA2VA_MODEL_TYPE:
        raise ValueError(
            f"{where}: model_type is {config.get('model_type')!r}, expected {SA2VA_MODEL_TYPE!r}; this is not a Sa2VA "
            "checkpoint."
        )
    text_config = config.get("text_config") or {}
    is_qwen_vl = "llm_config" not in config and text_config.get("model_type") in QWEN_VL_MODEL_TYPES
    if is_qwen_vl or any("Qwen" in name for name in config.get("architectures") or []):
        raise ValueError(
            f"{where}: this Sa2VA variant is built on a Qwen-VL model (text_config.model_type "
            f"{text_config.get('model_type')!r}, architectures {config.get('architectures')}), whose vision tower is not "
            "InternViT; only the InternVL-based Sa2VA checkpoints (Qwen2 or InternLM2 language models) can be converted."
        )
    for name in ("llm_config", "vision_config"):
        if not isinstance(config.get(name), dict):
            raise ValueError(f"{where}: field {name!r} is missing; expected Sa2VA's InternVL-based config.")
    config["vision_config"] = {**INTERNVIT_CONFIG_DEFAULTS, **config["vision_config"]}
    architecture = (config["llm_config"].get("architectures") or [None])[0]
    if architecture == "InternLM2ForCausalLM":
        config["llm_config"] = {**INTERNLM2_CONFIG_DEFAULTS, **config["llm_config"]}
    if architecture not in TEXT_MODEL_TYPES:
        raise ValueError(
            f"{where}: llm_config.architectures is {config['llm_config'].get('architectures')}; only "
            f"{sorted(TEXT_MODEL_TYPES)} can be converted."
        )
    if config.get("ps_version", "v1") != "v2":
        raise ValueError(
            f"{where}: ps_version is {config.get('ps_version')!r}; transformers' InternVL implements pixel shuffle "
            "'v2' only."
        )
    template = str(config.get("template", "")).replace("-", "_")
    if template not in SA2VA_STOP_WORDS:
        raise ValueError(f"{where}: template {config.get('template')!r} is not one of {sorted(SA2VA_STOP_WORDS)}.")
    return config


def vision_config_from_sa2va(vision: dict[str, Any], image_size: int) -> dict[str, Any]:
    """transformers' `InternVLVisionConfig` fields of Sa2VA's InternViT config."""
    return {
        "hidden_size": vision["hidden_size"],
        "intermediate_size": vision["intermediate_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "image_size": image_size,
        "patch_size": vision["patch_size"],
        "hidden_act": vision.get("hidden_act", "gelu"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "norm_type": vision.get("norm_type", "rms_norm"),
        "attention_bias": vision.get("qkv_bias", False),
        "use_qk_norm": vision.get("qk_normalization", False),
        "attention_dropout": vision.get("attention_dropout", 0.0),
        "projection_dropout": vision.get("dropout", 0.0),
        "use_absolute_position_embeddings": True,
        "use_mean_pooling": True,
    }


def text_config_from_sa2va(llm: dict[str, Any], vocab_size: int, tie_word_embeddings: bool) -> dict[str, Any]:
    """transformers text-model config of Sa2VA's `llm_config`: Qwen2 as is, InternLM2 as Llama."""
    architecture = llm["architectures"][0]
    fields = {key: value for key, value in llm.items() if key not in NOT_CARRIED_KEYS}
    fields.update(vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings, use_cache=True)
    if architecture == "Qwen2ForCausalLM":
        return {**fields, "model_type": TEXT_MODEL_TYPES[architecture]}
    rope_scaling = fields.pop("rope_scaling", None)
    llama = {
        key: fields[key]
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "tie_word_embeddings",
            "use_cache",
        )
        if key in fields
    }
    llama.update(
        model_type=TEXT_MODEL_TYPES[architecture],
        attention_bias=fields.get("bias", False),
        mlp_bias=False,
        head_dim=fields["hidden_size"] // fields["num_attention_heads"],
    )
    if rope_scaling:
        # InternLM2 names the scaling kind "type"; its dynamic NTK formula is Llama's.
        llama["rope_scaling"] = {"rope_type": rope_scaling["type"], "factor": rope_scaling["factor"]}
    return llama


def sam2_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> Sam2Config:
    """The `Sam2Config` of Sa2VA's SAM2 (keys without the `grounding_encoder.sam2_model.` prefix): sizes from the
    weights' shapes, the rest Sa2VA's SAM2-L constants."""
    trunk = "image_encoder.trunk."
    block_ids = sorted({int(key.split(".")[3]) for key in shapes if key.startswith(trunk + "blocks.")})
    if not block_ids:
        raise ValueError("no SAM2 image-encoder blocks (grounding_encoder.sam2_model.image_encoder.trunk.blocks.*)")
    # A stage's first block (after the first stage) changes the width and holds a `proj`.
    stage_starts = [0] + [index for index in block_ids if f"{trunk}blocks.{index}.proj.weight" in shapes]
    stage_ends = [start - 1 for start in stage_starts[1:]] + [block_ids[-1]]
    hidden_size = shapes[trunk + "patch_embed.proj.weight"][0]
    dims = [shapes[f"{trunk}blocks.{end}.mlp.layers.1.weight"][0] for end in stage_ends]
    heads = [SA2VA_HIERA_FIRST_STAGE_HEADS * 2**stage for stage in range(len(dims))]
    patch_kernel = list(shapes[trunk + "patch_embed.proj.weight"][2:])
    first_stride = SA2VA_HIERA_PATCH_STRIDE
    neck_channels = [shapes[f"image_encoder.neck.convs.{level}.conv.weight"][1] for level in range(len(dims))]
    fpn_hidden = shapes["image_encoder.neck.convs.0.conv.weight"][0]
    decoder = "sam_mask_decoder."
    num_layers = len({key.split(".")[3] for key in shapes if key.startswith(decoder + "transformer.layers.")})
    image_size = SA2VA_SAM2_IMAGE_SIZE
    backbone_config = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": hidden_size,
        "num_attention_heads": SA2VA_HIERA_FIRST_STAGE_HEADS,
        "image_size": [image_size, image_size],
        "patch_kernel_size": patch_kernel,
        "patch_stride": [first_stride, first_stride],
        "patch_padding": [SA2VA_HIERA_PATCH_PADDING] * 2,
        "query_stride": [SA2VA_HIERA_QUERY_STRIDE] * 2,
        "num_query_pool_stages": SA2VA_HIERA_QUERY_POOL_STAGES,
        "window_positional_embedding_background_size": list(shapes[trunk + "pos_embed"][2:]),
        "blocks_per_stage": [end - start + 1 for start, end in zip(stage_starts, stage_ends)],
        "embed_dim_per_stage": dims,
        "num_attention_heads_per_stage": heads,
        "window_size_per_stage": SA2VA_HIERA_WINDOW_SPEC,
        "global_attention_blocks": SA2VA_HIERA_GLOBAL_ATTENTION_BLOCKS,
        "mlp_ratio": shapes[trunk + "blocks.0.mlp.layers.0.weight"][0] / hidden_size,
    }
    vision_config = {
        "backbone_config": backbone_config,
        "backbone_channel_list": neck_channels,
        "backbone_feature_sizes": [[image_size // (first_stride * 2**level)] * 2 for level in range(3)],
        "fpn_hidden_size": fpn_hidden,
        "fpn_top_down_levels": SA2VA_FPN_TOP_DOWN_LEVELS,
        "num_feature_levels": 3,
    }
    prompt_encoder_config = {
        "hidden_size": shapes["sam_prompt_encoder.not_a_point_embed.weight"][1],
        "image_size": image_size,
        "patch_size": SA2VA_SAM2_BACKBONE_STRIDE,
        "mask_input_channels": shapes["sam_prompt_encoder.mask_downscaling.6.weight"][1],
        "num_point_embeddings": len([key for key in shapes if key.startswith("sam_prompt_encoder.point_embeddings.")]),
    }
    transformer_dim = shapes[decoder + "iou_token.weight"][1]
    mask_decoder_config = {
        "hidden_size": transformer_dim,
        "mlp_dim": shapes[decoder + "transformer.layers.0.mlp.layers.0.weight"][0],
        "num_hidden_layers": num_layers,
        "num_attention_heads": SA2VA_MASK_DECODER_HEADS,
        "attention_downsample_rate": transformer_dim
        // shapes[decoder + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight"][0],
        "num_multimask_outputs": shapes[decoder + "mask_tokens.weight"][0] - 1,
        "iou_head_depth": len(
            {key.split(".")[3] for key in shapes if key.startswith(decoder + "iou_prediction_head.layers.")}
        ),
        "iou_head_hidden_dim": shapes[decoder + "iou_prediction_head.layers.0.weight"][0],
    }
    return Sam2Config(
        vision_config=vision_config,
        prompt_encoder_config=prompt_encoder_config,
        mask_decoder_config=mask_decoder_config,
    )


def split_internlm2_wqkv(
    tensor: torch.Tensor, num_heads: int, num_key_value_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v of InternLM2's fused `wqkv`: rows grouped per key-value head as [its query heads, k, v]."""
    groups = num_heads // num_key_value_heads
    grouped = tensor.reshape(num_key_value_heads, groups + 2, head_dim, *tensor.shape[1:])
    rest = tensor.shape[1:]
    query = grouped[:, :groups].reshape(num_heads * head_dim, *rest)
    key = grouped[:, groups].reshape(num_key_value_heads * head_dim, *rest)
    value = grouped[:, groups + 1].reshape(num_key_value_heads * head_dim, *rest)
    return query.contiguous(), key.contiguous(), value.contiguous()


VISION_RENAMES = (
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.patch_embedding.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    ("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    ("vision_model.encoder.layers.", "model.vision_tower.encoder.layer."),
    (".attn.proj.", ".attention.projection_layer."),
    (".attn.q_norm.", ".attention.q_norm."),
    (".attn.k_norm.", ".attention.k_norm."),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
    (".ls1", ".lambda_1"),
    (".ls2", ".lambda_2"),
)
PROJECTOR_RENAMES = {
    "mlp1.0.": "model.multi_modal_projector.layer_norm.",
    "mlp1.1.": "model.multi_modal_projector.linear_1.",
    "mlp1.3.": "model.multi_modal_projector.linear_2.",
}
INTERNLM2_RENAMES = (
    ("language_model.model.tok_embeddings.", "model.language_model.embed_tokens."),
    ("language_model.output.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)
QWEN2_RENAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))
SAM2_PREFIX = "grounding_encoder.sam2_model."
TEXT_HIDDEN_FCS = re.compile(r"text_hidden_fcs\.[02]\.(weight|bias)")


class Sa2VAKeyMap:
    """Sa2VA weight names -> Perceptio's, with the fused projections split."""

    def __init__(self, config: dict[str, Any]):
        llm = config["llm_config"]
        self.internlm2 = llm["architectures"][0] == "InternLM2ForCausalLM"
        self.num_heads = llm["num_attention_heads"]
        self.num_key_value_heads = llm.get("num_key_value_heads", self.num_heads)
        self.head_dim = llm["hidden_size"] // self.num_heads
        self.vision_hidden = config["vision_config"]["hidden_size"]

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The Perceptio weights of one Sa2VA weight (none for a dropped SAM2 video weight); `KeyError` if unknown."""
        if name.startswith("vision_model."):
            yield from self._vision(name, tensor)
        elif name.startswith("mlp1."):
            prefix = next((old for old in PROJECTOR_RENAMES if name.startswith(old)), None)
            if prefix is None:
                raise KeyError(name)
            yield PROJECTOR_RENAMES[prefix] + name[len(prefix) :], tensor
        elif name.startswith("language_model."):
            yield from self._language(name, tensor)
        elif name.startswith(SAM2_PREFIX):
            new = rename_original_key(name[len(SAM2_PREFIX) :])
            if new is not None:
                yield f"grounding_encoder.{new}", tensor
        elif TEXT_HIDDEN_FCS.fullmatch(name):
            yield name, tensor
        else:
            raise KeyError(name)

    def _vision(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        for old, new in VISION_RENAMES:
            name = name.replace(old, new)
        if ".attn.qkv." in name:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.split(self.vision_hidden, dim=0)):
                yield name.replace(".attn.qkv.", f".attention.{part}."), chunk.contiguous()
            return
        yield name, tensor

    def _language(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        for old, new in INTERNLM2_RENAMES if self.internlm2 else QWEN2_RENAMES:
            name = name.replace(old, new)
        if self.internlm2 and ".attention.wqkv." in name:
            parts = split_internlm2_wqkv(tensor, self.num_heads, self.num_key_value_heads, self.head_dim)
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), parts):
                yield name.replace(".attention.wqkv.", f".self_attn.{part}."), chunk
            return
        yield name, tensor


def embedding_names(config: dict[str, Any]) -> tuple[str, str]:
    """Sa2VA's names of the input embeddings and of the LM head of its language model."""
    if config["llm_config"]["architectures"][0] == "InternLM2ForCausalLM":
        return "language_model.model.tok_embeddings.weight", "language_model.output.weight"
    return "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"


def check_vocabulary(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], source_dir: Path) -> tuple[int, bool]:
    """The vocabulary size and whether the embeddings are tied, read from the weights and checked against config."""
    embed_name, head_name = embedding_names(config)
    where = source_dir / CONFIG_FILE
    if embed_name not in shapes:
        raise ValueError(f"The weights in {source_dir} have no {embed_name!r}; not a Sa2VA language model.")
    rows = shapes[embed_name][0]
    declared = config["llm_config"].get("vocab_size")
    if declared != rows:
        raise ValueError(
            f"{where}: llm_config.vocab_size is {declared}, but {embed_name} has {rows} rows; the config does not "
            "belong to these weights."
        )
    if head_name in shapes:
        if shapes[head_name][0] != rows:
            raise ValueError(
                f"{head_name} has {shapes[head_name][0]} rows but {embed_name} has {rows}; the weights disagree."
            )
        return rows, False
    if not config["llm_config"].get("tie_word_embeddings", False):
        raise ValueError(
            f"The weights in {source_dir} have no {head_name!r} and {where} does not tie it to the embeddings "
            "(llm_config.tie_word_embeddings is false): the LM head is missing."
        )
    return rows, True


def load_sa2va_tokenizer(source_dir: Path, vocab_size: int):
    """The checkpoint's tokenizer with the ids of `[SEG]` and `<IMG_CONTEXT>`, checked against the vocabulary."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source_dir), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"Cannot load the tokenizer files of {source_dir}: {error}") from error
    where = source_dir / "tokenizer_config.json"
    vocabulary = tokenizer.get_vocab()
    for token in (SEG_TOKEN, IMAGE_CONTEXT_TOKEN):
        if token not in vocabulary:
            raise ValueError(f"{where}: the tokenizer has no {token} token; Sa2VA's tokenizer adds it.")
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the embeddings only {vocab_size} rows."
        )
    return tokenizer


def prepends_bos(tokenizer) -> bool:
    """Whether encoding with the tokenizer's defaults starts with its BOS (InternLM2's does; Qwen2's has none)."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]


def sa2va_chat_template(with_bos: bool) -> str:
    """Sa2VA's prompt format as a chat template, starting with BOS when Sa2VA's tokenizer prepends one."""
    return ("{{ bos_token }}" if with_bos else "") + SA2VA_CHAT_TEMPLATE


def perceptio_config_from_sa2va(
    config: dict[str, Any], sam2_config: Sam2Config, vocab_size: int, tied: bool, tokenizer
) -> PerceptioConfig:
    """The segmentation-only PerceptioConfig equivalent to Sa2VA's, with Sa2VA's inference behaviour."""
    vision = config["vision_config"]
    image_size = config.get("force_image_size") or vision["image_size"]
    downsample_ratio = config.get("downsample_ratio", 0.5)
    return PerceptioConfig(
        text_config=text_config_from_sa2va(config["llm_config"], vocab_size, tied),
        vision_config=vision_config_from_sa2va(vision, image_size),
        downsample_ratio=downsample_ratio,
        vision_feature_layer=config.get("select_layer", -1),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN),
        image_seq_length=int((image_size // vision["patch_size"]) ** 2 * downsample_ratio**2),
        tie_word_embeddings=tied,
        sam2_config=sam2_config.to_dict(),
        depth_tokenizer_config=None,
        seg_token_id=tokenizer.convert_tokens_to_ids(SEG_TOKEN),
        # A segmentation-only vocabulary: no depth block, no depth tokens.
        num_depth_codes=0,
        num_depth_tokens=0,
        # Sa2VA decodes every [SEG] with SAM2's multimask output and keeps the best predicted IoU.
        sam2_multimask_output=True,
    )


def generation_config_from_sa2va(template_name: str, tokenizer) -> GenerationConfig:
    """Greedy decoding that stops where Sa2VA's does: at the tokenizer's EOS or one of its template's stop words."""
    stop_ids = [tokenizer.eos_token_id] + [
        tokenizer.convert_tokens_to_ids(word)
        for word in SA2VA_STOP_WORDS[template_name]
        if word in tokenizer.get_vocab()
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(
        do_sample=False,
        eos_token_id=list(dict.fromkeys(stop_ids)),
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
    )


def write_processor_files(folder: Path, tokenizer, image_seq_length: int) -> None:
    """Tokenizer files, the chat template and `processor_config.json` (image processor with Sa2VA's settings)."""
    tokenizer.chat_template = sa2va_chat_template(prepends_bos(tokenizer))
    tokenizer.save_pretrained(folder)
    image_processor = PerceptioImageProcessor(
        tile_size=SA2VA_TILE_SIZE,
        max_num_tiles=SA2VA_MAX_NUM_TILES,
        use_thumbnail=True,
        sam_image_size=SA2VA_SAM2_IMAGE_SIZE,
        sam_resample=SA2VA_SAM_RESAMPLE,
        sam_image_mean=bfloat16_rounded(IMAGENET_MEAN),
        sam_image_std=bfloat16_rounded(IMAGENET_STD),
        sam_mask_upsample=True,
    )
    processor_config = {
        "image_processor": {key: value for key, value in image_processor.to_dict().items() if not key.startswith("_")},
        "image_seq_length": image_seq_length,
        # Segmentation-only: the processor adds no depth tokens to the vocabulary.
        "num_depth_codes": 0,
        "num_depth_tokens": 0,
        "processor_class": "PerceptioProcessor",
    }
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n", encoding="utf-8")
    (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def expected_weights(config: PerceptioConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the Perceptio model's saved weights (built on the meta device, nothing allocated)."""
    with torch.device("meta"):
        model = PerceptioForConditionalGeneration(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def convert_shard(
    path: Path, key_map: Sa2VAKeyMap, dropped: list[str], point_embeddings: dict[int, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The Perceptio weights of one source shard (SAM2's point embeddings are kept apart: they are concatenated)."""
    converted: dict[str, torch.Tensor] = {}
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise ValueError(f"{path} cannot be read as safetensors: {error}") from error
    with handle:
        for name in handle.keys():
            produced = False
            try:
                outputs = list(key_map.convert(name, handle.get_tensor(name)))
            except KeyError:
                raise ValueError(f"{path}: weight {name!r} is not part of an InternVL-based Sa2VA model.") from None
            for new_name, tensor in outputs:
                produced = True
                point = POINT_EMBEDDING.fullmatch(new_name.removeprefix("grounding_encoder."))
                if point:
                    point_embeddings[int(point.group(1))] = tensor
                elif new_name == "grounding_encoder.prompt_encoder.shared_embedding.positional_embedding":
                    # SAM2's prompt encoder and image-wide encoding share one Fourier matrix; transformers keeps two.
                    converted[new_name] = tensor
                    converted["grounding_encoder.shared_image_embedding.positional_embedding"] = tensor.clone()
                else:
                    converted[new_name] = tensor
            if not produced:
                dropped.append(name)
    return converted


def convert_sa2va(source_dir: str | Path, output_dir: str | Path, overwrite: bool = False) -> Sa2VAConversionResult:
    """Convert the Sa2VA checkpoint in `source_dir` into a segmentation-only Perceptio folder `output_dir`.

    Raises a `ValueError` naming the file and field for anything that is not a convertible Sa2VA checkpoint (wrong
    model type, Qwen-VL-based variant, unknown language model, missing or truncated shards, a tokenizer without
    `[SEG]`, a vocabulary size that does not match the embeddings). Nothing is left in `output_dir` on failure.
    """
    source_dir, output_dir = Path(source_dir), Path(output_dir)
    config = read_sa2va_config(source_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    shards = source_shards(source_dir)
    shapes = {name: info.shape for header in shards.values() for name, info in header.items()}
    vocab_size, tied = check_vocabulary(config, shapes, source_dir)
    tokenizer = load_sa2va_tokenizer(source_dir, vocab_size)
    sam2_shapes = {name[len(SAM2_PREFIX) :]: shape for name, shape in shapes.items() if name.startswith(SAM2_PREFIX)}
    try:
        sam2_config = sam2_config_from_shapes(sam2_shapes)
    except KeyError as error:
        raise ValueError(
            f"The weights in {source_dir} lack the SAM2 weight grounding_encoder.sam2_model.{error.args[0]}."
        ) from None
    perceptio_config = perceptio_config_from_sa2va(config, sam2_config, vocab_size, tied, tokenizer)
    expected = expected_weights(perceptio_config)
    template_name = str(config["template"]).replace("-", "_")

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        key_map = Sa2VAKeyMap(config)
        dropped: list[str] = []
        point_embeddings: dict[int, torch.Tensor] = {}
        weight_map: dict[str, str] = {}
        written: dict[str, tuple[int, ...]] = {}
        count = len(shards)
        for number, path in enumerate(shards, start=1):
            converted = convert_shard(path, key_map, dropped, point_embeddings)
            if number == count and point_embeddings:
                converted["grounding_encoder.prompt_encoder.point_embed.weight"] = torch.cat(
                    [point_embeddings[index] for index in sorted(point_embeddings)], dim=0
                )
            shard_name = f"model-{number:05d}-of-{count:05d}.safetensors"
            save_file(converted, str(staging / shard_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(converted, shard_name))
            written.update({name: tuple(tensor.shape) for name, tensor in converted.items()})
            del converted
        check_written_weights(written, expected, source_dir)
        index = {"metadata": {"total_size": total_size(staging)}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        perceptio_config.architectures = ["PerceptioForConditionalGeneration"]
        perceptio_config.save_pretrained(staging)
        generation_config_from_sa2va(template_name, tokenizer).save_pretrained(staging)
        write_processor_files(staging, tokenizer, perceptio_config.image_seq_length)
        write_model_card(
            staging,
            PerceptioCardData(model_name=output_dir.resolve().name, source_kind="sa2va").with_build_sources(
                base=str(source_dir), sam2=f"{source_dir} (Sa2VA's SAM2)", depth_tokenizer=None
            ),
        )
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Sa2VAConversionResult(
        output_dir=output_dir,
        llm_architecture=config["llm_config"]["architectures"][0],
        seg_token_id=perceptio_config.seg_token_id,
        vocab_size=vocab_size,
        tie_word_embeddings=tied,
        dropped_keys=sorted(dropped),
    )


def check_written_weights(
    written: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source_dir: Path
) -> None:
    """A `ValueError` when the converted weights are not exactly the Perceptio model's (names and shapes)."""
    missing = sorted(set(expected) - set(written))
    unexpected = sorted(set(written) - set(expected))
    mismatched = sorted(name for name in set(written) & set(expected) if written[name] != expected[name])
    if missing or unexpected or mismatched:
        raise ValueError(
            f"Converting {source_dir}: {len(missing)} Perceptio weights have no source (first: {missing[:3]}), "
            f"{len(unexpected)} converted weights have no place (first: {unexpected[:3]}), {len(mismatched)} have "
            f"the wrong shape (first: {[(name, written[name], expected[name]) for name in mismatched[:3]]})."
        )


def total_size(folder: Path) -> int:
    """Bytes of tensor data in the safetensors files of `folder`."""
    size = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
        size += path.stat().st_size - 8 - header_size
    return size


__all__ = ["Sa2VAConversionResult", "convert_sa2va", "split_internlm2_wqkv"]
