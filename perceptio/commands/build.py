"""`perceptio build`: assemble a Perceptio checkpoint from InternVL, SAM2 and a depth tokenizer, or plan one."""

from __future__ import annotations

import argparse
from pathlib import Path


EXAMPLE = """examples:
  perceptio build --base OpenGVLab/InternVL3-8B-hf --sam2 facebook/sam2.1-hiera-large \\
      --depth-tokenizer runs/depth_tokenizer --output-dir built/perceptio-8b --dtype bfloat16
  perceptio build --base OpenGVLab/InternVL3-8B-hf --sam2 checkpoints/sam2.1_hiera_large.pt \\
      --depth-tokenizer runs/depth_tokenizer --output-dir built/perceptio-8b   # original SAM2 .pt, converted
  perceptio build --preset perceptio-8b --dry-run   # parameter counts and memory, no weights loaded
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio build` to the command's subparsers."""
    parser = subparsers.add_parser(
        "build",
        help="build a Perceptio checkpoint from InternVL + SAM2 + a depth tokenizer (or plan one with --dry-run)",
        description=(
            "Assemble a Perceptio checkpoint from released parts and write it as a flat Hub folder with a model card. "
            "The base must be InternVL in transformers format (InternVL3-*-hf: Qwen2/Qwen2.5 or Llama text models); "
            "original InternVL2.5 releases (InternLM2, remote code) must be converted first."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", help="InternVLForConditionalGeneration folder or Hub id")
    parser.add_argument("--sam2", help="SAM2 in transformers format (folder or Hub id) or an original SAM2 .pt file")
    parser.add_argument(
        "--sam2-config", default=None, help="sam2 hydra config of an original .pt (inferred for Meta's files)"
    )
    parser.add_argument(
        "--sam2-override", action="append", default=[], help="hydra override for the sam2 config (repeatable)"
    )
    parser.add_argument("--depth-tokenizer", help="PerceptioDepthTokenizer folder or Hub id")
    parser.add_argument("--output-dir", help="folder to write (must be empty or absent)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    parser.add_argument(
        "--num-depth-tokens",
        type=int,
        default=None,
        help="N, codes per depth block; the depth tokenizer's grid must match (default 100)",
    )
    parser.add_argument("--model-name", default=None, help="title of the model card (default: output folder name)")
    parser.add_argument("--model-id", default=None, help="Hub id the card's usage code loads (default: output folder)")
    parser.add_argument("--license", default="apache-2.0", help="licence id written in the model card")
    parser.add_argument("--evaluation", default=None, help="evaluation JSON (perceptio eval) for the card's results")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the text_hidden_fcs initialisation")
    parser.add_argument("--preset", default=None, help="perceptio-4b or perceptio-8b (with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="print parameter counts and memory of --preset only")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `perceptio build` with the parsed arguments; returns the exit status."""
    if args.dry_run:
        return _plan(args)
    if args.preset is not None:
        raise ValueError(
            "--preset only plans (use it with --dry-run); a build takes --base, --sam2 and --depth-tokenizer."
        )
    missing = [
        flag
        for flag, value in (
            ("--base", args.base),
            ("--sam2", args.sam2),
            ("--depth-tokenizer", args.depth_tokenizer),
            ("--output-dir", args.output_dir),
        )
        if not value
    ]
    if missing:
        raise ValueError(f"a build needs {', '.join(missing)} (or --preset P --dry-run to plan one).")
    from perceptio.hub_cards.build_perceptio import DEFAULT_NUM_DEPTH_TOKENS, build_perceptio
    from perceptio.hub_cards.model_card import PerceptioCardData, load_evaluation_summaries

    output_dir = Path(args.output_dir)
    card = PerceptioCardData(
        model_name=args.model_name or output_dir.resolve().name,
        model_id=args.model_id or str(output_dir.resolve()),
        license=args.license,
        evaluation=load_evaluation_summaries(args.evaluation) if args.evaluation else [],
    )
    result = build_perceptio(
        base=args.base,
        sam2=args.sam2,
        depth_tokenizer=args.depth_tokenizer,
        output_dir=output_dir,
        dtype=args.dtype,
        num_depth_tokens=args.num_depth_tokens or DEFAULT_NUM_DEPTH_TOKENS,
        sam2_config_name=args.sam2_config,
        sam2_overrides=tuple(args.sam2_override),
        overwrite=args.overwrite,
        seed=args.seed,
        card_data=card,
    )
    print(
        f"Built {result.output_dir}: vocabulary {result.base_vocab_size} -> {result.vocab_size} "
        f"({len(result.added_token_ids)} spatial tokens added). Load it with "
        f"AutoModel.from_pretrained({str(result.output_dir)!r}, trust_remote_code=True)."
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    from perceptio.hub_cards.planning import get_preset, plan_build

    if args.preset is None:
        raise ValueError("--dry-run plans a preset: add --preset perceptio-4b or --preset perceptio-8b.")
    preset = get_preset(args.preset)
    plan = plan_build(preset.config())
    print(f"{preset.name}: {preset.base_model_id} + {preset.sam2_model_id} + default depth tokenizer (N=100, K=128)")
    print(plan.describe(preset.name))
    return 0
