"""Distillation training of the VQ-VAE depth tokenizer on teacher (or ground-truth) depth maps.

`DepthTokenizerTrainer` is a `transformers.Trainer`, so checkpoints, resume, logging and `report_to` work as
usual; it adds the tokenizer's reconstruction loss, commitment loss, perplexity and dead-code count to the logs, as
their means over the logging window averaged across processes (the `WindowMeans` that `PerceptioTrainer` uses).
`train_depth_tokenizer` is the Python API behind `perceptio train-depth-tokenizer`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from perceptio.data.depth_teacher import DepthTeacher, add_teacher_depth_column
from perceptio.evaluation.depth_tokenizer_evaluation import DepthTokenizerEvaluation, evaluate_depth_tokenizer
from perceptio.models.perceptio.configuration_perceptio_depth_tokenizer import PerceptioDepthTokenizerConfig
from perceptio.models.perceptio.modeling_perceptio_depth_tokenizer import PerceptioDepthTokenizer
from perceptio.trainers.trainer_perceptio import WindowMeans


LOGGED_OUTPUTS = ("reconstruction_loss", "commitment_loss", "perplexity", "dead_code_count")
EVALUATION_FILE_NAME = "depth_tokenizer_evaluation.json"


class DepthMapDataset(torch.utils.data.Dataset):
    """Depth maps (M, H, W) as rows `{"depth": (H, W) float tensor}`."""

    def __init__(self, depth_maps: np.ndarray | torch.Tensor):
        maps = torch.as_tensor(np.asarray(depth_maps), dtype=torch.float32)
        if maps.dim() != 3 or maps.shape[0] == 0:
            raise ValueError(f"depth_maps must be a non-empty (M, H, W) array, got shape {tuple(maps.shape)}.")
        self.depth_maps = maps

    def __len__(self) -> int:
        return self.depth_maps.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"depth": self.depth_maps[index]}


class DepthMapCollator:
    """Stacks the `depth_column` of rows into the tokenizer's `depth` input (B, H, W)."""

    def __init__(self, depth_column: str = "depth"):
        self.depth_column = depth_column

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        if any(self.depth_column not in row for row in rows):
            raise ValueError(f"every row needs a {self.depth_column!r} depth map.")
        maps = [torch.as_tensor(np.asarray(row[self.depth_column]), dtype=torch.float32) for row in rows]
        if len({tuple(depth.shape) for depth in maps}) > 1:
            raise ValueError(
                f"depth maps in a batch must share one size, got {sorted({tuple(m.shape) for m in maps})}."
            )
        return {"depth": torch.stack(maps)}


class DepthTokenizerTrainer(Trainer):
    """Trainer for `PerceptioDepthTokenizer` that logs its loss components and codebook health.

    The EMA codebook update happens inside the model's training forward; the optimiser trains encoder and decoder.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._output_means = WindowMeans(LOGGED_OUTPUTS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(depth=inputs["depth"])
        if model.training:
            self._output_means.add(torch.stack([getattr(outputs, name).detach().float() for name in LOGGED_OUTPUTS]))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the window mean of each tokenizer output (averaged over processes) to a training log."""
        if "loss" in logs and self._output_means.count:
            logs.update(self._output_means.pop_means(self.args.parallel_mode))
        super().log(logs, *args, **kwargs)


@dataclass
class DepthTokenizerTrainingResult:
    """The trained tokenizer (also saved in `output_dir`) and its held-out evaluation."""

    tokenizer: PerceptioDepthTokenizer
    evaluation: DepthTokenizerEvaluation


def train_depth_tokenizer(
    output_dir: str | os.PathLike,
    depth_maps: np.ndarray | torch.Tensor | Dataset | None = None,
    images: Dataset | None = None,
    teacher: DepthTeacher | str | os.PathLike | None = None,
    config: PerceptioDepthTokenizerConfig | None = None,
    depth_column: str = "teacher_depth",
    image_column: str = "image",
    eval_fraction: float = 0.1,
    max_steps: int = 2000,
    per_device_train_batch_size: int = 16,
    learning_rate: float = 3e-4,
    logging_steps: int = 50,
    save_steps: int = 500,
    seed: int = 0,
    resume_from_checkpoint: str | bool | None = None,
    report_to: str | list[str] = "none",
    teacher_cache_dir: str | os.PathLike | None = None,
    eval_num_pairs: int = 1000,
    eval_margin: float = 0.05,
    **training_arguments,
) -> DepthTokenizerTrainingResult:
    """Train a depth tokenizer and write it, its checkpoints and its evaluation report to `output_dir`.

    Give either `depth_maps` (ground truth as an (M, H, W) relative inverse depth array, or a `datasets.Dataset`
    with a `depth_column`), or `images` (a `datasets.Dataset` with an `image_column`) plus a `teacher` (a
    `DepthTeacher` or a Depth Anything checkpoint id / folder) whose maps are computed once and cached. The last
    `eval_fraction` of the maps is held out for the report. Extra keyword arguments go to `TrainingArguments`.
    """
    config = config if config is not None else PerceptioDepthTokenizerConfig()
    if (depth_maps is None) == (images is None):
        raise ValueError("give exactly one of depth_maps (ground truth) or images (with a teacher).")
    if images is not None:
        if teacher is None:
            raise ValueError("images need a teacher: a DepthTeacher or a Depth Anything checkpoint id or folder.")
        if not isinstance(teacher, DepthTeacher):
            teacher = DepthTeacher(teacher, output_size=config.image_size)
        depth_maps = add_teacher_depth_column(images, teacher, image_column, depth_column, cache_dir=teacher_cache_dir)
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}.")
    train_dataset, eval_maps, collator = _split_depth_maps(depth_maps, depth_column, eval_fraction)

    torch.manual_seed(seed)
    tokenizer = PerceptioDepthTokenizer(config)
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        learning_rate=learning_rate,
        logging_steps=logging_steps,
        save_steps=save_steps,
        save_total_limit=2,
        seed=seed,
        report_to=report_to,
        remove_unused_columns=False,
        **training_arguments,
    )
    trainer = DepthTokenizerTrainer(
        model=tokenizer, args=arguments, train_dataset=train_dataset, data_collator=collator
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(str(output_dir))
    tokenizer.eval()
    evaluation = evaluate_depth_tokenizer(
        tokenizer, eval_maps, num_pairs=eval_num_pairs, margin=eval_margin, seed=seed
    )
    evaluation.save(Path(output_dir) / EVALUATION_FILE_NAME)
    print(evaluation.to_table())
    return DepthTokenizerTrainingResult(tokenizer=tokenizer, evaluation=evaluation)


def _split_depth_maps(
    depth_maps: np.ndarray | torch.Tensor | Dataset, depth_column: str, eval_fraction: float
) -> tuple[torch.utils.data.Dataset, list[np.ndarray], DepthMapCollator]:
    """Training rows, held-out maps (the last `eval_fraction`, at least one when the fraction is > 0) and the
    collator that reads them."""
    if isinstance(depth_maps, Dataset):
        if depth_column not in depth_maps.column_names:
            raise ValueError(f"the depth dataset has no column {depth_column!r} (columns: {depth_maps.column_names}).")
        count = len(depth_maps)
        held_out = _held_out_count(count, eval_fraction)
        rows = depth_maps.select_columns([depth_column]).with_format("numpy")
        train = rows.select(range(count - held_out))
        evaluation = list(rows.select(range(count - held_out, count))[depth_column]) if held_out else []
        return train, evaluation or _first_maps(train, depth_column), DepthMapCollator(depth_column)
    maps = DepthMapDataset(depth_maps)
    count = len(maps)
    held_out = _held_out_count(count, eval_fraction)
    train = DepthMapDataset(maps.depth_maps[: count - held_out])
    evaluation = list(maps.depth_maps[count - held_out :].numpy()) if held_out else list(train.depth_maps[:16].numpy())
    return train, evaluation, DepthMapCollator("depth")


def _held_out_count(count: int, eval_fraction: float) -> int:
    held_out = max(1, int(round(count * eval_fraction))) if eval_fraction > 0 else 0
    if count - held_out < 1:
        raise ValueError(f"{count} depth map(s) leave nothing to train on with eval_fraction={eval_fraction}.")
    return held_out


def _first_maps(train: Dataset, depth_column: str) -> list[np.ndarray]:
    """Without a held-out split the report falls back to (at most 16) training maps."""
    return list(train.select(range(min(16, len(train))))[depth_column])


__all__ = [
    "DepthMapCollator",
    "DepthMapDataset",
    "DepthTokenizerTrainer",
    "DepthTokenizerTrainingResult",
    "train_depth_tokenizer",
]
