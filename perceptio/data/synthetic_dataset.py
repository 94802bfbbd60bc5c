"""The synthetic spatial-scene dataset: rendered scenes with referring, relative-depth and VQA questions.

`build_synthetic_dataset` returns a `datasets.DatasetDict` with "train", "validation" and "test" splits. Each
split draws its scenes from its own seed stream (seed, split, index), so splits are disjoint and every sample is
reproducible from `seed` alone.

Sample schema (the training collator codes against this; it is documented here only):

- `image` (`datasets.Image`, RGB): the scene; for "relative_depth" it carries the drawn point markers.
- `prompt` (str): the user's text, without any `<image>` placeholder.
- `answer` (str): the answer text only, without spatial tokens ("Here it is.", "(B)", "3", "Red").
- `masks` (`datasets.Sequence(datasets.Image(mode="L"))`): one mask per referred object, in answer order (one
  `[SEG]` each); 255 = object, 0 = elsewhere; empty for tasks without `[SEG]`. Decoded they are PIL images;
  `np.asarray(mask) > 127` gives the bool (H, W) array, or use `sample_spatial_targets`.
- `depth` (`datasets.Array2D`, float32, the split's fixed (H, W)): metric z-depth in metres along the optical
  axis (finite, > 0; smaller = closer). Convert with `metric_depth_to_inverse_depth` before the depth tokenizer.
- `use_depth_block` (bool): whether the target includes a depth block (always for "relative_depth", a
  `depth_block_share` of the other samples).
- `task` (str): "referring", "relative_depth", "vqa_count", "vqa_colour" or "vqa_shape".
- `meta` (str): JSON of task facts. referring: `expression`, `kind`, `object_ids`, `named` (per referred object, the
  `size`, `colour` and `shape` its noun phrase names, `null` for each it does not), `referred` (per referred object,
  its own `size`, `colour`, `shape`, `nearness_rank` and `column_rank` among the visible objects, 0 = nearest /
  leftmost); relative_depth: `points`
  ([x, y] pixels), `letters`, `metric_depths`, `answer_letter`, `num_points`, `marker_radius`; vqa_count: `query`,
  `count`, `object_ids`; vqa_colour / vqa_shape: `object_id`, `colour` / `shape`, `phrase`.
- `scene_seed` (int64): the `render_scene` seed of the sample's scene.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
from PIL import Image

from .scene_rendering import metric_depth_to_inverse_depth, normalise_image_size, render_scene, validate_num_objects
from .synthetic_tasks import DEFAULT_TASK_CONFIG, TASK_NAMES, TaskConfig, generate_task_sample
from .task_weights import validate_task_weights


SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_TASK_WEIGHTS: dict[str, float] = {
    "referring": 0.35,
    "relative_depth": 0.35,
    "vqa_count": 0.1,
    "vqa_colour": 0.1,
    "vqa_shape": 0.1,
}
# A scene that admits no question of the drawn task is replaced by a new scene this many times at most.
MAX_SCENES_PER_SAMPLE = 50


class SampleSpatialTargets(NamedTuple):
    """A sample's masks as bool (K, H, W) and its relative inverse depth 1/z as float32 (H, W)."""

    masks: np.ndarray
    inverse_depth: np.ndarray


def dataset_features(image_size: int | tuple[int, int]) -> datasets.Features:
    """The `datasets.Features` of a split rendered at `image_size`."""
    height, width = normalise_image_size(image_size)
    return datasets.Features(
        {
            "image": datasets.Image(),
            "prompt": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "masks": datasets.Sequence(datasets.Image(mode="L")),
            "depth": datasets.Array2D(shape=(height, width), dtype="float32"),
            "use_depth_block": datasets.Value("bool"),
            "task": datasets.Value("string"),
            "meta": datasets.Value("string"),
            "scene_seed": datasets.Value("int64"),
        }
    )


def scene_seed_for(seed: int, split: str, index: int, attempt: int = 0) -> int:
    """The 63-bit scene seed of sample `index` of `split`, hashed from (seed, split, index, attempt)."""
    state = np.random.SeedSequence([seed, SPLIT_NAMES.index(split), index, attempt]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def _task_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # A stream separate from the scenes' (an extra entropy word), so task choices do not shift scene layouts.
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_NAMES.index(split), index, 0, 1]))


def _validate_task_weights(tasks: Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """{task: weight} from a list of task names (equal weights) or a mapping, checked as every task weight is."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names or a {{task: weight}} mapping, got {tasks!r}")
    weights = dict(tasks) if isinstance(tasks, Mapping) else dict.fromkeys(tasks, 1.0)
    validate_task_weights(weights, TASK_NAMES, default=0.0, where="tasks")
    return {task: float(weight) for task, weight in weights.items()}


def generate_sample(
    seed: int,
    split: str,
    index: int,
    image_size: int | tuple[int, int],
    task_weights: Mapping[str, float] = DEFAULT_TASK_WEIGHTS,
    task_config: TaskConfig = DEFAULT_TASK_CONFIG,
    num_objects: int | None = None,
) -> dict[str, Any]:
    """Sample `index` of `split` as a dataset row (PIL images, numpy depth, JSON meta); its scene has `num_objects`
    objects, or a random number of them when None."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    size = normalise_image_size(image_size)
    rng = _task_rng(seed, split, index)
    names = sorted(task_weights)
    probabilities = np.array([task_weights[name] for name in names], dtype=np.float64)
    task = names[int(rng.choice(len(names), p=probabilities / probabilities.sum()))]
    for attempt in range(MAX_SCENES_PER_SAMPLE):
        scene_seed = scene_seed_for(seed, split, index, attempt)
        scene = render_scene(scene_seed, size, num_objects=num_objects)
        sample = generate_task_sample(scene, task, rng, task_config)
        if sample is not None:
            return {
                "image": Image.fromarray(sample.image),
                "prompt": sample.prompt,
                "answer": sample.answer,
                "masks": [Image.fromarray(mask.astype(np.uint8) * 255) for mask in sample.masks],
                "depth": scene.depth,
                "use_depth_block": sample.use_depth_block,
                "task": sample.task,
                "meta": json.dumps(sample.meta),
                "scene_seed": scene_seed,
            }
    raise RuntimeError(
        f"no scene admitted a {task!r} question for sample {index} of {split} after {MAX_SCENES_PER_SAMPLE} scenes"
    )


def _generate_split_rows(
    seed: int,
    split: str,
    indices: list[int],
    image_size: tuple[int, int],
    task_weights_json: str,
    task_config_json: str,
    num_objects: int | None,
) -> Iterator[dict[str, Any]]:
    """`datasets.Dataset.from_generator` generator; `indices` is the only list so `num_proc` shards it."""
    task_weights = json.loads(task_weights_json)
    task_config = TaskConfig(
        **{
            key: tuple(value) if isinstance(value, list) else value
            for key, value in json.loads(task_config_json).items()
        }
    )
    for index in indices:
        yield generate_sample(seed, split, index, image_size, task_weights, task_config, num_objects)


def _source_fingerprint() -> str:
    """Hash of the code that produces the samples, so a cached split is rebuilt whenever that code changes."""
    digest = hashlib.sha256()
    for name in ("scene_rendering.py", "synthetic_tasks.py", "synthetic_dataset.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def _validate_count(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def build_synthetic_dataset(
    num_train: int,
    num_validation: int,
    num_test: int,
    image_size: int | tuple[int, int] = 256,
    seed: int = 0,
    tasks: Sequence[str] | Mapping[str, float] = DEFAULT_TASK_WEIGHTS,
    num_proc: int | None = None,
    task_config: TaskConfig = DEFAULT_TASK_CONFIG,
    cache_dir: str | None = None,
    num_objects: int | None = None,
) -> datasets.DatasetDict:
    """Render the train/validation/test splits (see the module docstring for the schema).

    `tasks` is a list of task names (equal weights) or a {task: weight} mapping; each sample draws its task from
    it. `num_proc` renders with several processes; `cache_dir` is where `datasets` caches the splits (its default
    cache when None). `num_objects` fixes the number of objects in every scene (1 to the renderer's maximum; None:
    each scene draws it). The same arguments give the same samples.
    """
    counts = {
        "train": _validate_count("num_train", num_train),
        "validation": _validate_count("num_validation", num_validation),
        "test": _validate_count("num_test", num_test),
    }
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if num_proc is not None and (not isinstance(num_proc, int) or isinstance(num_proc, bool) or num_proc < 1):
        raise ValueError(f"num_proc must be a positive int or None, got {num_proc!r}")
    validate_num_objects(num_objects)
    size = normalise_image_size(image_size)
    task_weights = _validate_task_weights(tasks)
    features = dataset_features(size)
    task_weights_json = json.dumps(task_weights, sort_keys=True)
    task_config_json = json.dumps(asdict(task_config), sort_keys=True)
    source = _source_fingerprint()
    splits = {}
    for split, count in counts.items():
        if count == 0:
            splits[split] = datasets.Dataset.from_dict({name: [] for name in features}, features=features, split=split)
            continue
        fingerprint = hashlib.sha256(
            json.dumps(
                [source, int(seed), split, count, size, task_weights_json, task_config_json, num_objects]
            ).encode()
        ).hexdigest()
        splits[split] = datasets.Dataset.from_generator(
            _generate_split_rows,
            features=features,
            cache_dir=cache_dir,
            gen_kwargs={
                "seed": int(seed),
                "split": split,
                "indices": list(range(count)),
                "image_size": size,
                "task_weights_json": task_weights_json,
                "task_config_json": task_config_json,
                "num_objects": None if num_objects is None else int(num_objects),
            },
            num_proc=num_proc if num_proc is None or num_proc <= count else count,
            split=datasets.NamedSplit(split),
            fingerprint=fingerprint,
        )
    return datasets.DatasetDict(splits)


def sample_spatial_targets(sample: Mapping[str, Any]) -> SampleSpatialTargets:
    """The bool (K, H, W) masks and float32 (H, W) relative inverse depth (1/z) of a dataset row.

    Accepts rows decoded by `datasets` (PIL masks, list or array depth) or in numpy format.
    """
    if "masks" not in sample or "depth" not in sample:
        raise ValueError("sample must have 'masks' and 'depth' fields (a row of build_synthetic_dataset)")
    depth = np.asarray(sample["depth"], dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"sample depth must be a 2-D array, got shape {depth.shape}")
    masks = [np.asarray(mask) for mask in sample["masks"]]
    if any(mask.shape[:2] != depth.shape for mask in masks):
        raise ValueError(f"every mask must have the depth's shape {depth.shape}, got {[mask.shape for mask in masks]}")
    stacked = (
        np.stack([mask.reshape(depth.shape) > 127 for mask in masks]) if masks else np.zeros((0, *depth.shape), bool)
    )
    return SampleSpatialTargets(masks=stacked, inverse_depth=metric_depth_to_inverse_depth(depth))
