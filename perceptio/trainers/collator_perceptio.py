"""`PerceptioDataCollator`: samples of the Perceptio schema -> one padded training batch for the model's forward.

A sample is either a row of the schema documented in `perceptio/data/synthetic_dataset.py` (`image`, `prompt`,
`answer`, `masks`, `depth`, `use_depth_block`, `task`, `meta`), optionally with the cached columns the joint data
builder adds (`inverse_depth`: relative inverse depth from the teacher; `depth_codes`: the N depth codes), or an
already-built example (`input_ids`, `labels` and optionally `pixel_values`, `sam_pixel_values`, `gt_masks`,
`depth_map`). Either may carry a `task` name, which `return_tasks=True` puts in the batch for per-task logging, and
`seg_attributes` (one row of class ids per mask, see `perceptio/data/seg_attributes.py`), the targets of the model's
`loss_seg_attribute`, and `seg_prompt_targets` (one target SAM2 prompt per mask, see
`perceptio/trainers/seg_prompt_targets.py`), the targets of its `loss_seg_prompt`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from perceptio.data.scene_rendering import metric_depth_to_inverse_depth
from perceptio.data.seg_attributes import SEG_ATTRIBUTE_COLUMN
from perceptio.models.perceptio.loss_perceptio import UNLABELLED_SEG_ATTRIBUTE
from perceptio.models.perceptio.modeling_perceptio_depth_tokenizer import PerceptioDepthTokenizer
from perceptio.models.perceptio.processing_perceptio import IGNORE_INDEX, PerceptioProcessor
from perceptio.models.perceptio.spatial_vocabulary_perceptio import PerceptioSpatialVocabulary
from perceptio.trainers.seg_prompt_targets import SEG_PROMPT_COLUMN


# A mask stored as 8-bit image (the schema's 0/255) is "object" above this value; a float mask above 0.5.
MASK_BYTE_THRESHOLD = 127
MASK_FLOAT_THRESHOLD = 0.5
SAMPLE_NAME_PROMPT_CHARS = 40
# The task name of a sample that has none (an already-built example, a dataset without a `task` column).
NO_TASK = ""


class PerceptioDataCollator:
    """Pads a list of samples into the inputs of `PerceptioForConditionalGeneration.forward`.

    Text is right-padded (labels with -100); InternVL tiles of all samples are concatenated into `pixel_values`;
    `sam_pixel_values` has one SAM2 image per sample, a zero image for samples without one, so every process in a
    distributed run builds the same graph; `gt_masks` holds one (num_seg, H, W) bool tensor per sample (empty when it
    has none); `depth_maps` one relative inverse depth map (H, W) per sample with a depth block, else `None`. When any
    sample has a non-empty `seg_attributes` column, `seg_attributes` holds one (num_seg, A) long tensor per sample
    (`UNLABELLED_SEG_ATTRIBUTE` rows for a sample without labels), for a model with `seg_attribute_heads`; likewise
    `seg_prompt_targets`, one (num_seg, C) float tensor per sample (NaN rows for a sample without targets).

    Depth codes come from a sample's cached `depth_codes` when present, else `depth_tokenizer.encode` of its relative
    inverse depth (metric `depth` is converted to 1/z first). Caching them as a dataset column with
    `perceptio.trainers.data_mixture.add_depth_code_column` avoids encoding at every epoch.

    With `return_tasks=True` the batch also has `tasks`, one task name per sample (`NO_TASK`, the empty string, for a
    sample without a `task`), which `PerceptioTrainer` pops before the forward to log the language-model loss per
    task. It is off by default so that every other consumer (a plain `transformers.Trainer`, `model(**batch)`) gets
    exactly the model's inputs; `PerceptioTrainer` turns it on for its own copy of the collator.

    Targets are written and checked by the processor's `spatial_vocabulary`; with a segmentation-only vocabulary
    (`num_depth_codes=0`) a sample that asks for a depth block is an error.

    Args:
        processor: the model's `PerceptioProcessor` (tokenizer with the spatial vocabulary, image processor).
        depth_tokenizer: the model's depth tokenizer, used to encode samples that have no cached codes; a CPU copy is
            kept so data-loader workers never touch an accelerator.
        num_depth_tokens: N, the codes per depth block; read from `depth_tokenizer`, else from the processor, when
            omitted.
        max_num_tiles: tiles per image for InternVL (the image processor's default when omitted).
        padding_side: "right" (the only side for teacher-forced training; generation pads left).
        return_tasks: add the `tasks` list to the batch (not a model input; for `PerceptioTrainer`).
    """

    def __init__(
        self,
        processor: PerceptioProcessor,
        depth_tokenizer: PerceptioDepthTokenizer | None = None,
        num_depth_tokens: int | None = None,
        max_num_tiles: int | None = None,
        padding_side: str = "right",
        return_tasks: bool = False,
    ):
        if not isinstance(processor, PerceptioProcessor):
            raise ValueError(f"processor must be a PerceptioProcessor, got {type(processor).__name__}.")
        if padding_side != "right":
            raise ValueError(
                f"padding_side must be 'right' for training (labels follow inputs), got {padding_side!r}."
            )
        if not isinstance(return_tasks, bool):
            raise ValueError(f"return_tasks must be a bool, got {return_tasks!r}.")
        if depth_tokenizer is not None and not isinstance(depth_tokenizer, PerceptioDepthTokenizer):
            raise ValueError(
                f"depth_tokenizer must be a PerceptioDepthTokenizer or None, got {type(depth_tokenizer).__name__}."
            )
        if num_depth_tokens is None and depth_tokenizer is not None:
            num_depth_tokens = depth_tokenizer.config.num_tokens
        if depth_tokenizer is not None and depth_tokenizer.config.num_tokens != num_depth_tokens:
            raise ValueError(
                f"num_depth_tokens ({num_depth_tokens}) differs from the depth tokenizer's grid "
                f"({depth_tokenizer.config.num_tokens} codes)."
            )
        self.processor = processor
        self.spatial_vocabulary: PerceptioSpatialVocabulary = processor.spatial_vocabulary.with_num_depth_tokens(
            num_depth_tokens
        )
        self.depth_tokenizer = copy.deepcopy(depth_tokenizer).cpu().eval() if depth_tokenizer is not None else None
        self.max_num_tiles = max_num_tiles
        self.padding_side = padding_side
        self.return_tasks = return_tasks

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not isinstance(samples, Sequence) or not samples:
            raise ValueError("The collator needs a non-empty list of samples.")
        examples = [self.build_example(sample, index) for index, sample in enumerate(samples)]
        return self.pad_examples(examples)

    def build_example(self, sample: Mapping[str, Any], index: int = 0) -> dict[str, Any]:
        """One sample (schema row or built example) -> `input_ids`, `labels`, images, `gt_masks`, `depth_map`, task."""
        if not isinstance(sample, Mapping):
            raise ValueError(f"Sample {index} must be a mapping (a dataset row), got {type(sample).__name__}.")
        name = sample_name(sample, index)
        if "input_ids" in sample and "labels" in sample:
            example = self._built_example(sample, name)
        else:
            example = self._example_from_schema(sample, name)
        self._check_example(example, name)
        example["task"] = sample_task(sample, name)
        for column in PER_MASK_COLUMNS:
            example[column] = per_mask_rows(sample.get(column), example["gt_masks"], name, column)
        return example

    def pad_examples(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Pad and stack built examples into one batch (with their `tasks` when `return_tasks`)."""
        input_ids = [example["input_ids"] for example in examples]
        batch: dict[str, Any] = {
            "input_ids": self.processor.pad(input_ids, self.padding_side),
            "labels": self.processor.pad([example["labels"] for example in examples], self.padding_side, IGNORE_INDEX),
            "attention_mask": self.processor.pad(
                [torch.ones_like(ids) for ids in input_ids], self.padding_side, padding_value=0
            ),
        }
        tiles = [example["pixel_values"] for example in examples if example.get("pixel_values") is not None]
        if tiles:
            batch["pixel_values"] = torch.cat(tiles)
        batch["sam_pixel_values"] = torch.stack([self._sam_image(example) for example in examples])
        batch["gt_masks"] = [example["gt_masks"] for example in examples]
        batch["depth_maps"] = [example["depth_map"] for example in examples]
        for column in PER_MASK_COLUMNS:
            rows = batch_per_mask_rows(examples, column)
            if rows is not None:
                batch[column] = rows
        if self.return_tasks:
            batch["tasks"] = [example.get("task", NO_TASK) for example in examples]
        return batch

    def _example_from_schema(self, sample: Mapping[str, Any], name: str) -> dict[str, Any]:
        for field in ("prompt", "answer"):
            if not isinstance(sample.get(field), str):
                raise ValueError(f"{name}: field {field!r} must be a string, got {type(sample.get(field)).__name__}.")
        masks = masks_to_tensor(sample.get("masks"), name)
        use_depth_block = bool(sample.get("use_depth_block", False))
        if use_depth_block and not self.spatial_vocabulary.has_depth_block:
            raise ValueError(
                f"{name} asks for a depth block, but the processor's vocabulary is segmentation-only "
                "(num_depth_codes=0); set its use_depth_block to False."
            )
        depth_map = relative_inverse_depth(sample, name) if use_depth_block else None
        codes = self._depth_codes(sample, depth_map, name) if use_depth_block else None
        target = self.processor.format_target(masks.shape[0], codes, sample["answer"])
        image = sample.get("image")
        example = self.processor.build_training_example(
            sample["prompt"], target, images=None if image is None else [image], max_num_tiles=self.max_num_tiles
        )
        example["gt_masks"] = masks
        example["depth_map"] = depth_map
        return example

    def _built_example(self, sample: Mapping[str, Any], name: str) -> dict[str, Any]:
        example = {key: torch.as_tensor(sample[key]) for key in ("input_ids", "labels")}
        if example["input_ids"].ndim != 1 or example["input_ids"].shape != example["labels"].shape:
            raise ValueError(
                f"{name}: input_ids and labels must be 1-D and of equal length, got {tuple(example['input_ids'].shape)} "
                f"and {tuple(example['labels'].shape)}."
            )
        for key in ("pixel_values", "sam_pixel_values"):
            if sample.get(key) is not None:
                example[key] = torch.as_tensor(sample[key])
        example["gt_masks"] = masks_to_tensor(sample.get("gt_masks"), name)
        depth_map = sample.get("depth_map")
        example["depth_map"] = (
            None if depth_map is None else torch.as_tensor(np.asarray(depth_map), dtype=torch.float32)
        )
        return example

    def _depth_codes(self, sample: Mapping[str, Any], depth_map: torch.Tensor, name: str) -> list[int]:
        cached = sample.get("depth_codes")
        if cached is not None and len(cached):
            codes = [int(code) for code in np.asarray(cached).reshape(-1)]
        elif self.depth_tokenizer is not None:
            codes = self.depth_tokenizer.encode(depth_map[None])[0].tolist()
        else:
            raise ValueError(
                f"{name} asks for a depth block but has no 'depth_codes' and the collator has no depth_tokenizer to "
                "encode its depth; pass depth_tokenizer=model.depth_tokenizer or add a depth_codes column."
            )
        self._check_codes(codes, name)
        return codes

    def _check_codes(self, codes: list[int], name: str) -> None:
        if self.spatial_vocabulary.num_depth_tokens is None:
            raise ValueError(
                f"{name} has a depth block but the collator does not know N: pass num_depth_tokens or depth_tokenizer."
            )
        try:
            self.spatial_vocabulary.check_depth_codes(codes)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error

    def _check_example(self, example: Mapping[str, Any], name: str) -> None:
        vocabulary = self.spatial_vocabulary
        num_seg = int((example["input_ids"] == vocabulary.seg).sum())
        num_masks = example["gt_masks"].shape[0]
        if num_seg != num_masks:
            raise ValueError(
                f"{name} has {num_seg} [SEG] token(s) but {num_masks} mask(s); each [SEG] needs one mask."
            )
        if vocabulary.num_depth_tokens is None:
            if (example["labels"] == vocabulary.depth_start).any():
                raise ValueError(f"{name} has a depth block but the collator does not know N: pass num_depth_tokens.")
            return
        try:
            vocabulary.find_depth_blocks(example["labels"][None])
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error

    def _sam_image(self, example: Mapping[str, Any]) -> torch.Tensor:
        sam = example.get("sam_pixel_values")
        if sam is not None:
            return sam.reshape(sam.shape[-3:])
        # Image-less samples still run the (zero-weighted) mask path so all processes build the same graph.
        size = self.processor.image_processor.sam_image_size
        return torch.zeros(3, size, size)


def sample_name(sample: Mapping[str, Any], index: int) -> str:
    """How error messages name a sample: its batch index, task and the start of its prompt."""
    parts = [f"sample {index}"]
    if isinstance(sample.get("task"), str):
        parts.append(f"task {sample['task']!r}")
    if isinstance(sample.get("prompt"), str):
        prompt = sample["prompt"]
        parts.append(repr(prompt[:SAMPLE_NAME_PROMPT_CHARS] + ("…" if len(prompt) > SAMPLE_NAME_PROMPT_CHARS else "")))
    return parts[0] if len(parts) == 1 else f"{parts[0]} ({', '.join(parts[1:])})"


def sample_task(sample: Mapping[str, Any], name: str) -> str:
    """A sample's task name: its `task` string, or `NO_TASK` when it has none (missing or None)."""
    task = sample.get("task")
    if task is None:
        return NO_TASK
    if not isinstance(task, str):
        raise ValueError(f"{name}: field 'task' must be a string or None, got {type(task).__name__}.")
    return task


class PerMaskColumn(NamedTuple):
    """An optional column with one row per mask: its tensor type, the value that fills the rows of a sample without
    it, and what its values are (for errors)."""

    dtype: torch.dtype
    fill: float
    values: str


PER_MASK_COLUMNS = {
    SEG_ATTRIBUTE_COLUMN: PerMaskColumn(torch.long, UNLABELLED_SEG_ATTRIBUTE, "integer class ids"),
    SEG_PROMPT_COLUMN: PerMaskColumn(torch.float32, float("nan"), "prompt values"),
}


def per_mask_rows(rows: Any, masks: torch.Tensor, name: str, column: str) -> torch.Tensor | None:
    """A sample's per-mask `column` (one list of values per mask) as a (num_masks, width) tensor; `None` when it has
    none (missing or empty)."""
    if rows is None or len(rows) == 0:
        return None
    spec = PER_MASK_COLUMNS[column]
    try:
        array = np.asarray(rows)
        values = torch.as_tensor(array, dtype=spec.dtype)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: {column} must be one list of {spec.values} per mask, got {rows!r}.") from error
    if values.ndim != 2 or values.shape[0] != masks.shape[0] or values.shape[1] == 0:
        raise ValueError(
            f"{name}: {column} must have one row of {spec.values} per mask ({masks.shape[0]}), got shape "
            f"{tuple(values.shape)}."
        )
    if spec.dtype == torch.long and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name}: {column} must be one list of {spec.values} per mask, got {rows!r}.")
    return values


def batch_per_mask_rows(examples: Sequence[Mapping[str, Any]], column: str) -> list[torch.Tensor] | None:
    """The batch's per-mask `column`: one (num_seg, width) tensor per sample, filled rows for samples without it;
    `None` when no sample has it."""
    given = [example[column] for example in examples if example.get(column) is not None]
    if not given:
        return None
    widths = {rows.shape[1] for rows in given}
    if len(widths) != 1:
        raise ValueError(f"The batch's {column} rows have different lengths {sorted(widths)}; use one width.")
    width = widths.pop()
    spec = PER_MASK_COLUMNS[column]
    return [
        example[column]
        if example.get(column) is not None
        else torch.full((example["gt_masks"].shape[0], width), spec.fill, dtype=spec.dtype)
        for example in examples
    ]


def masks_to_tensor(masks: Any, name: str) -> torch.Tensor:
    """A sample's masks (list of PIL / arrays, or a (K, H, W) array; None or empty = no masks) -> bool (K, H, W)."""
    if masks is None or (not torch.is_tensor(masks) and not isinstance(masks, np.ndarray) and len(masks) == 0):
        return torch.zeros(0, 1, 1, dtype=torch.bool)
    if torch.is_tensor(masks) or isinstance(masks, np.ndarray):
        arrays = list(np.asarray(masks.cpu() if torch.is_tensor(masks) else masks))
    else:
        arrays = [np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask) for mask in masks]
    if not arrays:
        return torch.zeros(0, 1, 1, dtype=torch.bool)
    shapes = {array.shape for array in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 2:
        raise ValueError(f"{name}: masks must be 2-D and of one size, got shapes {sorted(shapes)}.")
    stacked = np.stack(arrays)
    if stacked.dtype == np.bool_:
        binary = stacked
    elif np.issubdtype(stacked.dtype, np.integer):
        binary = stacked > MASK_BYTE_THRESHOLD
    else:
        binary = stacked > MASK_FLOAT_THRESHOLD
    return torch.from_numpy(np.ascontiguousarray(binary))


def relative_inverse_depth(sample: Mapping[str, Any], name: str) -> torch.Tensor:
    """A sample's relative inverse depth (larger = nearer) as float32 (H, W): its `inverse_depth` (teacher) column
    when present, else 1/z of its metric `depth`."""
    try:
        if sample.get("inverse_depth") is not None:
            depth = np.asarray(sample["inverse_depth"], dtype=np.float32)
            if not np.all(np.isfinite(depth)):
                raise ValueError("inverse_depth contains NaN or infinite values")
        elif sample.get("depth") is not None:
            depth = metric_depth_to_inverse_depth(np.asarray(sample["depth"], dtype=np.float32))
        else:
            raise ValueError("it has neither 'inverse_depth' nor metric 'depth'")
    except ValueError as error:
        raise ValueError(f"{name} asks for a depth block but its depth is unusable: {error}.") from error
    if depth.ndim != 2:
        raise ValueError(f"{name}: depth must be a 2-D (H, W) map, got shape {depth.shape}.")
    return torch.from_numpy(np.ascontiguousarray(depth))


__all__ = [
    "NO_TASK",
    "batch_per_mask_rows",
    "PerceptioDataCollator",
    "masks_to_tensor",
    "relative_inverse_depth",
    "sample_name",
    "per_mask_rows",
    "sample_task",
]
