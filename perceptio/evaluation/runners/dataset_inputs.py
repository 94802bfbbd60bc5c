"""Reading benchmark inputs: `datasets` splits with the columns a layout needs, and images that must decode.

Errors name what is wrong and where: a missing split lists the splits there are, a missing column lists the
columns there are, an image that fails to decode names its file or row (as a `BadSampleError`, which a run with
`skip_bad` counts and skips).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

from .resumable_run import BadSampleError


def load_split(
    data: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    split: str | None,
    config_name: str | None = None,
) -> datasets.Dataset:
    """One split of a dataset given as a `Dataset`, a `DatasetDict`, a `save_to_disk` folder, or a `load_dataset`
    name / local path (data files or a loading script's folder).

    `split` may be None only when the source is a single split. `config_name` (a Hub dataset's subset, e.g. BLINK's
    "Relative_Depth") is passed to `load_dataset` for names that are not local paths.
    """
    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        data = _load_source(str(data), split, config_name)
        if isinstance(data, datasets.Dataset):
            return data
    if not isinstance(data, datasets.DatasetDict):
        raise ValueError(
            f"data must be a datasets.Dataset, a DatasetDict, a folder or a dataset name; got {type(data).__name__}."
        )
    if split is None:
        if len(data) == 1:
            return next(iter(data.values()))
        raise ValueError(f"The dataset has splits {sorted(data)}; choose one with --split.")
    if split not in data:
        raise ValueError(f"Split {split!r} is not in the dataset; it has {sorted(data)}.")
    return data[split]


def _load_source(source: str, split: str | None, config_name: str | None) -> datasets.Dataset | datasets.DatasetDict:
    path = Path(source)
    if path.is_dir() and (path / "dataset_dict.json").exists():
        return _load_saved_splits(path, split)
    if path.is_dir() and (path / "state.json").exists():
        return _load_from_disk(path)
    try:
        if path.exists() or config_name is None:
            return datasets.load_dataset(source)
        return datasets.load_dataset(source, config_name)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise ValueError(f"Could not load a dataset from {source!r}: {error}") from error


def _load_saved_splits(path: Path, split: str | None) -> datasets.DatasetDict:
    """The requested split of a `DatasetDict.save_to_disk` folder (every split when `split` is None), so a split
    that is not asked for (an empty validation split, say) is never read."""
    splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
    if split is not None and split not in splits:
        raise ValueError(f"Split {split!r} is not in the dataset at {str(path)!r}; it has {sorted(splits)}.")
    return datasets.DatasetDict({name: _load_from_disk(path / name) for name in ([split] if split else splits)})


def _load_from_disk(path: Path) -> datasets.Dataset:
    try:
        return datasets.load_from_disk(str(path))
    except (IndexError, OSError) as error:
        # `datasets` cannot concatenate the arrow files of a split saved with no rows (IndexError).
        raise ValueError(f"Could not load the saved dataset at {str(path)!r} (is it empty?): {error!r}") from error


def require_columns(split: datasets.Dataset, columns: Sequence[str], layout: str) -> None:
    """Raise ValueError naming the columns of `layout` that `split` lacks (and the ones it has)."""
    missing = [column for column in columns if column not in split.column_names]
    if missing:
        raise ValueError(
            f"The dataset lacks column(s) {missing} of the {layout} layout (needs {list(columns)}); "
            f"it has {split.column_names}."
        )


def rows_without_decoding(split: datasets.Dataset, columns: Sequence[str]) -> datasets.Dataset:
    """The split with its image columns left undecoded, so one corrupt image fails its own row, not the batch."""
    for column in columns:
        feature = split.features.get(column)
        if isinstance(feature, datasets.Image):
            split = split.cast_column(column, datasets.Image(decode=False))
    return split


def decode_rgb_image(value: Any, where: str) -> Image.Image:
    """An RGB PIL image from a PIL image, a `datasets` image dict (`bytes` / `path`), bytes or a file path.

    Raises `BadSampleError` naming `where` (a file or row) when the image is missing or fails to decode.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        else:
            raise BadSampleError(f"{where}: no image (got {type(value).__name__}).")
        image.load()
        return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        if isinstance(error, BadSampleError):
            raise
        raise BadSampleError(f"{where}: the image fails to decode ({error}).") from error
