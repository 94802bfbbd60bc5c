"""`perceptio eval-depth-tokenizer`: reconstruction quality and codebook use of a trained depth tokenizer."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


EXAMPLE = """example:
  perceptio eval-depth-tokenizer --model runs/depth_tokenizer --depth held_out_depth.npy --output report.json
  perceptio eval-depth-tokenizer --model runs/depth_tokenizer --depth data/teacher_depth_dataset --depth-column teacher_depth
"""


def load_depth_maps(path: str | os.PathLike, depth_column: str = "teacher_depth"):
    """Depth maps from a `.npy` (M, H, W) array or a `datasets` folder saved with `save_to_disk` (its
    `depth_column`)."""
    path = Path(path)
    if path.suffix == ".npy" and path.is_file():
        maps = np.load(path)
        if maps.ndim != 3:
            raise ValueError(f"{path} must hold an (M, H, W) array of depth maps, got shape {maps.shape}.")
        return maps
    if path.is_dir() and (path / "dataset_info.json").is_file():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if depth_column not in dataset.column_names:
            raise ValueError(f"{path} has no column {depth_column!r} (columns: {dataset.column_names}).")
        return dataset
    raise ValueError(f"--depth must be a .npy file of (M, H, W) maps or a saved datasets folder, got {str(path)!r}.")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio eval-depth-tokenizer` to the command's subparsers."""
    parser = subparsers.add_parser(
        "eval-depth-tokenizer",
        help="Evaluate a depth tokenizer: AbsRel, RMSE, delta<1.25, pair-order accuracy, codebook usage.",
        description="Compare decode(encode(d)) with d on held-out relative inverse depth maps.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="folder of a trained PerceptioDepthTokenizer")
    parser.add_argument("--depth", required=True, help=".npy (M, H, W) array or saved datasets folder")
    parser.add_argument("--depth-column", default="teacher_depth", help="depth column of a datasets folder")
    parser.add_argument(
        "--output", default=None, help="JSON report path (default: MODEL/depth_tokenizer_evaluation.json)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-pairs", type=int, default=1000, help="point pairs per map for pair-order accuracy")
    parser.add_argument("--margin", type=float, default=0.05, help="minimum normalised depth gap of a scored pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `perceptio eval-depth-tokenizer` with the parsed arguments; returns the exit status."""
    from perceptio.evaluation.depth_tokenizer_evaluation import evaluate_depth_tokenizer
    from perceptio.models.perceptio.modeling_perceptio_depth_tokenizer import PerceptioDepthTokenizer
    from perceptio.trainers.depth_tokenizer_trainer import EVALUATION_FILE_NAME

    if not Path(args.model, "config.json").is_file():
        raise ValueError(f"--model must be a folder with a saved depth tokenizer, got {args.model!r}.")
    depth = load_depth_maps(args.depth, args.depth_column)
    maps = depth.with_format("numpy")[args.depth_column] if hasattr(depth, "with_format") else depth
    tokenizer = PerceptioDepthTokenizer.from_pretrained(args.model).eval()
    evaluation = evaluate_depth_tokenizer(
        tokenizer, maps, batch_size=args.batch_size, num_pairs=args.num_pairs, margin=args.margin, seed=args.seed
    )
    output = args.output or str(Path(args.model) / EVALUATION_FILE_NAME)
    evaluation.save(output)
    print(evaluation.to_table())
    print(f"report written to {output}")
    return 0
