"""Give a segmentation-only Perceptio checkpoint (a converted Sa2VA) depth tokens and a depth tokenizer.

`perceptio convert-sa2va` turns a released Sa2VA into a Perceptio folder that writes `[SEG]` tokens but has no depth
block (`num_depth_codes=0`, no depth tokenizer). `add_depth_tokens` is the next step: it adds `<DEPTH_START>`,
`<DEPTH_END>` and `<DEPTH_0>` … `<DEPTH_{K-1}>` to the tokenizer (K is the depth tokenizer's codebook size), gives
their embedding and LM-head rows the mean of the existing rows, attaches the depth tokenizer, sets the config's depth
fields and writes a flat Hub folder ready for `perceptio train`. Every weight the source had keeps its value.

Memory: the source is loaded once; the grown model is built on the meta device and the loaded tensors are assigned
into it, so the build needs about one copy of the source's weights plus the depth tokenizer.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from ..models.perceptio import (
    PerceptioConfig,
    PerceptioDepthTokenizer,
    PerceptioDepthTokenizerConfig,
    PerceptioForConditionalGeneration,
    PerceptioProcessor,
)
from ..models.perceptio.spatial_vocabulary_perceptio import DEPTH_END_TOKEN, DEPTH_START_TOKEN, depth_code_tokens
from .build_perceptio import (
    BASE_CONFIG_FIELDS_NOT_CARRIED,
    PerceptioBuildResult,
    load_depth_tokenizer,
    read_config_dict,
    resolve_dtype,
)
from .convert_sa2va import SA2VA_MODEL_TYPE, source_shards
from .export_perceptio import export_pretrained
from .model_card import PerceptioCardData, write_model_card


CONFIG_FILE = "config.json"
PERCEPTIO_MODEL_TYPE = "perceptio"
DEPTH_TOKENIZER_MODEL_TYPE = "perceptio_depth_tokenizer"
# The config fields a segmentation-only checkpoint leaves empty and this build fills in.
DEPTH_FIELDS = ("depth_tokenizer_config", "depth_start_token_id", "depth_end_token_id", "depth_code_token_offset")
# safetensors dtype names of the weight dtypes a build keeps.
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# Tokenizer files that hold the vocabulary, named in errors about tokens already present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class SegmentationCheckpoint:
    """A segmentation-only Perceptio folder, checked: its config as saved and the dtype of its weights."""

    folder: Path
    config: dict[str, Any]
    dtype: torch.dtype


def read_segmentation_only_checkpoint(source: str | Path) -> SegmentationCheckpoint:
    """The folder's config, or a `ValueError` naming config.json and the field when it is not a segmentation-only
    Perceptio checkpoint (a Sa2VA that was not converted, or one that already has depth tokens)."""
    folder = Path(source)
    where = folder / CONFIG_FILE
    if not where.is_file():
        raise ValueError(f"{where} does not exist: --from-sa2va takes the folder `perceptio convert-sa2va` writes.")
    try:
        config = json.loads(where.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from error
    model_type = config.get("model_type")
    if model_type == SA2VA_MODEL_TYPE:
        raise ValueError(
            f"{where}: model_type is {SA2VA_MODEL_TYPE!r}, an unconverted Sa2VA checkpoint; convert it first with "
            f"`perceptio convert-sa2va {folder} --output-dir DIR` and pass DIR."
        )
    if model_type != PERCEPTIO_MODEL_TYPE:
        raise ValueError(f"{where}: model_type is {model_type!r}, expected {PERCEPTIO_MODEL_TYPE!r}.")
    if config.get("num_depth_codes"):
        raise ValueError(
            f"{where}: num_depth_codes is {config['num_depth_codes']}; the source must be segmentation-only "
            "(num_depth_codes 0, as `perceptio convert-sa2va` writes): this checkpoint already has depth tokens."
        )
    present = [name for name in DEPTH_FIELDS if config.get(name) is not None]
    if present:
        raise ValueError(
            f"{where}: {present[0]} is set; a segmentation-only checkpoint has no depth tokenizer and no depth token "
            "ids."
        )
    return SegmentationCheckpoint(folder=folder, config=config, dtype=weights_dtype(folder))


def weights_dtype(folder: Path) -> torch.dtype:
    """The dtype most of the folder's weights are stored in, read from the safetensors headers (a converted
    config.json does not record it, and loading in another dtype would change the weights' size)."""
    counts: Counter[str] = Counter()
    for header in source_shards(folder).values():
        for info in header.values():
            if info.dtype in SAFETENSORS_DTYPES:
                counts[info.dtype] += math.prod(info.shape)
    if not counts:
        raise ValueError(f"The weights in {folder} hold no floating-point tensors.")
    return SAFETENSORS_DTYPES[counts.most_common(1)[0][0]]


def looks_like_hub_id(source: str | Path) -> bool:
    """Whether `source` names a Hub repository (`org/name`, not a local path)."""
    text = str(source)
    return text.count("/") == 1 and not text.startswith((".", "/")) and not Path(text).exists()


def check_depth_tokens_absent(tokenizer, folder: Path, num_depth_codes: int) -> None:
    """A `ValueError` naming the tokenizer file when the tokenizer already has one of the depth tokens."""
    vocabulary = tokenizer.get_vocab()
    wanted = [DEPTH_START_TOKEN, DEPTH_END_TOKEN, *depth_code_tokens(num_depth_codes)]
    present = [token for token in wanted if token in vocabulary]
    if present:
        where = next((folder / name for name in TOKENIZER_FILES if (folder / name).is_file()), folder)
        raise ValueError(
            f"{where}: the tokenizer already has {present} (id {vocabulary[present[0]]}); the depth tokens are added "
            "once, to a segmentation-only checkpoint."
        )


def load_any_depth_tokenizer(name_or_path: str | Path) -> PerceptioDepthTokenizer:
    """The depth tokenizer of a folder or Hub id in float32 (as `load_depth_tokenizer`), whatever its grid (N follows
    it), or a `ValueError` naming the folder or its config.json when it is missing or not a
    `PerceptioDepthTokenizer`."""
    path = Path(name_or_path)
    if not path.exists() and not looks_like_hub_id(name_or_path):
        raise ValueError(f"The depth tokenizer folder {path} does not exist.")
    if path.exists() and not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path / CONFIG_FILE} does not exist: {path} is not a PerceptioDepthTokenizer folder.")
    config_dict, where = read_config_dict(name_or_path, "depth tokenizer")
    if config_dict.get("model_type") != DEPTH_TOKENIZER_MODEL_TYPE:
        raise ValueError(
            f"{where} has model_type {config_dict.get('model_type')!r}; expected a PerceptioDepthTokenizer "
            f"(model_type {DEPTH_TOKENIZER_MODEL_TYPE!r}), as `perceptio train-depth-tokenizer` writes."
        )
    num_tokens = PerceptioDepthTokenizerConfig.from_dict(config_dict).num_tokens
    return load_depth_tokenizer(name_or_path, num_tokens)


def grown_config(config: PerceptioConfig, vocab_size: int, depth_config, processor: PerceptioProcessor):
    """`config` with the grown vocabulary, the depth tokenizer and the new token ids (everything else unchanged)."""
    fields = {key: value for key, value in config.to_dict().items() if key not in BASE_CONFIG_FIELDS_NOT_CARRIED}
    fields["text_config"] = {**fields["text_config"], "vocab_size": vocab_size}
    fields["depth_tokenizer_config"] = depth_config.to_dict()
    fields.update(processor.spatial_vocabulary.config_fields())
    return PerceptioConfig(**fields)


def assign_into_grown_model(
    config: PerceptioConfig, state: dict[str, torch.Tensor]
) -> PerceptioForConditionalGeneration:
    """The model of `config` built on the meta device with `state` assigned into it (no copies); every weight must
    have a source, so nothing is initialised here."""
    with init_empty_weights():
        model = PerceptioForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # The LM head of a tied checkpoint is the embedding; assignment leaves its meta placeholder until re-tied.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"The weights do not fit the grown model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    model.tie_weights()
    on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if on_meta:
        raise ValueError(f"Weights left uninitialised after assembly: {on_meta[:5]}.")
    return model.eval()


def add_depth_tokens(
    source: str | Path,
    depth_tokenizer: str | Path,
    output_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    card_data: PerceptioCardData | None = None,
) -> PerceptioBuildResult:
    """Add depth tokens and a depth tokenizer to the segmentation-only checkpoint in `source`; write `output_dir`.

    Args:
        source: a segmentation-only Perceptio folder (what `perceptio convert-sa2va` writes).
        depth_tokenizer: folder or Hub id of a `PerceptioDepthTokenizer`; its codebook size is K and its code grid
            N, the codes per depth block.
        output_dir: folder to write (must be empty or absent unless `overwrite`).
        dtype: `float32`, `bfloat16` or `float16`; the source's own dtype by default. The depth tokenizer is
            added in float32 whatever it is (see `load_depth_tokenizer`).
        overwrite: write into a non-empty `output_dir`.
        card_data: what the model card says beyond the build.

    Raises a `ValueError` naming the file and field when the source is not segmentation-only, the depth tokenizer
    folder is missing or not a depth tokenizer, or the tokenizer already has depth tokens.
    """
    checkpoint = read_segmentation_only_checkpoint(source)
    torch_dtype = resolve_dtype(dtype) if dtype is not None else checkpoint.dtype
    output_dir = Path(output_dir)
    if output_dir.resolve() == checkpoint.folder.resolve():
        raise ValueError(f"The output folder {output_dir} is the source; write the build to another folder.")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    depth = load_any_depth_tokenizer(depth_tokenizer)

    source_processor = PerceptioProcessor.from_pretrained(str(checkpoint.folder))
    tokenizer = source_processor.tokenizer
    check_depth_tokens_absent(tokenizer, checkpoint.folder, depth.config.num_codes)
    processor = PerceptioProcessor(
        image_processor=source_processor.image_processor,
        tokenizer=tokenizer,
        chat_template=source_processor.chat_template,
        num_depth_codes=depth.config.num_codes,
        image_seq_length=source_processor.image_seq_length,
        num_depth_tokens=depth.config.num_tokens,
    )
    vocabulary = processor.spatial_vocabulary
    added_ids = [vocabulary.depth_start, vocabulary.depth_end, *vocabulary.depth_code_ids]

    model = PerceptioForConditionalGeneration.from_pretrained(str(checkpoint.folder), dtype=torch_dtype)
    base_vocab_size = model.get_input_embeddings().weight.shape[0]
    vocab_size = max(base_vocab_size, len(tokenizer))
    if vocab_size > base_vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    config = grown_config(model.config, vocab_size, depth.config, processor)
    state = dict(model.state_dict())
    state.update({f"depth_tokenizer.{key}": tensor for key, tensor in depth.state_dict().items()})
    grown = assign_into_grown_model(config, state)
    grown.generation_config = model.generation_config
    del model, depth, state
    grown.initialize_new_token_embeddings(added_ids)

    folder = export_pretrained(grown, processor, output_dir, overwrite=overwrite)
    card_data = replace(card_data or PerceptioCardData(), source_kind="sa2va")
    sources = card_data.with_build_sources(
        base=str(source), sam2=f"{source} (Sa2VA's SAM2)", depth_tokenizer=str(depth_tokenizer)
    )
    write_model_card(folder, sources)
    return PerceptioBuildResult(
        output_dir=folder, added_token_ids=added_ids, base_vocab_size=base_vocab_size, vocab_size=vocab_size
    )


__all__ = [
    "SegmentationCheckpoint",
    "add_depth_tokens",
    "load_any_depth_tokenizer",
    "read_segmentation_only_checkpoint",
]
