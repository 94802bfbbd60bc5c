"""PerceptioTrainer's per-task language-model loss logs (`loss_lm/<task>`, `loss_answer/<task>`), on the tiny model and
rendered samples.

Run as `torchrun --nproc_per_node 2 tests/test_per_task_logging.py OUT.json` (or plainly, one process with gradient
accumulation 2 over the same global batch), this file is also the worker of the two-process check.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from ddp_training_worker import exit_without_destructors, write_log_and_finish
from test_trainer import training_args  # noqa: E402  (the shared tiny TrainingArguments)
from transformers.loss.loss_utils import ForCausalLMLoss

from perceptio.data.synthetic_dataset import generate_sample
from perceptio.data.synthetic_tasks import TASK_NAMES
from perceptio.models.perceptio import loss_perceptio, modeling_perceptio
from perceptio.models.perceptio.loss_perceptio import LOSS_TERMS, next_token_losses, per_sample_lm_loss
from perceptio.trainers.collator_perceptio import NO_TASK, PerceptioDataCollator
from perceptio.trainers.trainer_perceptio import TASK_ANSWER_LOSS_PREFIX, TASK_LOSS_PREFIX, PerceptioTrainer


IMAGE_SIDE = 64
# A task name outside the synthetic TASK_NAMES, as a custom dataset would have.
CUSTOM_TASK = "my_grounding"
DDP_TIMEOUT_SECONDS = 240


def task_samples(tasks: Sequence[str]) -> list[dict]:
    """One rendered sample per entry of `tasks`; a name outside TASK_NAMES relabels a referring sample."""
    rows = []
    for index, task in enumerate(tasks):
        source = task if task in TASK_NAMES else "referring"
        rows.append(dict(generate_sample(0, "train", index, IMAGE_SIDE, task_weights={source: 1.0}), task=task))
    return rows


def task_logs(entry: dict, prefix: str = TASK_LOSS_PREFIX) -> dict[str, float]:
    return {name: value for name, value in entry.items() if name.startswith(prefix)}


def outside_depth_block(targets: torch.Tensor, tokenizer) -> torch.Tensor:
    """Whether each target lies outside the span from `<DEPTH_START>` to `<DEPTH_END>` (both included)."""
    start, end = tokenizer.convert_tokens_to_ids(["<DEPTH_START>", "<DEPTH_END>"])
    outside = torch.ones_like(targets, dtype=torch.bool)
    starts, ends = (targets == start).nonzero().flatten(), (targets == end).nonzero().flatten()
    for first, last in zip(starts.tolist(), ends.tolist()):
        outside[first : last + 1] = False
    return outside


def training_logs(trainer: PerceptioTrainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture()
def collator(tiny_pair):
    model, processor = tiny_pair
    return PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer, max_num_tiles=1)


# ---- collator ------------------------------------------------------------------------------------------------------


def test_collator_adds_task_names_only_when_asked(tiny_pair, collator):
    processor = tiny_pair[1]
    built = processor.build_training_example("What colour is it?", processor.format_target(0, None, "Red."))
    no_task = dict(task_samples(["vqa_colour"])[0], task=None)
    samples = [*task_samples(["referring", "vqa_count"]), no_task, built]
    assert "tasks" not in collator(samples)  # a plain Trainer or model(**batch) gets the model's inputs only
    with_tasks = PerceptioDataCollator(
        processor, depth_tokenizer=tiny_pair[0].depth_tokenizer, max_num_tiles=1, return_tasks=True
    )
    assert with_tasks(samples)["tasks"] == ["referring", "vqa_count", NO_TASK, NO_TASK]


def test_collator_rejects_a_non_string_task_and_a_non_bool_option(tiny_pair, collator):
    with pytest.raises(ValueError, match=r"sample 1 .*: field 'task' must be a string or None, got int"):
        collator([task_samples(["vqa_count"])[0], dict(task_samples(["vqa_shape"])[0], task=3)])
    with pytest.raises(ValueError, match="return_tasks must be a bool"):
        PerceptioDataCollator(tiny_pair[1], return_tasks="yes")


# ---- trainer -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 7, 1024])
def test_per_sample_lm_loss_shifts_as_the_models_loss_in_any_chunking(monkeypatch, chunk_rows):
    monkeypatch.setattr(loss_perceptio, "CROSS_ENTROPY_CHUNK_ROWS", chunk_rows)
    logits = torch.randn(3, 11, 17, dtype=torch.bfloat16)
    labels = torch.randint(0, 17, (3, 11))
    labels[0, :4] = -100
    labels[2] = -100  # a sample with no supervised token: loss 0, count 0
    losses, counts = per_sample_lm_loss(logits, labels)
    assert counts.tolist() == [7, 10, 0] and losses[2] == 0
    for row in range(2):
        expected = F.cross_entropy(logits[row, :-1].float(), labels[row, 1:], ignore_index=-100)
        assert torch.allclose(losses[row], expected, rtol=1e-5)
    # Weighted by their token counts, the per-sample means give back the model's own batch loss.
    model_loss = ForCausalLMLoss(logits, labels, vocab_size=17)
    assert torch.allclose((losses * counts).sum() / counts.sum(), model_loss, rtol=1e-5)


def test_a_few_steps_log_the_lm_loss_of_exactly_the_tasks_present(tiny_model, collator, tmp_path):
    tasks = ["referring", "vqa_count", "vqa_count", CUSTOM_TASK]
    trainer = PerceptioTrainer(
        model=tiny_model,
        args=training_args(tmp_path, per_device_train_batch_size=2, max_steps=2),
        train_dataset=Dataset.from_list(task_samples(tasks)),
        data_collator=collator,
    )
    assert collator.return_tasks is False and trainer.data_collator.return_tasks is True  # the caller's is untouched
    trainer.train()
    logged = [task_logs(entry) for entry in training_logs(trainer)]
    # Two steps of two samples cover the four once; each window logs the tasks of its own batch only.
    assert len(logged) == 2 and all(1 <= len(entry) <= 2 for entry in logged)
    assert set().union(*logged) == {TASK_LOSS_PREFIX + task for task in set(tasks)}
    assert all(math.isfinite(value) and value > 0 for entry in logged for value in entry.values())


@pytest.mark.parametrize("reduction", ["token", "segment"])
def test_per_task_value_is_the_window_mean_of_each_samples_own_cross_entropy(
    tiny_pair, tiny_model, collator, tmp_path, reduction
):
    tasks = ["vqa_count", "vqa_colour", "vqa_count", "relative_depth"]
    # With depth blocks, so that the answer losses leave them out.
    samples = [dict(sample, use_depth_block=True) for sample in task_samples(tasks)]
    # However loss_lm averages, the per-task logs are the same per-sample means.
    tiny_model.config.lm_loss_reduction = reduction
    reference = copy.deepcopy(tiny_model).eval()
    expected, expected_answers = {}, {}
    for task, sample in zip(tasks, samples):
        # Computed independently: one sample per forward (no padding), boolean selection of the supervised targets.
        batch = collator([sample])
        with torch.no_grad():
            logits = reference(**batch).logits[0, :-1]
        targets = batch["labels"][0, 1:]
        supervised = targets != -100
        expected.setdefault(task, []).append(F.cross_entropy(logits[supervised].float(), targets[supervised]).item())
        answer = supervised & outside_depth_block(targets, tiny_pair[1].tokenizer)
        assert 0 < answer.sum() < supervised.sum(), "each sample has a depth block and an answer"
        expected_answers.setdefault(task, []).append(F.cross_entropy(logits[answer].float(), targets[answer]).item())
    # One logging window of two micro-batches (gradient accumulation 2): no optimizer step between the forwards.
    trainer = PerceptioTrainer(
        model=tiny_model,
        args=training_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        train_dataset=Dataset.from_list(samples),
        data_collator=collator,
    )
    trainer.train()
    (logged,) = training_logs(trainer)
    for prefix, per_task in ((TASK_LOSS_PREFIX, expected), (TASK_ANSWER_LOSS_PREFIX, expected_answers)):
        means = {prefix + task: sum(values) / len(values) for task, values in per_task.items()}
        assert task_logs(logged, prefix) == {name: pytest.approx(mean, rel=1e-4) for name, mean in means.items()}


def test_segment_averaging_computes_the_cross_entropy_once_per_step(tiny_model, collator, tmp_path, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return next_token_losses(*args, **kwargs)

    # Every per-token cross-entropy goes through next_token_losses, wherever it was imported.
    monkeypatch.setattr(loss_perceptio, "next_token_losses", counted)
    monkeypatch.setattr(modeling_perceptio, "next_token_losses", counted)
    tiny_model.config.lm_loss_reduction = "segment"
    trainer = PerceptioTrainer(
        model=tiny_model,
        args=training_args(tmp_path, per_device_train_batch_size=2),
        train_dataset=Dataset.from_list(task_samples(["vqa_count", "referring"])),
        data_collator=collator,
    )
    trainer.train()
    (logged,) = training_logs(trainer)
    assert set(task_logs(logged)) == {TASK_LOSS_PREFIX + "vqa_count", TASK_LOSS_PREFIX + "referring"}
    assert len(calls) == 1, "the forward's loss_lm and the per-task logs must share one cross-entropy pass"


def test_a_batch_without_task_names_trains_and_logs_no_per_task_keys(tiny_pair, tiny_model, collator, tmp_path):
    processor = tiny_pair[1]
    built = [
        processor.build_training_example(f"What colour is object {index}?", processor.format_target(0, None, answer))
        for index, answer in enumerate(["Red.", "Blue."])
    ]
    dataset = Dataset.from_list([{key: value.tolist() for key, value in example.items()} for example in built])
    trainer = PerceptioTrainer(
        model=tiny_model,
        args=training_args(tmp_path, per_device_train_batch_size=2),
        train_dataset=dataset,
        data_collator=collator,
    )
    trainer.train()
    (logged,) = training_logs(trainer)
    assert all(math.isfinite(logged[name]) for name in ("loss", *LOSS_TERMS))
    assert task_logs(logged) == {}


def test_task_names_that_do_not_match_the_batch_are_rejected(tiny_model, collator, tmp_path):
    trainer = PerceptioTrainer(
        model=tiny_model,
        args=training_args(tmp_path, per_device_train_batch_size=2),
        train_dataset=Dataset.from_list(task_samples(["vqa_count", "vqa_shape"])),
        data_collator=lambda samples: dict(collator(samples), tasks=["vqa_count"]),
    )
    with pytest.raises(ValueError, match=r"'tasks' must be a list of 2 task names"):
        trainer.train()


# ---- two processes -------------------------------------------------------------------------------------------------


def run_worker(tmp_path: Path, name: str, processes: int) -> dict[str, float]:
    output = tmp_path / name / "log.json"
    output.parent.mkdir(parents=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = (launcher if processes > 1 else [sys.executable]) + [__file__, str(output)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    # A hang (processes gathering different shapes) fails the test through the timeout instead of blocking it.
    result = subprocess.run(command, capture_output=True, text=True, timeout=DDP_TIMEOUT_SECONDS, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    (logged,) = [entry for entry in json.loads(output.read_text()) if "loss" in entry]
    return {**task_logs(logged), **task_logs(logged, TASK_ANSWER_LOSS_PREFIX)}


@pytest.mark.slow
def test_two_processes_log_the_same_per_task_losses_as_one(tmp_path):
    # Each process sees one of the two samples, so only one of them knows the custom task name.
    distributed = run_worker(tmp_path, "ddp", processes=2)
    single = run_worker(tmp_path, "single", processes=1)
    assert set(distributed) == {
        prefix + task for prefix in (TASK_LOSS_PREFIX, TASK_ANSWER_LOSS_PREFIX) for task in ("referring", CUSTOM_TASK)
    }
    assert distributed == {name: pytest.approx(value, rel=1e-4) for name, value in single.items()}


def worker_main(output: str) -> PerceptioTrainer:
    """One step over two samples (one referring, one of CUSTOM_TASK): per process with DDP, else accumulated."""
    from perceptio.tiny_models import build_tiny_perceptio
    from perceptio.trainers.training_run import OBJECTIVE_UNREACHED_MODULES

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model, processor = build_tiny_perceptio(seed=0)
    for name in OBJECTIVE_UNREACHED_MODULES:
        model.get_submodule(name).requires_grad_(False)
    args = training_args(
        Path(os.path.dirname(output)),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2 // world_size,
        # Strict, as in tests/ddp_training_worker.py: a graph that differs between processes fails.
        ddp_find_unused_parameters=False,
    )
    collator = PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer, max_num_tiles=1)
    dataset = Dataset.from_list(task_samples(["referring", CUSTOM_TASK]))
    trainer = PerceptioTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    write_log_and_finish(trainer, output)
    return trainer


if __name__ == "__main__":
    trainer = worker_main(sys.argv[1])
    exit_without_destructors()
