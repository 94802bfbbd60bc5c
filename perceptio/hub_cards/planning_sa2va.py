"""Plan `perceptio build --from-sa2va` from a config alone: parameter counts and memory of the model with depth.

The source is a Sa2VA checkpoint's `config.json` (`model_type: sa2va_chat`, InternVL-based) or a converted
segmentation-only Perceptio folder's. Nothing else is read: Sa2VA's SAM2 is SAM2-L (`sam2.py` builds it in code, the
config does not record it), so the plan uses SAM2.1-hiera-large's config, which has the same shapes; the depth
tokenizer is the default `PerceptioDepthTokenizerConfig` unless one is given.

Token ids. The depth tokens are laid out after the source's vocabulary (`<DEPTH_START>`, `<DEPTH_END>`, then the K
codes), as a build appends them. A Sa2VA config does not record the ids of `[SEG]` and `<IMG_CONTEXT>` (its tokenizer
does); the plan puts them on the last two rows of the source vocabulary. Ids change no count, only shapes do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download

from ..models.perceptio import PerceptioConfig, PerceptioDepthTokenizerConfig
from .build_from_sa2va import PERCEPTIO_MODEL_TYPE, looks_like_hub_id, read_segmentation_only_checkpoint
from .convert_sa2va import (
    CONFIG_FILE,
    SA2VA_MODEL_TYPE,
    read_sa2va_config,
    text_config_from_sa2va,
    vision_config_from_sa2va,
)
from .planning import BuildPlan, plan_build, sam2_1_hiera_large_config


def local_config_folder(source: str | Path) -> Path:
    """The folder holding the source's config.json: a folder, a config.json file's folder, or a Hub id's download."""
    path = Path(source)
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    if not looks_like_hub_id(source):
        raise ValueError(
            f"{path} does not exist: give a Sa2VA or converted checkpoint folder, its config.json, or a Hub id."
        )
    return Path(hf_hub_download(str(source), CONFIG_FILE)).parent


def plan_config_from_sa2va(config: dict[str, Any], depth_config: PerceptioDepthTokenizerConfig) -> PerceptioConfig:
    """The PerceptioConfig `perceptio build --from-sa2va` makes from a checked Sa2VA config (`read_sa2va_config`)."""
    llm = config["llm_config"]
    vocab_size = llm["vocab_size"]
    tied = bool(llm.get("tie_word_embeddings", False))
    vision = config["vision_config"]
    image_size = config.get("force_image_size") or vision["image_size"]
    downsample_ratio = config.get("downsample_ratio", 0.5)
    return with_depth_tokens(
        {
            "text_config": text_config_from_sa2va(llm, vocab_size, tied),
            "vision_config": vision_config_from_sa2va(vision, image_size),
            "downsample_ratio": downsample_ratio,
            "image_seq_length": int((image_size // vision["patch_size"]) ** 2 * downsample_ratio**2),
            "tie_word_embeddings": tied,
            "sam2_config": sam2_1_hiera_large_config().to_dict(),
            "seg_token_id": vocab_size - 1,
            "image_token_id": vocab_size - 2,
        },
        depth_config,
    )


def with_depth_tokens(fields: dict[str, Any], depth_config: PerceptioDepthTokenizerConfig) -> PerceptioConfig:
    """A PerceptioConfig of segmentation-only `fields` with the depth tokens appended after its vocabulary."""
    text_config = dict(fields["text_config"])
    offset = text_config["vocab_size"]
    text_config["vocab_size"] = offset + 2 + depth_config.num_codes
    return PerceptioConfig(
        **{
            **fields,
            "text_config": text_config,
            "depth_tokenizer_config": depth_config.to_dict(),
            "depth_start_token_id": offset,
            "depth_end_token_id": offset + 1,
            "depth_code_token_offset": offset + 2,
            "num_depth_codes": depth_config.num_codes,
            "num_depth_tokens": depth_config.num_tokens,
        }
    )


@dataclass
class Sa2VAPlan:
    """The planned config, its parameter counts and memory, and where its SAM2's shapes come from."""

    config: PerceptioConfig
    plan: BuildPlan
    sam2_source: str


def plan_from_sa2va(source: str | Path, depth_config: PerceptioDepthTokenizerConfig | None = None) -> Sa2VAPlan:
    """The plan of the Perceptio model with depth built from `source` (a Sa2VA or converted checkpoint's config)."""
    depth_config = depth_config or PerceptioDepthTokenizerConfig()
    folder = local_config_folder(source)
    where = folder / CONFIG_FILE
    try:
        model_type = json.loads(where.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read {where}: {error}") from error
    if model_type == SA2VA_MODEL_TYPE:
        config = plan_config_from_sa2va(read_sa2va_config(folder), depth_config)
        sam2_source = "SAM2-L (Sa2VA's config does not describe its SAM2)"
    elif model_type == PERCEPTIO_MODEL_TYPE:
        saved = read_segmentation_only_checkpoint(folder).config
        fields = PerceptioConfig.from_dict(saved).to_dict()
        for name in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
            fields.pop(name, None)
        fields["depth_tokenizer_config"] = None
        config = with_depth_tokens(fields, depth_config)
        sam2_source = f"the SAM2 of {where}"
    else:
        raise ValueError(
            f"{where}: model_type is {model_type!r}; expected {SA2VA_MODEL_TYPE!r} (a Sa2VA checkpoint) or "
            f"{PERCEPTIO_MODEL_TYPE!r} (a converted one)."
        )
    return Sa2VAPlan(config=config, plan=plan_build(config), sam2_source=sam2_source)


__all__ = ["Sa2VAPlan", "plan_config_from_sa2va", "plan_from_sa2va"]
