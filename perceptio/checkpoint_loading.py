"""Loading a Perceptio checkpoint folder (model + processor), with one-line errors naming the file that is wrong.

Every command that loads a checkpoint folder goes through here (`perceptio predict`, `eval`, `export`, `demo` and the
lmms-eval adapter), and `perceptio push` runs `check_checkpoint_folder` before its isolated load. A truncated weights
file, an invalid config.json or a missing tokenizer would otherwise surface as a long traceback from deep inside
transformers, safetensors or tokenizers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from transformers.processing_utils import PROCESSOR_NAME
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .models.perceptio import PerceptioConfig, PerceptioForConditionalGeneration, PerceptioProcessor


TOKENIZER_NAME = "tokenizer.json"
# The processor's config; older transformers wrote it under the image processor's name.
PROCESSOR_CONFIG_NAMES = (PROCESSOR_NAME, "preprocessor_config.json")
LFS_POINTER_PREFIX = b"version https://git-lfs"
MAX_ERROR_CHARACTERS = 400
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_checkpoint_folder(path: str | os.PathLike) -> Path:
    """`path` if it holds a complete Perceptio checkpoint, else a one-line `ValueError` naming the file at fault.

    Checks what loading needs without loading it: config.json is a JSON object with `model_type` "perceptio", every
    safetensors weights file is complete, and the processor's tokenizer.json and processor config are readable.
    """
    folder = Path(path)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a Perceptio checkpoint folder (no {CONFIG_NAME}).")
    model_type = read_json_object(config_path).get("model_type")
    if model_type != PerceptioConfig.model_type:
        raise ValueError(
            f"{config_path}: model_type is {model_type!r}, not {PerceptioConfig.model_type!r}; this is not a "
            "Perceptio checkpoint (`perceptio build` makes one from InternVL, SAM2 and a depth tokenizer)."
        )
    for weights_path in _weights_files(folder):
        _check_safetensors(weights_path)
    _check_tokenizer(folder / TOKENIZER_NAME)
    processor_configs = [folder / name for name in PROCESSOR_CONFIG_NAMES if (folder / name).is_file()]
    if not processor_configs:
        raise ValueError(
            f"{folder} has no {PROCESSOR_NAME} (the processor's settings); write it with "
            "processor.save_pretrained(folder)."
        )
    read_json_object(processor_configs[0])
    return folder


def load_perceptio_checkpoint(
    path: str | os.PathLike, device: str = "cpu", dtype: str = "auto", attn_implementation: str = "sdpa"
):
    """`(model, processor)` of a checkpoint folder, the model in eval mode on `device`.

    Args:
        path: a folder written by `save_pretrained` or `perceptio export` (it has a config.json).
        device: a torch device string ("cpu", "cuda", "cuda:1").
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16". The depth tokenizer always gets its
            stored weights in float32 (`PerceptioForConditionalGeneration._keep_in_fp32_modules_strict`); SAM2 runs
            in `dtype`, as in Sa2VA.
        attn_implementation: transformers' attention kernel, passed to `from_pretrained` ("sdpa", PyTorch's fused
            attention, by default; "eager", "flash_attention_2"…).

    Every failure is a one-line `ValueError` naming the file (or folder) and what is wrong.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}.")
    if not isinstance(attn_implementation, str) or not attn_implementation:
        raise ValueError(
            f"attn_implementation must be a non-empty string such as 'sdpa', got {attn_implementation!r}."
        )
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device ({error}).") from error
    folder = check_checkpoint_folder(path)
    try:
        config = PerceptioConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{folder / CONFIG_NAME}: {one_line(error)}") from error
    try:
        model, loading_info = PerceptioForConditionalGeneration.from_pretrained(
            folder,
            config=config,
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ValueError(
            f"{folder}: the weights do not load into the model of its {CONFIG_NAME} ({one_line(error)})"
        ) from error
    # transformers only warns and leaves such weights random: a model that would answer from noise.
    missing = sorted(loading_info["missing_keys"])
    if missing:
        raise ValueError(
            f"{folder}: the weights lack {len(missing)} tensor(s) the model of its {CONFIG_NAME} needs "
            f"(first: {', '.join(missing[:3])})."
        )
    try:
        processor = PerceptioProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{folder}: the processor does not load ({one_line(error)})") from error
    return model.to(torch_device).eval(), processor


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or a one-line `ValueError` naming the file and what is wrong with it."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}).") from error
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
        ) from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(content).__name__}.")
    return content


def one_line(error: BaseException) -> str:
    """The error's message on one line (whitespace collapsed, at most `MAX_ERROR_CHARACTERS`), else its type."""
    message = " ".join(str(error).split()) or type(error).__name__
    return message if len(message) <= MAX_ERROR_CHARACTERS else message[: MAX_ERROR_CHARACTERS - 1] + "…"


def _weights_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards that model.safetensors.index.json lists."""
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [folder / SAFE_WEIGHTS_NAME]
    index_path = folder / SAFE_WEIGHTS_INDEX_NAME
    if not index_path.is_file():
        raise ValueError(f"{folder} has no weights: neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}.")
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no `weight_map` object (tensor name -> shard file).")
    shards = [folder / str(name) for name in sorted(set(weight_map.values()))]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise ValueError(f"{index_path} lists shard(s) {missing} that are not in {folder}.")
    return shards


def _check_safetensors(path: Path) -> None:
    with open(path, "rb") as file:
        if file.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
            raise ValueError(f"{path} is a Git LFS pointer, not the weights; fetch them with `git lfs pull`.")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a complete safetensors file ({one_line(error)}); it may be truncated: copy or download it "
            "again."
        ) from error


def _check_tokenizer(path: Path) -> None:
    if not path.is_file():
        raise ValueError(
            f"{path.parent} has no {TOKENIZER_NAME} (the processor's tokenizer); write it with "
            "processor.save_pretrained(folder)."
        )
    read_json_object(path)
    try:
        Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot deserialise
        raise ValueError(f"{path} is not a tokenizer the tokenizers library can read ({one_line(error)}).") from error


__all__ = ["check_checkpoint_folder", "load_perceptio_checkpoint"]
