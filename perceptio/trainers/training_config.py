"""The configuration of `perceptio train`: one YAML file with four sections.

```yaml
training:   # any transformers.TrainingArguments field (output_dir, max_steps, bf16, deepspeed, report_to, ...)
model:      # ModelArguments: which checkpoint, LoRA or full fine-tuning, what stays frozen
data:       # DataArguments: synthetic scenes and/or saved datasets, per-task mixture weights, streaming
loss:       # LossWeightArguments: λ of each loss term (unset keeps the checkpoint's value)
```

`training` is parsed by transformers' `HfArgumentParser`, the other sections by the same rules (unknown keys are
errors).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from perceptio.data.task_weights import validate_task_weights
from perceptio.models.perceptio.loss_perceptio import loss_weight_fields


SECTIONS = ("training", "model", "data", "loss")
TINY_MODEL = "tiny"
DTYPES = ("auto", "float32", "bfloat16", "float16")
SYNTHETIC_SOURCE = "synthetic"


@dataclass
class ModelArguments:
    """Which model to train and how.

    Attributes:
        model_name_or_path: a Perceptio checkpoint folder or Hub id, or "tiny" for a random tiny model (tests, CPU).
        tiny_seed: weight seed of the tiny model.
        dtype: weight dtype on load ("auto" keeps the checkpoint's); mixed precision is `training.bf16`/`fp16`.
        use_lora: LoRA preset (`peft_presets`) instead of full fine-tuning.
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale numerator and dropout (Sa2VA: 128, 256, 0.05).
        freeze_vision_tower: keep InternVL's vision tower frozen in full fine-tuning (LoRA always freezes it).
        freeze_sam2_image_encoder: keep SAM2's image encoder frozen in full fine-tuning.
        max_num_tiles: InternVL tiles per image (the processor's default when unset).
        module_learning_rates: peak learning rates of some modules, by dotted path in `named_parameters()` (e.g.
            `model.vision_tower: 2.0e-6` to fine-tune an unfrozen tower slower); the rest train at
            `training.learning_rate`.
    """

    model_name_or_path: str = TINY_MODEL
    tiny_seed: int = 0
    dtype: str = "auto"
    use_lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    freeze_vision_tower: bool = True
    freeze_sam2_image_encoder: bool = True
    max_num_tiles: int | None = None
    module_learning_rates: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}.")
        if self.max_num_tiles is not None and self.max_num_tiles <= 0:
            raise ValueError(f"model.max_num_tiles must be a positive integer, got {self.max_num_tiles!r}.")


@dataclass
class DataArguments:
    """The training mixture.

    Attributes:
        synthetic_num_train: render this many synthetic scene samples (0 = none); they are split by task.
        synthetic_image_size: side of the rendered scenes.
        synthetic_seed: seed of the scenes.
        dataset_paths: task name -> folder saved with `Dataset.save_to_disk` in the sample schema (for example the
            output of `build_joint_referring_depth_dataset`). All mixed datasets must share their columns.
        task_weights: task name -> sampling weight; tasks left out get weight 1.
        stopping_strategy: "all_exhausted" (oversample small tasks) or "first_exhausted".
        mixture_seed: seed of the interleaving.
        streaming: stream the mixture (`IterableDataset`; set `training.max_steps`).
        cache_depth_codes: encode depth codes once as a dataset column before training.
        cache_dir: where `datasets` caches rendered scenes (its default cache when unset).
    """

    synthetic_num_train: int = 0
    synthetic_image_size: int = 64
    synthetic_seed: int = 0
    dataset_paths: dict = field(default_factory=dict)
    task_weights: dict = field(default_factory=dict)
    stopping_strategy: str = "all_exhausted"
    mixture_seed: int = 0
    streaming: bool = False
    cache_depth_codes: bool = True
    cache_dir: str | None = None

    def __post_init__(self):
        if self.synthetic_num_train < 0:
            raise ValueError(f"data.synthetic_num_train must be >= 0, got {self.synthetic_num_train!r}.")
        if not self.synthetic_num_train and not self.dataset_paths:
            raise ValueError("data needs synthetic_num_train > 0 or at least one entry in dataset_paths.")
        if SYNTHETIC_SOURCE in self.dataset_paths:
            raise ValueError(f"{SYNTHETIC_SOURCE!r} is not a dataset path; use data.synthetic_num_train.")
        # The tasks are known only once the data is built; tasks left out weigh 1.
        validate_task_weights(self.task_weights, default=1.0, where="data.task_weights")


@dataclass
class LossWeightArguments:
    """λ of each loss term and how `loss_lm` averages; unset (null) keeps the checkpoint config's value.

    Attributes:
        weights: config weight field -> λ. The YAML section lists them flat (`mask_loss_weight: 1.0`); the accepted
            names are the `weight_field`s of `LOSS_TERMS`, so a new loss term is configurable with no change here.
        depth_soft_merge_temperature: τ of the soft-merged depth reconstruction.
        lm_loss_reduction: "token" or "segment".
    """

    weights: dict[str, float | None] = field(default_factory=dict)
    depth_soft_merge_temperature: float | None = None
    lm_loss_reduction: str | None = None

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(loss_weight_fields()))
        if unknown:
            raise ValueError(f"unknown loss weights {unknown}; the loss terms' weights are {loss_weight_fields()}.")

    @classmethod
    def section_keys(cls) -> set[str]:
        """The keys of a `loss:` section: each loss term's weight field and the other fields."""
        return ({item.name for item in dataclasses.fields(cls)} - {"weights"}) | set(loss_weight_fields())

    @classmethod
    def from_section(cls, values: Mapping[str, Any]) -> LossWeightArguments:
        """The arguments of a flat `loss:` section."""
        weight_fields = set(loss_weight_fields())
        return cls(
            weights={name: value for name, value in values.items() if name in weight_fields},
            **{name: value for name, value in values.items() if name not in weight_fields},
        )

    def overrides(self) -> dict[str, float | str]:
        """The settings that were set, as model-config fields."""
        settings = {
            **self.weights,
            "depth_soft_merge_temperature": self.depth_soft_merge_temperature,
            "lm_loss_reduction": self.lm_loss_reduction,
        }
        return {name: value for name, value in settings.items() if value is not None}


@dataclass
class PerceptioTrainingConfig:
    """A parsed `perceptio train` configuration."""

    training: TrainingArguments
    model: ModelArguments
    data: DataArguments
    loss: LossWeightArguments


def parse_training_config(raw: Mapping[str, Any], source: str = "configuration") -> PerceptioTrainingConfig:
    """Parse a {section: {key: value}} mapping; unknown sections or keys raise a `ValueError` naming them."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source} must be a mapping of sections {SECTIONS}, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{source} has unknown sections {unknown}; accepted sections are {SECTIONS}.")
    if "training" not in raw or "output_dir" not in (raw["training"] or {}):
        raise ValueError(f"{source} needs a 'training' section with at least 'output_dir'.")
    parsed = {}
    for section, dataclass_type in (
        ("training", TrainingArguments),
        ("model", ModelArguments),
        ("data", DataArguments),
        ("loss", LossWeightArguments),
    ):
        values = raw.get(section) or {}
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}.")
        parsed[section] = _parse_section(dataclass_type, dict(values), f"{source}: section {section!r}")
    return PerceptioTrainingConfig(**parsed)


def load_training_config(config_path: str | os.PathLike) -> PerceptioTrainingConfig:
    """The configuration of a YAML file."""
    return parse_training_config(read_yaml(config_path), source=str(config_path))


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file's top-level mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"configuration file {str(path)!r} does not exist.")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a mapping of sections {SECTIONS}.")
    return content


def _parse_section(dataclass_type: type, values: dict[str, Any], where: str):
    if dataclass_type is LossWeightArguments:
        names = LossWeightArguments.section_keys()
    else:
        names = {item.name for item in dataclasses.fields(dataclass_type) if item.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}.")
    try:
        if dataclass_type is LossWeightArguments:
            return LossWeightArguments.from_section(values)
        if dataclass_type is TrainingArguments:
            (arguments,) = HfArgumentParser(TrainingArguments).parse_dict(values)
            return arguments
        return dataclass_type(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error


__all__ = [
    "DataArguments",
    "LossWeightArguments",
    "ModelArguments",
    "PerceptioTrainingConfig",
    "load_training_config",
    "parse_training_config",
    "read_yaml",
]
