"""`perceptio predict`: run a Perceptio checkpoint on one image and write the mask overlay, depth picture and JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


EXAMPLE = """example:
  perceptio predict --model runs/perceptio --image scene.png --prompt "Segment the red cube." \\
      --output-dir out/ --max-new-tokens 128
writes out/overlay.png (one colour per [SEG] mask), out/depth.png (bright = near; only with a depth block)
and out/prediction.json (answer, mask scores and areas, depth codes, flags).
"""
OVERLAY_FILE = "overlay.png"
DEPTH_FILE = "depth.png"
JSON_FILE = "prediction.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio predict` to the command's subparsers."""
    parser = subparsers.add_parser(
        "predict",
        help="Answer a prompt about an image: text, [SEG] masks and the depth map.",
        description="Load a Perceptio checkpoint folder, generate the answer to --prompt about --image with the "
        "spatial grammar on, decode the masks and the depth block, and write an overlay PNG, a depth PNG and a JSON.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", help="checkpoint folder (save_pretrained or `perceptio export`); default: the embedded checkpoint"
    )
    parser.add_argument("--image", required=True, help="image file (anything PIL opens)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--mask-threshold", type=float, default=0.0, help="mask-logit threshold")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights' dtype (auto: the checkpoint's); the depth tokenizer stays in float32",
    )
    parser.add_argument(
        "--attn-implementation", default="sdpa", help="transformers' attention kernel: sdpa, eager, flash_attention_2"
    )
    parser.add_argument(
        "--static-cache",
        action="store_true",
        help="transformers' static KV cache (fixed shapes; same answer, masks and depth as the default cache)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step (implies --static-cache; the first call compiles, which takes a while)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `perceptio predict` with the parsed arguments; returns the exit status."""
    from perceptio.checkpoint_loading import load_perceptio_checkpoint
    from perceptio.embedded_checkpoint import embedded_checkpoint_path
    from perceptio.models.perceptio.generation_perceptio import decoding_kwargs

    if args.max_new_tokens <= 0 or args.num_beams <= 0:
        raise ValueError("--max-new-tokens and --num-beams must be positive integers.")
    image_path = Path(args.image)
    image = load_image_file(image_path)
    model_dir = args.model if args.model is not None else embedded_checkpoint_path()
    model, processor = load_perceptio_checkpoint(
        model_dir, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation
    )
    (prediction,) = model.predict(
        [image],
        [args.prompt],
        processor=processor,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        mask_threshold=args.mask_threshold,
        **decoding_kwargs(static_cache=args.static_cache or args.compile, compile=args.compile),
    )
    write_prediction_outputs(image, prediction, Path(args.output_dir), image=str(image_path), prompt=args.prompt)
    return 0


def load_image_file(path: Path):
    """The image at `path`, decoded, or a `ValueError` naming the file."""
    from PIL import Image

    if not path.is_file():
        raise ValueError(f"--image {path} does not exist.")
    try:
        image = Image.open(path)
        image.load()
    except OSError as error:
        raise ValueError(f"--image {path} is not an image PIL can read: {error}") from error
    return image


def write_prediction_outputs(picture, prediction, output_dir: Path, **record) -> dict:
    """Write the overlay of `picture`, the depth PNG (when there is a depth map) and the JSON of one prediction.

    `record` adds fields (the image path, the prompt) to the JSON. Returns the JSON's content.
    """
    from perceptio.models.perceptio.visualization_perceptio import render_depth, render_mask_overlay

    output_dir.mkdir(parents=True, exist_ok=True)
    render_mask_overlay(picture, prediction.masks).save(output_dir / OVERLAY_FILE)
    result = prediction.to_json_dict()
    result.update(record, overlay=OVERLAY_FILE, depth_image=None)
    if prediction.depth is not None:
        render_depth(prediction.depth).save(output_dir / DEPTH_FILE)
        result["depth_image"] = DEPTH_FILE
    (output_dir / JSON_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"{prediction.text!r}: {len(prediction.masks)} mask(s), depth {'yes' if prediction.depth is not None else 'no'}"
        f" -> {output_dir}"
    )
    return result
