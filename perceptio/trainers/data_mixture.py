"""Multi-task training data: per-task weighted mixtures over `datasets`, cached depth codes, and the joint
referring-segmentation + depth builder (the paper's joint RefCOCO + depth data).

Every dataset here follows the sample schema of `perceptio/data/synthetic_dataset.py`. The joint builder adds two
cached columns the collator reads: `inverse_depth` (the teacher's relative inverse depth, larger = nearer) and
`depth_codes` (the N codes of that map under the depth tokenizer; empty for rows without a depth block).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
import pyarrow.compute
import torch
from datasets import Dataset, IterableDataset, interleave_datasets
from datasets.fingerprint import Hasher

from perceptio.data.depth_teacher import DepthTeacher, add_teacher_depth_column
from perceptio.data.task_weights import validate_task_weights
from perceptio.models.perceptio.modeling_perceptio_depth_tokenizer import PerceptioDepthTokenizer
from perceptio.trainers.collator_perceptio import masks_to_tensor, relative_inverse_depth, sample_name


STOPPING_STRATEGIES = ("first_exhausted", "all_exhausted")
DEPTH_CODES_COLUMN = "depth_codes"
INVERSE_DEPTH_COLUMN = "inverse_depth"
JOINT_TASK_NAME = "referring_depth"
DEFAULT_REFERRING_PROMPT = "Please segment {expression} and estimate the depth of the scene."
DEFAULT_REFERRING_ANSWER = "Here it is."
MASK_FOREGROUND_BYTE = 255


def mix_task_datasets(
    task_datasets: Mapping[str, Dataset | IterableDataset],
    weights: Mapping[str, float],
    seed: int = 0,
    stopping_strategy: str = "all_exhausted",
) -> Dataset | IterableDataset:
    """Interleave one dataset per task, drawing each next sample from task t with probability ∝ `weights[t]`.

    All datasets must be of one kind (map-style or streaming `IterableDataset`) and share their features.
    "all_exhausted" oversamples small tasks until every task was seen once; "first_exhausted" stops at the first
    exhausted task. Tasks with weight 0 are left out.
    """
    if not task_datasets:
        raise ValueError("task_datasets is empty: give at least one {task: dataset}.")
    weights = validate_task_weights(weights, task_datasets, where="weights")
    if stopping_strategy not in STOPPING_STRATEGIES:
        raise ValueError(f"stopping_strategy must be one of {STOPPING_STRATEGIES}, got {stopping_strategy!r}.")
    kinds = {type(dataset) for dataset in task_datasets.values()}
    if not kinds <= {Dataset} and not kinds <= {IterableDataset}:
        raise ValueError(
            f"task datasets must all be Dataset or all IterableDataset, got {sorted(k.__name__ for k in kinds)}."
        )
    tasks = sorted(task for task in task_datasets if weights[task] > 0)
    _check_same_features({task: task_datasets[task] for task in tasks})
    total = sum(weights[task] for task in tasks)
    return interleave_datasets(
        [task_datasets[task] for task in tasks],
        probabilities=[weights[task] / total for task in tasks],
        seed=seed,
        stopping_strategy=stopping_strategy,
    )


def split_by_task(dataset: Dataset, task_column: str = "task") -> dict[str, Dataset]:
    """One dataset per value of `task_column` (e.g. the synthetic dataset's tasks), for `mix_task_datasets`."""
    if task_column not in dataset.column_names:
        raise ValueError(f"dataset has no {task_column!r} column (columns: {dataset.column_names}).")
    tasks = dataset.unique(task_column)
    return {task: dataset.filter(lambda value, task=task: value == task, input_columns=task_column) for task in tasks}


def rows_with_masks(dataset: Dataset) -> Dataset:
    """The rows of `dataset` with at least one mask (one `[SEG]` each), counted from the Arrow column without
    decoding a single image."""
    counts = pyarrow.compute.list_value_length(dataset.with_format("arrow")["masks"])
    return dataset.select(np.flatnonzero(counts.fill_null(0).to_numpy(zero_copy_only=False) > 0))


def add_depth_code_column(
    dataset: Dataset | IterableDataset,
    depth_tokenizer: PerceptioDepthTokenizer,
    code_column: str = DEPTH_CODES_COLUMN,
    batch_size: int = 32,
) -> Dataset | IterableDataset:
    """Add the depth codes of every row that has a depth block (`use_depth_block`; empty list otherwise).

    A row's depth is its `inverse_depth` column when present, else 1/z of its metric `depth`. On a map-style dataset
    the result is cached by `datasets` under a fingerprint of the dataset and the tokenizer's weights, so codes are
    computed once per tokenizer.
    """
    if not isinstance(depth_tokenizer, PerceptioDepthTokenizer):
        raise ValueError(f"depth_tokenizer must be a PerceptioDepthTokenizer, got {type(depth_tokenizer).__name__}.")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    columns = dataset.column_names or []
    if code_column in columns:
        raise ValueError(f"column {code_column!r} already exists; remove it or choose another name.")
    if columns and INVERSE_DEPTH_COLUMN not in columns and "depth" not in columns:
        raise ValueError(f"dataset needs an {INVERSE_DEPTH_COLUMN!r} or a metric 'depth' column (columns: {columns}).")
    tokenizer = depth_tokenizer.eval()

    def encode_batch(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        rows = [{key: values[position] for key, values in batch.items()} for position in range(len(indices))]
        codes: list[list[int]] = [[] for _ in rows]
        wanted = [position for position, row in enumerate(rows) if row.get("use_depth_block", True)]
        for position in wanted:
            depth = relative_inverse_depth(rows[position], sample_name(rows[position], indices[position]))
            codes[position] = tokenizer.encode(depth[None])[0].tolist()
        return {code_column: codes}

    kwargs: dict[str, Any] = {"batched": True, "batch_size": batch_size, "with_indices": True}
    if isinstance(dataset, Dataset):
        features = dataset.features.copy()
        features[code_column] = datasets.Sequence(datasets.Value("int32"))
        kwargs.update(
            features=features,
            new_fingerprint=Hasher.hash([dataset._fingerprint, _weights_digest(tokenizer), code_column]),
            desc="Depth codes",
        )
    return dataset.map(encode_batch, **kwargs)


def referring_to_samples(
    dataset: Dataset,
    expression_column: str = "expression",
    mask_column: str = "mask",
    image_column: str = "image",
    prompt_template: str = DEFAULT_REFERRING_PROMPT,
    answer: str = DEFAULT_REFERRING_ANSWER,
    use_depth_block: bool = True,
    task: str = JOINT_TASK_NAME,
) -> Dataset:
    """A referring-segmentation dataset (image, referring expression(s), mask) -> Perceptio samples.

    A row whose expression column holds a list of expressions becomes one sample per expression. The mask column
    holds one mask (PIL, array; nonzero = object) or a list of masks (one `[SEG]` each, in order).
    """
    for column in (expression_column, mask_column, image_column):
        if column not in dataset.column_names:
            raise ValueError(f"dataset has no {column!r} column (columns: {dataset.column_names}).")
    if "{expression}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{expression}}', got {prompt_template!r}.")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "prompt": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "masks": datasets.Sequence(datasets.Image(mode="L")),
            "use_depth_block": datasets.Value("bool"),
            "task": datasets.Value("string"),
            "meta": datasets.Value("string"),
        }
    )

    def to_samples(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in features}
        for position, index in enumerate(indices):
            expressions = batch[expression_column][position]
            expressions = [expressions] if isinstance(expressions, str) else list(expressions)
            name = f"row {index}"
            if not expressions or not all(isinstance(text, str) and text.strip() for text in expressions):
                raise ValueError(f"{name}: {expression_column!r} must be a non-empty string or list of them.")
            masks = batch[mask_column][position]
            masks = [masks] if _is_single_mask(masks) else list(masks)
            binary = masks_to_tensor([_mask_array(mask) for mask in masks], name).numpy()
            mask_images = [(mask * MASK_FOREGROUND_BYTE).astype(np.uint8) for mask in binary]
            for expression in expressions:
                out["image"].append(batch[image_column][position])
                out["prompt"].append(prompt_template.format(expression=expression.strip()))
                out["answer"].append(answer)
                out["masks"].append(mask_images)
                out["use_depth_block"].append(use_depth_block)
                out["task"].append(task)
                out["meta"].append(json.dumps({"expression": expression, "source_row": index}))
        return out

    return dataset.map(
        to_samples,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        desc="Referring samples",
    )


def build_joint_referring_depth_dataset(
    referring_dataset: Dataset,
    teacher: DepthTeacher,
    depth_tokenizer: PerceptioDepthTokenizer,
    expression_column: str = "expression",
    mask_column: str = "mask",
    image_column: str = "image",
    prompt_template: str = DEFAULT_REFERRING_PROMPT,
    answer: str = DEFAULT_REFERRING_ANSWER,
    cache_dir: str | None = None,
) -> Dataset:
    """The joint data: referring samples whose targets are `[SEG]`s, then a depth block, then `answer`.

    Teacher (Depth Anything) -> `inverse_depth` column -> depth tokenizer -> `depth_codes` column; both columns are
    cached by `datasets` (see `add_teacher_depth_column` for `cache_dir`), so neither model runs again for the same
    data and weights.
    """
    samples = referring_to_samples(
        referring_dataset, expression_column, mask_column, image_column, prompt_template, answer, use_depth_block=True
    )
    with_depth = add_teacher_depth_column(samples, teacher, depth_column=INVERSE_DEPTH_COLUMN, cache_dir=cache_dir)
    return add_depth_code_column(with_depth, depth_tokenizer)


def _is_single_mask(masks: Any) -> bool:
    # Without an Image feature, `datasets` hands a 2-D mask over as a list of rows.
    if hasattr(masks, "convert"):
        return True
    if isinstance(masks, (list, tuple)) and masks and hasattr(masks[0], "convert"):
        return False
    return np.asarray(masks).ndim == 2


def _mask_array(mask: Any) -> np.ndarray:
    array = np.asarray(mask.convert("L") if hasattr(mask, "convert") else mask)
    # Referring datasets store masks as 0/1, 0/255 or bool: anything nonzero is the object.
    return array != 0


def _check_same_features(task_datasets: Mapping[str, Dataset | IterableDataset]) -> None:
    reference_task = next(iter(task_datasets))
    reference = task_datasets[reference_task].features
    for task, dataset in task_datasets.items():
        if reference is not None and dataset.features is not None and dataset.features != reference:
            missing = sorted(set(reference) ^ set(dataset.features))
            raise ValueError(
                f"Task {task!r} has other features than task {reference_task!r} (columns differing: {missing or 'types'}); "
                "select or cast common columns (Dataset.select_columns / cast) before mixing."
            )


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


__all__ = [
    "add_depth_code_column",
    "build_joint_referring_depth_dataset",
    "mix_task_datasets",
    "referring_to_samples",
    "rows_with_masks",
    "split_by_task",
]
