"""Per-`[SEG]` attribute labels of the synthetic referring samples: what each `[SEG]`'s object is.

A `[SEG]` state prompts SAM2, so it must carry which object the sentence picks out; the language-model loss alone
never asks for that (the next token after `[SEG]` is the same whatever the phrase). These labels let the model's
`seg_attribute_heads` ask it, with one of two targets (`SEG_ATTRIBUTE_TARGETS`):

- "named": the colour, shape and size the expression names for that object, or "not named" (the last class of each
  attribute), from the `named` entry of a referring sample's `meta`. For "the cylinder farthest from the camera"
  this asks for "cylinder" only: which cylinder is left to the mask loss.
- "referred": the referred object's own colour, shape and size, and its nearness and column ranks among the
  scene's objects, from the `referred` entry of `meta`. This asks the state which object the whole expression
  resolves to, superlatives and relations included.

The `seg_attributes` column (one row of class ids per mask, empty for a sample without masks) is what
`PerceptioDataCollator` passes to the model; `seg_attribute_classes(target)` sizes the model's heads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from datasets import Dataset, Sequence, Value

from .scene_rendering import COLOUR_PALETTE, DEFAULT_SAMPLING_CONFIG, SHAPES, SIZE_NAMES


# The attributes a referring phrase can name, each with its values; the class after the last value is "not named".
SEG_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOUR_PALETTE),
    "shape": SHAPES,
    "size": SIZE_NAMES,
}
# What a referred object is and where: its own attributes, then its ranks among the scene's objects.
_RANKS = tuple(range(DEFAULT_SAMPLING_CONFIG.max_objects))
REFERRED_ATTRIBUTES: dict[str, tuple] = {**SEG_ATTRIBUTES, "nearness_rank": _RANKS, "column_rank": _RANKS}
SEG_ATTRIBUTE_TARGETS: tuple[str, ...] = ("named", "referred")
SEG_ATTRIBUTE_COLUMN = "seg_attributes"
# The column's type: one list of class ids per mask.
SEG_ATTRIBUTE_FEATURE = Sequence(Sequence(Value("int64")))


def validate_seg_attribute_target(target: str) -> None:
    """Raise a `ValueError` unless `target` is one of `SEG_ATTRIBUTE_TARGETS`."""
    if target not in SEG_ATTRIBUTE_TARGETS:
        raise ValueError(f"The [SEG] attribute target must be one of {SEG_ATTRIBUTE_TARGETS}, got {target!r}.")


def seg_attribute_names(target: str = "named") -> list[str]:
    """The attributes `target`'s labels hold, in column order."""
    validate_seg_attribute_target(target)
    return list(SEG_ATTRIBUTES if target == "named" else REFERRED_ATTRIBUTES)


def seg_attribute_classes(target: str = "named") -> list[int]:
    """The number of classes of each attribute `target` labels: for "named", its values plus "not named"; for
    "referred", its values."""
    validate_seg_attribute_target(target)
    if target == "named":
        return [len(values) + 1 for values in SEG_ATTRIBUTES.values()]
    return [len(values) for values in REFERRED_ATTRIBUTES.values()]


def seg_attribute_target_for_classes(head_classes: list[int]) -> str:
    """The target whose labels a model's heads with `head_classes` classes learn.

    Raises:
        ValueError: no target labels that many classes.
    """
    for target in SEG_ATTRIBUTE_TARGETS:
        if list(head_classes) == seg_attribute_classes(target):
            return target
    accepted = {target: seg_attribute_classes(target) for target in SEG_ATTRIBUTE_TARGETS}
    raise ValueError(
        f"The model's [SEG] attribute heads have {list(head_classes)} classes, but the synthetic scenes' labels have "
        f"{accepted}; train a model whose config.seg_attribute_classes is one of these, or one without heads."
    )


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


def referred_attribute_ids(referred: Mapping[str, Any]) -> list[int]:
    """One referred object's facts ({"colour": "red", ..., "nearness_rank": 0, "column_rank": 2}) -> a class id per
    attribute of `REFERRED_ATTRIBUTES`."""
    ids = []
    for attribute, values in REFERRED_ATTRIBUTES.items():
        value = referred.get(attribute)
        if value not in values:
            raise ValueError(f"The referred object's {attribute} {value!r} is not one of {values}.")
        ids.append(values.index(value))
    return ids


def seg_attribute_labels(meta: str | Mapping[str, Any], num_masks: int, target: str = "named") -> list[list[int]]:
    """A row's labels from its `meta` (JSON or parsed) and number of masks: one list of class ids per mask (per
    `[SEG]`), or [] for a row without masks. `target` is "named" or "referred" (see the module docstring).

    Raises:
        ValueError: the row has masks but its `meta` has no `named` (or `referred`) entry with one item per mask (a
            dataset built by an older version of the package: rebuild it).
    """
    validate_seg_attribute_target(target)
    if not num_masks:
        return []
    parsed = json.loads(meta) if isinstance(meta, str) else meta
    entries = parsed.get(target) if isinstance(parsed, Mapping) else None
    if not isinstance(entries, list) or len(entries) != num_masks:
        raise ValueError(
            f"A row with {num_masks} mask(s) needs meta[{target!r}] with one entry per mask, got {entries!r}; "
            "rebuild the dataset with this version of build_synthetic_dataset."
        )
    to_ids = named_attribute_ids if target == "named" else referred_attribute_ids
    return [to_ids(entry) for entry in entries]


def add_seg_attribute_column(dataset: Dataset, target: str = "named") -> Dataset:
    """`dataset` (with `meta` and `masks` columns) plus the `seg_attributes` column of `seg_attribute_labels` for
    `target`."""
    validate_seg_attribute_target(target)
    features = dataset.features.copy()
    features[SEG_ATTRIBUTE_COLUMN] = SEG_ATTRIBUTE_FEATURE
    return dataset.map(
        lambda meta, masks: {SEG_ATTRIBUTE_COLUMN: seg_attribute_labels(meta, len(masks), target)},
        input_columns=["meta", "masks"],
        features=features,
        desc="[SEG] attribute labels",
    )


__all__ = [
    "REFERRED_ATTRIBUTES",
    "SEG_ATTRIBUTES",
    "SEG_ATTRIBUTE_COLUMN",
    "SEG_ATTRIBUTE_FEATURE",
    "SEG_ATTRIBUTE_TARGETS",
    "add_seg_attribute_column",
    "named_attribute_ids",
    "not_named_ids",
    "referred_attribute_ids",
    "seg_attribute_classes",
    "seg_attribute_labels",
    "seg_attribute_names",
    "seg_attribute_target_for_classes",
    "validate_seg_attribute_target",
]
