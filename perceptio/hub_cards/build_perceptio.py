"""Assemble a Perceptio checkpoint from released parts: InternVL (transformers format), SAM2 and a depth tokenizer.

The result is written as a complete flat Hub folder (`export_pretrained`) with a model card, so it loads anywhere with
`AutoModel.from_pretrained(folder, trust_remote_code=True)`.

Text backbones. The base must be an `InternVLForConditionalGeneration` checkpoint (`model_type: internvl`), whose
text model is a native transformers decoder: the `OpenGVLab/InternVL3-{1,2,8,14,38,78}B-hf` family (Qwen2.5 text,
`qwen2`), `OpenGVLab/InternVL3-9B-hf` and the converted `InternVL2_5-*-MPO-hf` checkpoints (`llama`/`qwen2`), and
InternVL3.5-*-HF (`qwen3`) all load this way. The original InternVL2.5 releases (`model_type: internvl_chat`, e.g.
`OpenGVLab/InternVL2_5-8B` with its InternLM2 text model) are remote-code models, not transformers' InternVL, and
are rejected with an explanation: convert them with transformers' `convert_internvl_weights_to_hf.py` first.

Dtype. Every weight is loaded and saved in the build's dtype except the depth tokenizer's, which stay float32 (a few
MB; `PerceptioForConditionalGeneration` keeps it in float32 when loaded in bf16 or fp16).

Memory. The base is loaded once (in `dtype`); the Perceptio model is built with its parameters on the meta device
and the loaded tensors are assigned into it (`load_state_dict(..., assign=True)`), so nothing is copied: building
an 8B model needs about one copy of the 8B weights, plus SAM2 and the depth tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoTokenizer, InternVLForConditionalGeneration, PreTrainedConfig, Sam2Config, Sam2Model
from transformers.utils import cached_file

from ..models.perceptio import (
    PerceptioConfig,
    PerceptioDepthTokenizer,
    PerceptioForConditionalGeneration,
    PerceptioImageProcessor,
    PerceptioProcessor,
)
from ..models.perceptio.spatial_vocabulary_perceptio import spatial_tokens
from .convert_sam2_original import convert_original_sam2, is_original_sam2_checkpoint
from .export_perceptio import export_pretrained
from .model_card import PerceptioCardData, write_model_card


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_NUM_DEPTH_TOKENS = PerceptioConfig().num_depth_tokens
SAM2_MODEL_TYPES = ("sam2", "sam2_video")
# InternVL config fields that describe the saved file rather than the model; PerceptioConfig sets its own.
BASE_CONFIG_FIELDS_NOT_CARRIED = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# The InternVL image processors' maximum number of tiles, where the base's preprocessor config names it.
MAX_TILES_FIELDS = ("max_patches", "max_dynamic_patch", "max_num_tiles")


@dataclass
class PerceptioBuildResult:
    """What `build_perceptio` wrote: the folder, and the ids of the tokens it added to the base vocabulary."""

    output_dir: Path
    added_token_ids: list[int]
    base_vocab_size: int
    vocab_size: int


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`torch.dtype` from a name (`float32`, `bfloat16`, `float16`) or a dtype, or a `ValueError`."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")


def read_config_dict(name_or_path: str | Path, role: str) -> tuple[dict[str, Any], str]:
    """The raw `config.json` of a folder or Hub id, and how to name that file in errors."""
    where = f"{name_or_path}/config.json"
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(str(name_or_path))
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read the {role} config {where}: {error}") from error
    return config_dict, where


def check_internvl_base(name_or_path: str | Path) -> dict[str, Any]:
    """The base's config dict, or a `ValueError` naming its config.json when it is not transformers' InternVL."""
    config_dict, where = read_config_dict(name_or_path, "base")
    model_type = config_dict.get("model_type")
    architectures = config_dict.get("architectures") or []
    if model_type != "internvl":
        hint = (
            " This is an original InternVL release (remote code, e.g. InternVL2.5 with an InternLM2 text model); "
            "use its '-hf' conversion or convert it with transformers' convert_internvl_weights_to_hf.py."
            if model_type == "internvl_chat"
            else ""
        )
        raise ValueError(
            f"{where} has model_type {model_type!r} (architectures {architectures}); expected an InternVL checkpoint "
            f"in transformers format: model_type 'internvl', architecture InternVLForConditionalGeneration (e.g. "
            f"OpenGVLab/InternVL3-8B-hf).{hint}"
        )
    if architectures and "InternVLForConditionalGeneration" not in architectures:
        raise ValueError(
            f"{where} declares architectures {architectures}; expected InternVLForConditionalGeneration (a checkpoint "
            "with its language-model head)."
        )
    return config_dict


def load_internvl_base(name_or_path: str | Path, dtype: torch.dtype) -> InternVLForConditionalGeneration:
    """Load the base InternVL model; a `ValueError` naming the folder when any of its weights is missing."""
    check_internvl_base(name_or_path)
    model, info = InternVLForConditionalGeneration.from_pretrained(
        str(name_or_path), dtype=dtype, output_loading_info=True
    )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"The base checkpoint {name_or_path} lacks {len(missing)} weights of InternVLForConditionalGeneration "
            f"(first: {missing[:3]}); expected a complete InternVL checkpoint in transformers format."
        )
    return model.eval()


def load_sam2(
    name_or_path: str | Path,
    dtype: torch.dtype,
    original_config_name: str | None = None,
    original_overrides: tuple[str, ...] = (),
) -> Sam2Model:
    """SAM2 as transformers' `Sam2Model`: from a transformers folder/id, or converted from an original `.pt` file."""
    if is_original_sam2_checkpoint(name_or_path):
        return convert_original_sam2(name_or_path, original_config_name, original_overrides, dtype=dtype)
    if original_config_name or original_overrides:
        raise ValueError(
            f"A sam2 hydra config/overrides only apply to an original .pt checkpoint, but {name_or_path} is a "
            "transformers folder or Hub id."
        )
    config_dict, where = read_config_dict(name_or_path, "SAM2")
    if config_dict.get("model_type") not in SAM2_MODEL_TYPES:
        raise ValueError(
            f"{where} has model_type {config_dict.get('model_type')!r}; expected a SAM2 checkpoint in transformers "
            f"format (model_type one of {SAM2_MODEL_TYPES}, e.g. facebook/sam2.1-hiera-large) or an original .pt file."
        )
    # A video checkpoint (Sam2VideoModel) holds the image model's weights plus memory modules, which are ignored.
    config = Sam2Config(
        vision_config=config_dict["vision_config"],
        prompt_encoder_config=config_dict["prompt_encoder_config"],
        mask_decoder_config=config_dict["mask_decoder_config"],
    )
    model, info = Sam2Model.from_pretrained(str(name_or_path), config=config, dtype=dtype, output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"The SAM2 checkpoint {name_or_path} lacks {len(missing)} weights of Sam2Model (first: {missing[:3]}); "
            "expected every image-encoder, prompt-encoder and mask-decoder weight."
        )
    return model.eval()


def load_depth_tokenizer(name_or_path: str | Path, expected_num_tokens: int) -> PerceptioDepthTokenizer:
    """The depth tokenizer in float32; a `ValueError` naming its config.json when its code grid is not
    `expected_num_tokens`.

    Float32 whatever the build's dtype: the model keeps its depth tokenizer in float32
    (`PerceptioForConditionalGeneration._keep_in_fp32_modules_strict`), and a build that stored it in bf16 would
    have rounded away its trained values before any load could keep them.
    """
    config_dict, where = read_config_dict(name_or_path, "depth tokenizer")
    if config_dict.get("model_type") != "perceptio_depth_tokenizer":
        raise ValueError(
            f"{where} has model_type {config_dict.get('model_type')!r}; expected a PerceptioDepthTokenizer "
            "(model_type 'perceptio_depth_tokenizer'), as `perceptio train-depth-tokenizer` writes."
        )
    tokenizer, info = PerceptioDepthTokenizer.from_pretrained(
        str(name_or_path), dtype=torch.float32, output_loading_info=True
    )
    config = tokenizer.config
    if config.num_tokens != expected_num_tokens:
        raise ValueError(
            f"{where}: the depth tokenizer's code grid is {config.grid_size}x{config.grid_size} = {config.num_tokens} "
            f"codes per image, but {expected_num_tokens} depth tokens per block were expected (num_depth_tokens); "
            "use a tokenizer trained for that grid or pass --num-depth-tokens to match it."
        )
    if info["missing_keys"]:
        raise ValueError(f"The depth tokenizer {name_or_path} lacks weights {sorted(info['missing_keys'])[:3]}.")
    return tokenizer.eval()


def base_file(name_or_path: str | Path, filename: str) -> Path | None:
    """A file of the base checkpoint (folder or Hub id), or `None` when it has none."""
    resolved = cached_file(str(name_or_path), filename, _raise_exceptions_for_missing_entries=False)
    return Path(resolved) if resolved else None


def base_chat_template(name_or_path: str | Path, tokenizer) -> str | None:
    """The base's chat template: its processor's `chat_template.jinja`/`.json`, else its tokenizer's.

    `None` (no template anywhere) makes the processor use ChatML, the format of InternVL3's Qwen2.5 models.
    """
    for name in CHAT_TEMPLATE_FILES:
        path = base_file(name_or_path, name)
        if path is not None:
            text = path.read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None)


def base_max_num_tiles(name_or_path: str | Path, default: int) -> int:
    """The base image processor's tile limit, read from its `preprocessor_config.json` when present."""
    path = base_file(name_or_path, "preprocessor_config.json")
    if path is not None:
        content = json.loads(path.read_text(encoding="utf-8"))
        for field in MAX_TILES_FIELDS:
            if isinstance(content.get(field), int):
                return content[field]
    return default


def vision_tile_size(vision_config: PreTrainedConfig) -> int:
    """Side of the square tiles the base's vision tower takes (its `image_size`, an int or a pair)."""
    size = vision_config.image_size
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"The base's vision tower takes non-square images {size}; InternVL tiles are square.")
        return int(size[0])
    return int(size)


def perceptio_config_from_parts(
    base_config: PreTrainedConfig,
    sam2_config: Sam2Config,
    depth_tokenizer_config,
    processor: PerceptioProcessor,
    vocab_size: int,
) -> PerceptioConfig:
    """PerceptioConfig: the base InternVL config with the grown vocabulary, SAM2, depth tokenizer and token ids."""
    fields = {key: value for key, value in base_config.to_dict().items() if key not in BASE_CONFIG_FIELDS_NOT_CARRIED}
    fields["text_config"] = {**fields["text_config"], "vocab_size": vocab_size}
    vocabulary = processor.spatial_vocabulary.with_num_depth_tokens(depth_tokenizer_config.num_tokens)
    image_token_id = fields.pop("image_token_id", None)
    if image_token_id != vocabulary.image_context:
        raise ValueError(
            f"The base config's image_token_id ({image_token_id}) is not the id of <IMG_CONTEXT> in its "
            f"tokenizer ({vocabulary.image_context}); the base checkpoint's config and tokenizer disagree."
        )
    return PerceptioConfig(
        **fields,
        sam2_config=sam2_config.to_dict(),
        depth_tokenizer_config=depth_tokenizer_config.to_dict(),
        **vocabulary.config_fields(),
    )


def assemble_on_meta(
    config: PerceptioConfig, state_dicts: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype, seed: int
) -> PerceptioForConditionalGeneration:
    """Build the model with meta parameters and assign the loaded tensors into it (no copies).

    `state_dicts` maps a submodule prefix ("" for the InternVL part) to its state dict. Only `text_hidden_fcs` is
    new; it is materialised and initialised here, from `seed`.
    """
    with init_empty_weights():
        model = PerceptioForConditionalGeneration(config)
    merged = {
        (f"{prefix}.{key}" if prefix else key): tensor
        for prefix, state in state_dicts.items()
        for key, tensor in state.items()
    }
    missing, unexpected = model.load_state_dict(merged, strict=False, assign=True)
    not_new = [key for key in missing if not key.startswith("text_hidden_fcs.")]
    if not_new or unexpected:
        raise ValueError(
            f"The parts do not fit the Perceptio model: missing {not_new[:5]}, unexpected {unexpected[:5]}."
        )
    # Assignment replaced the tensors; re-tie the LM head to the embeddings where the config ties them.
    model.tie_weights()
    model.text_hidden_fcs.to_empty(device="cpu")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for layer in model.text_hidden_fcs:
            if isinstance(layer, torch.nn.Linear):
                # PyTorch's default Linear initialisation (Kaiming-uniform), as Sa2VA's text_hidden_fcs starts from.
                layer.reset_parameters()
    model.text_hidden_fcs.to(dtype)
    on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if on_meta:
        raise ValueError(f"Weights left uninitialised after assembly: {on_meta[:5]}.")
    return model.eval()


def build_perceptio(
    base: str | Path,
    sam2: str | Path,
    depth_tokenizer: str | Path,
    output_dir: str | Path,
    dtype: str | torch.dtype = "bfloat16",
    num_depth_tokens: int = DEFAULT_NUM_DEPTH_TOKENS,
    sam2_config_name: str | None = None,
    sam2_overrides: tuple[str, ...] = (),
    sam_image_size: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
    card_data: PerceptioCardData | None = None,
) -> PerceptioBuildResult:
    """Build a Perceptio checkpoint folder from an InternVL base, SAM2 and a depth tokenizer.

    Args:
        base: folder or Hub id of an `InternVLForConditionalGeneration` checkpoint (e.g. `OpenGVLab/InternVL3-8B-hf`).
        sam2: folder or Hub id of a transformers SAM2 (e.g. `facebook/sam2.1-hiera-large`), or an original `.pt`.
        depth_tokenizer: folder or Hub id of a `PerceptioDepthTokenizer`.
        output_dir: folder to write (must be empty or absent unless `overwrite`).
        dtype: `float32`, `bfloat16` or `float16`: every weight is loaded and saved in it, except the depth
            tokenizer's, which stay float32.
        num_depth_tokens: N, the codes per depth block the model is built for; the tokenizer's grid must match it.
        sam2_config_name, sam2_overrides: the sam2 package's hydra config (and overrides) of an original `.pt`;
            inferred for Meta's released file names.
        sam_image_size: side of the SAM2 input; SAM2's own image size by default.
        overwrite: write into a non-empty `output_dir`.
        seed: seed of the `text_hidden_fcs` initialisation.
        card_data: what the model card says beyond the build (licence, datasets, evaluation results, ...).
    """
    torch_dtype = resolve_dtype(dtype)
    if not isinstance(num_depth_tokens, int) or num_depth_tokens <= 0:
        raise ValueError(f"num_depth_tokens must be a positive integer, got {num_depth_tokens!r}.")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    depth = load_depth_tokenizer(depth_tokenizer, num_depth_tokens)
    sam = load_sam2(sam2, torch_dtype, sam2_config_name, tuple(sam2_overrides))
    base_model = load_internvl_base(base, torch_dtype)

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    known = set(tokenizer.get_vocab())
    added_tokens = [token for token in spatial_tokens(depth.config.num_codes) if token not in known]
    image_processor = PerceptioImageProcessor(
        tile_size=vision_tile_size(base_model.config.vision_config),
        max_num_tiles=base_max_num_tiles(base, PerceptioImageProcessor().max_num_tiles),
        sam_image_size=sam_image_size or sam.config.prompt_encoder_config.image_size,
    )
    processor = PerceptioProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=base_chat_template(base, tokenizer),
        num_depth_codes=depth.config.num_codes,
        image_seq_length=base_model.config.image_seq_length,
        num_depth_tokens=depth.config.num_tokens,
    )
    added_ids = sorted(tokenizer.convert_tokens_to_ids(added_tokens))
    base_vocab_size = base_model.get_input_embeddings().weight.shape[0]
    vocab_size = max(base_vocab_size, len(tokenizer))
    if vocab_size > base_vocab_size:
        base_model.resize_token_embeddings(vocab_size, mean_resizing=False)

    config = perceptio_config_from_parts(base_model.config, sam.config, depth.config, processor, vocab_size)
    model = assemble_on_meta(
        config,
        {"": base_model.state_dict(), "grounding_encoder": sam.state_dict(), "depth_tokenizer": depth.state_dict()},
        torch_dtype,
        seed,
    )
    del base_model, sam, depth
    if added_ids:
        model.initialize_new_token_embeddings(added_ids)
    folder = export_pretrained(model, processor, output_dir, overwrite=overwrite)
    card_data = card_data or PerceptioCardData()
    sources = card_data.with_build_sources(base=str(base), sam2=str(sam2), depth_tokenizer=str(depth_tokenizer))
    write_model_card(folder, sources)
    return PerceptioBuildResult(
        output_dir=folder, added_token_ids=added_ids, base_vocab_size=base_vocab_size, vocab_size=vocab_size
    )


__all__ = [
    "PerceptioBuildResult",
    "build_perceptio",
    "check_internvl_base",
    "load_depth_tokenizer",
    "load_internvl_base",
    "load_sam2",
    "resolve_dtype",
]
