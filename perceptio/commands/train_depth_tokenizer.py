"""`perceptio train-depth-tokenizer`: distil a VQ-VAE depth tokenizer from a Depth Anything teacher (or train it
on given ground-truth depth maps)."""

from __future__ import annotations

import argparse
from pathlib import Path


EXAMPLE = """example:
  perceptio train-depth-tokenizer --teacher depth-anything/Depth-Anything-V2-Small-hf \\
      --images data/images --output-dir runs/depth_tokenizer --max-steps 5000
  perceptio train-depth-tokenizer --depth ground_truth_depth.npy --output-dir runs/depth_tokenizer \\
      --image-size 80 --hidden-channels 32 64 128 --codebook-dim 64
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio train-depth-tokenizer` to the command's subparsers."""
    parser = subparsers.add_parser(
        "train-depth-tokenizer",
        help="Train the VQ-VAE depth tokenizer on teacher or ground-truth depth maps.",
        description="Distil the depth tokenizer from a Depth Anything teacher, or train it on given depth maps; "
        "checkpoints, resume and logging come from transformers.Trainer; ends with an evaluation report.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("data (give --images with --teacher, or --depth)")
    source.add_argument("--teacher", help="Depth Anything V2 checkpoint id or local folder")
    source.add_argument("--images", help="image folder, saved datasets folder, or Hub dataset name")
    source.add_argument("--image-column", default="image")
    source.add_argument("--split", default="train", help="split of a Hub dataset given to --images")
    source.add_argument("--depth", help="ground-truth relative inverse depth: .npy (M, H, W) or saved datasets folder")
    source.add_argument("--depth-column", default="teacher_depth")
    source.add_argument("--teacher-cache-dir", default=None, help="where teacher maps of in-memory images are cached")
    parser.add_argument("--output-dir", required=True)
    model = parser.add_argument_group("tokenizer size (defaults: 320x320, 10x10 grid, K=128, D=512)")
    model.add_argument("--image-size", type=int, default=320)
    model.add_argument("--hidden-channels", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    model.add_argument("--codebook-dim", type=int, default=512)
    model.add_argument("--num-codes", type=int, default=128)
    model.add_argument("--dead-code-threshold-steps", type=int, default=100)
    training = parser.add_argument_group("training")
    training.add_argument("--max-steps", type=int, default=2000)
    training.add_argument("--batch-size", type=int, default=16)
    training.add_argument("--learning-rate", type=float, default=3e-4)
    training.add_argument("--eval-fraction", type=float, default=0.1)
    training.add_argument("--logging-steps", type=int, default=50)
    training.add_argument("--save-steps", type=int, default=500)
    training.add_argument("--seed", type=int, default=0)
    training.add_argument(
        "--resume", nargs="?", const=True, default=None, help="resume (from CHECKPOINT or the latest)"
    )
    training.add_argument("--report-to", default="none", help="e.g. tensorboard, wandb, none")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `perceptio train-depth-tokenizer` with the parsed arguments; returns the exit status."""
    from perceptio.commands.eval_depth_tokenizer import load_depth_maps
    from perceptio.models.perceptio.configuration_perceptio_depth_tokenizer import PerceptioDepthTokenizerConfig
    from perceptio.trainers.depth_tokenizer_trainer import train_depth_tokenizer

    if (args.depth is None) == (args.images is None):
        raise ValueError("give either --images (with --teacher) or --depth.")
    if args.images is not None and args.teacher is None:
        raise ValueError("--images needs --teacher (a Depth Anything V2 checkpoint id or folder).")
    config = PerceptioDepthTokenizerConfig(
        image_size=args.image_size,
        hidden_channels=args.hidden_channels,
        codebook_dim=args.codebook_dim,
        num_codes=args.num_codes,
        dead_code_threshold_steps=args.dead_code_threshold_steps,
    )
    data = (
        {"depth_maps": load_depth_maps(args.depth, args.depth_column)}
        if args.depth is not None
        else {"images": load_images(args.images, args.split), "teacher": args.teacher}
    )
    train_depth_tokenizer(
        args.output_dir,
        config=config,
        depth_column=args.depth_column,
        image_column=args.image_column,
        eval_fraction=args.eval_fraction,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        seed=args.seed,
        resume_from_checkpoint=args.resume,
        report_to=args.report_to,
        teacher_cache_dir=args.teacher_cache_dir,
        **data,
    )
    return 0


def load_images(source: str, split: str):
    """A dataset of images from an image folder, a `save_to_disk` folder, or a Hub dataset name."""
    from datasets import load_dataset, load_from_disk

    from perceptio.data.depth_teacher import image_dataset_from_folder

    path = Path(source)
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return load_from_disk(str(path))
    if path.is_dir():
        return image_dataset_from_folder(path)
    return load_dataset(source, split=split)
