"""`perceptio export`: write a model and its processor as a flat folder that loads with trust_remote_code."""

from __future__ import annotations

import argparse


EXAMPLE = """example:
  perceptio export --model runs/my-finetune --output-dir exported/perceptio-8b
  perceptio export --tiny --output-dir exported/tiny   # a tiny random model, for trying the Hub path
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio export` to the command's subparsers."""
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint as a flat Hub folder (weights, processor, code, auto_map)",
        description="Export a Perceptio checkpoint as a self-contained folder for the Hugging Face Hub.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="folder with a saved Perceptio model and processor")
    source.add_argument("--tiny", action="store_true", help="export a tiny randomly initialised Perceptio instead")
    parser.add_argument("--output-dir", required=True, help="folder to write (must be empty or absent)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model (with --tiny)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `perceptio export` with the parsed arguments; returns the exit status."""
    from perceptio.checkpoint_loading import load_perceptio_checkpoint
    from perceptio.hub_cards.export_perceptio import export_pretrained
    from perceptio.tiny_models import build_tiny_perceptio

    if args.tiny:
        model, processor = build_tiny_perceptio(seed=args.seed)
    else:
        model, processor = load_perceptio_checkpoint(args.model)
    folder = export_pretrained(model, processor, args.output_dir, overwrite=args.overwrite)
    print(f"Exported to {folder}. Load it with AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).")
    return 0
