"""Per-`[SEG]` attribute labels of the synthetic referring samples: what each object's noun phrase names.

A `[SEG]` state prompts SAM2, so it must carry which object the sentence picks out; the language-model loss alone
never asks for that (the next token after `[SEG]` is the same whatever the phrase). These labels let the model's
`seg_attribute_heads` ask it: for each `[SEG]`, the colour, shape and size the expression names for that object, or
"not named" (the last class of each attribute). They come from the `named` entry of a referring sample's `meta`.

The `seg_attributes` column (one row of `len(SEG_ATTRIBUTES)` class ids per mask, empty for a sample without masks)
is what `PerceptioDataCollator` passes to the model; `seg_attribute_classes()` sizes the model's heads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from datasets import Dataset, Sequence, Value

from .scene_rendering import COLOUR_PALETTE, SHAPES, SIZE_NAMES


# The attributes a referring phrase can name, each with its values; the class after the last value is "not named".
SEG_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOUR_PALETTE),
    "shape": SHAPES,
    "size": SIZE_NAMES,
}
SEG_ATTRIBUTE_COLUMN = "seg_attributes"
# The column's type: one list of class ids per mask.
SEG_ATTRIBUTE_FEATURE = Sequence(Sequence(Value("int64")))


def seg_attribute_classes() -> list[int]:
    """The number of classes of each attribute of `SEG_ATTRIBUTES`: its values plus "not named"."""
    return [len(values) + 1 for values in SEG_ATTRIBUTES.values()]


def not_named_ids() -> list[int]:
    """The "not named" class id of each attribute."""
    return [len(values) for values in SEG_ATTRIBUTES.values()]


def named_attribute_ids(named: Mapping[str, str | None]) -> list[int]:
    """One noun phrase's named attributes ({"colour": "red", "shape": None, ...}) -> a class id per attribute."""
    ids = []
    for attribute, values in SEG_ATTRIBUTES.items():
        value = named.get(attribute)
        if value is not None and value not in values:
            raise ValueError(f"The {attribute} {value!r} is not one of {values}.")
        ids.append(len(values) if value is None else values.index(value))
    return ids


def seg_attribute_labels(meta: str | Mapping[str, Any], num_masks: int) -> list[list[int]]:
    """A row's labels from its `meta` (JSON or parsed) and number of masks: one list of class ids per mask (per
    `[SEG]`), or [] for a row without masks.

    Raises:
        ValueError: the row has masks but its `meta` has no `named` entry with one phrase per mask (a dataset built
            by an older version of the package: rebuild it).
    """
    if not num_masks:
        return []
    parsed = json.loads(meta) if isinstance(meta, str) else meta
    named = parsed.get("named") if isinstance(parsed, Mapping) else None
    if not isinstance(named, list) or len(named) != num_masks:
        raise ValueError(
            f"A row with {num_masks} mask(s) needs meta['named'] with one phrase per mask, got {named!r}; rebuild "
            "the dataset with this version of build_synthetic_dataset."
        )
    return [named_attribute_ids(phrase) for phrase in named]


def add_seg_attribute_column(dataset: Dataset) -> Dataset:
    """`dataset` (with `meta` and `masks` columns) plus the `seg_attributes` column of `seg_attribute_labels`."""
    features = dataset.features.copy()
    features[SEG_ATTRIBUTE_COLUMN] = SEG_ATTRIBUTE_FEATURE
    return dataset.map(
        lambda meta, masks: {SEG_ATTRIBUTE_COLUMN: seg_attribute_labels(meta, len(masks))},
        input_columns=["meta", "masks"],
        features=features,
        desc="[SEG] attribute labels",
    )


__all__ = [
    "SEG_ATTRIBUTES",
    "SEG_ATTRIBUTE_COLUMN",
    "SEG_ATTRIBUTE_FEATURE",
    "add_seg_attribute_column",
    "named_attribute_ids",
    "not_named_ids",
    "seg_attribute_classes",
    "seg_attribute_labels",
]
