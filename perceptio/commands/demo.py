"""`perceptio demo`: the embedded checkpoint on the bundled scene (or your image), with no download."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .predict import DEPTH_FILE, OVERLAY_FILE, load_image_file, write_prediction_outputs


EXAMPLE = """example:
  perceptio demo --output-dir demo-output
  perceptio demo --image my_photo.png --prompt "Where is the red cube? Also estimate the depth of the scene."
The embedded model was trained on rendered scenes of spheres, cubes and cylinders; on other images it still runs,
but expect little.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio demo` to the command's subparsers."""
    from perceptio.embedded_checkpoint import EXAMPLE_PROMPT

    parser = subparsers.add_parser(
        "demo",
        help="run the embedded checkpoint on the bundled scene: answer, mask overlay and depth image",
        description="Run Perceptio's embedded checkpoint (trained on CPU on synthetic scenes) and write the mask "
        f"overlay ({OVERLAY_FILE}), the colour-mapped depth ({DEPTH_FILE}) and prediction.json.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--image", help="image file; default: the bundled example scene")
    parser.add_argument("--prompt", default=EXAMPLE_PROMPT, help=f"default: {EXAMPLE_PROMPT!r}")
    parser.add_argument("--output-dir", default="perceptio-demo", help="where the images and JSON go")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `perceptio demo` with the parsed arguments; returns the exit status."""
    from perceptio.embedded_checkpoint import embedded_checkpoint_path, example_scene, load_embedded_perceptio

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}.")
    started = time.perf_counter()
    image = load_image_file(Path(args.image)) if args.image else example_scene()
    model, processor = load_embedded_perceptio()
    (prediction,) = model.predict([image], [args.prompt], processor=processor, max_new_tokens=args.max_new_tokens)
    print(f"Perceptio demo — embedded checkpoint {embedded_checkpoint_path().name}")
    print(f"Prompt: {args.prompt}")
    print(f"Answer: {prediction.text}")
    write_prediction_outputs(
        image, prediction, Path(args.output_dir), image=args.image or "bundled example scene", prompt=args.prompt
    )
    print(f"Done in {time.perf_counter() - started:.1f} s.")
    return 0
