"""`perceptio convert-sa2va`: convert a released Sa2VA checkpoint into a segmentation-only Perceptio folder."""

from __future__ import annotations

import argparse
from pathlib import Path


EXAMPLE = """examples:
  perceptio convert-sa2va checkpoints/Sa2VA-4B --output-dir converted/sa2va-4b
  perceptio convert-sa2va checkpoints/Sa2VA-8B --output-dir converted/sa2va-8b --overwrite
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio convert-sa2va` to the command's subparsers."""
    parser = subparsers.add_parser(
        "convert-sa2va",
        help="convert a Sa2VA checkpoint folder (InternVL-based: Qwen2 or InternLM2) into a Perceptio folder",
        description=(
            "Convert a local Sa2VA Hub checkpoint (Sa2VA-1B/4B/8B/26B, Sa2VA-InternVL3-*) into a segmentation-only "
            "Perceptio checkpoint: InternVL in transformers' layout (InternLM2 becomes Llama), SAM2 as transformers' "
            "Sam2Model (its video modules dropped), the [SEG] projection as is, and Sa2VA's preprocessing, prompt "
            "format and mask post-processing in the processor files. Qwen2.5-VL / Qwen3-VL-based Sa2VA is refused."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="local folder of a Sa2VA checkpoint (config.json, safetensors, tokenizer)")
    parser.add_argument("--output-dir", required=True, help="folder to write (must be empty or absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `perceptio convert-sa2va` with the parsed arguments; returns the exit status."""
    from perceptio.hub_cards.convert_sa2va import convert_sa2va

    result = convert_sa2va(Path(args.source), Path(args.output_dir), overwrite=args.overwrite)
    print(
        f"Converted {args.source} ({result.llm_architecture}, vocabulary {result.vocab_size}, [SEG] id "
        f"{result.seg_token_id}) into {result.output_dir}; dropped {len(result.dropped_keys)} SAM2 video-only "
        f"weights. Load it with PerceptioForConditionalGeneration.from_pretrained({str(result.output_dir)!r})."
    )
    return 0
