"""Worker of tests/test_ddp.py: a few PerceptioTrainer steps of the tiny model; writes the log history as JSON.

Run as `torchrun --nproc_per_node 2 tests/ddp_training_worker.py OUT.json STEPS` (DDP on CPU with gloo) or plainly
with one process and gradient accumulation 2 for the single-process reference over the same global batch.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from transformers import TrainingArguments

from perceptio.tiny_models import build_tiny_perceptio
from perceptio.trainers.collator_perceptio import PerceptioDataCollator
from perceptio.trainers.trainer_perceptio import PerceptioTrainer
from perceptio.trainers.training_run import OBJECTIVE_UNREACHED_MODULES


SIDE = 32


def samples() -> list[dict]:
    """Two samples: one with a mask and a depth block, one plain VQA (no masks, no depth block)."""
    rng = np.random.default_rng(0)
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[4:20, 6:22] = 255
    image = Image.fromarray(rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8))
    depth = rng.uniform(1.0, 6.0, size=(SIDE, SIDE)).astype(np.float32)
    return [
        {
            "image": image,
            "prompt": "Segment the cube.",
            "answer": "Here.",
            "masks": [mask],
            "depth": depth,
            "use_depth_block": True,
        },
        {
            "image": image,
            "prompt": "What colour is it?",
            "answer": "Red.",
            "masks": [],
            "depth": depth,
            "use_depth_block": False,
        },
    ]


def main(output: str, steps: int) -> PerceptioTrainer:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model, processor = build_tiny_perceptio(seed=0)
    for name in OBJECTIVE_UNREACHED_MODULES:
        model.get_submodule(name).requires_grad_(False)
    args = TrainingArguments(
        output_dir=os.path.dirname(output) or ".",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2 // world_size,
        max_steps=steps,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        # Strict: a process whose graph skipped the mask path would leave parameters unreduced and fail.
        ddp_find_unused_parameters=False,
    )
    collator = PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer, max_num_tiles=1)
    trainer = PerceptioTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(samples()), data_collator=collator
    )
    trainer.train()
    write_log_and_finish(trainer, output)
    return trainer


def write_log_and_finish(trainer: PerceptioTrainer, output: str) -> None:
    """The main process writes the log history to `output`; then both ranks finish their collectives before either
    tears its process group down."""
    if trainer.is_world_process_zero():
        with open(output, "w", encoding="utf-8") as handle:
            json.dump(trainer.state.log_history, handle)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_without_destructors() -> None:
    """Leave the process at once. Freeing DDP's reducer frees gloo's process group, whose worker thread may then wait
    for the GIL that the freeing thread holds, for good: callers keep their trainer alive until this call."""
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    trainer = main(sys.argv[1], int(sys.argv[2]))
    exit_without_destructors()
