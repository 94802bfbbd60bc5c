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
  perceptio build --from-sa2va converted/sa2va-8b --depth-tokenizer runs/depth_tokenizer \
      --output-dir built/sa2va-8b-depth   # a converted Sa2VA (perceptio convert-sa2va) gets depth tokens
  perceptio build --from-sa2va checkpoints/Sa2VA-InternVL3-8B --dry-run   # plan it from the config alone
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio build` to the command's subparsers."""
    parser = subparsers.add_parser(
        "build",
        help="build a Perceptio checkpoint from InternVL + SAM2 + a depth tokenizer (or plan one with --dry-run)",
        description=(
            "Assemble a Perceptio checkpoint from released parts and write it as a flat Hub folder with a model card. "
            "The base must be InternVL in transformers format (InternVL3-*-hf: Qwen2/Qwen2.5 or Llama text models); "
            "original InternVL2.5 releases (InternLM2, remote code) must be converted first. With --from-sa2va, a "
            "segmentation-only checkpoint (perceptio convert-sa2va) gets the depth tokens and a depth tokenizer."
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
    parser.add_argument(
        "--from-sa2va",
        default=None,
        help="segmentation-only Perceptio folder (perceptio convert-sa2va) to add depth tokens to; with --dry-run "
        "also a Sa2VA checkpoint folder, its config.json or Hub id",
    )
    parser.add_argument("--depth-tokenizer", help="PerceptioDepthTokenizer folder or Hub id")
    parser.add_argument("--output-dir", help="folder to write (must be empty or absent)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype (default: bfloat16; with --from-sa2va, the source's); the depth tokenizer stays float32",
    )
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
    parser.add_argument(
        "--dry-run", action="store_true", help="print parameter counts and memory of --preset or --from-sa2va only"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `perceptio build` with the parsed arguments; returns the exit status."""
    if args.dry_run:
        return _plan(args)
    if args.from_sa2va is not None:
        return _build_from_sa2va(args)
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

    output_dir = Path(args.output_dir)
    card = card_data_of(args, output_dir)
    result = build_perceptio(
        base=args.base,
        sam2=args.sam2,
        depth_tokenizer=args.depth_tokenizer,
        output_dir=output_dir,
        dtype=args.dtype or "bfloat16",
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


def card_data_of(args: argparse.Namespace, output_dir: Path):
    """The model card's data from the card flags."""
    from perceptio.hub_cards.model_card import PerceptioCardData, load_evaluation_summaries

    return PerceptioCardData(
        model_name=args.model_name or output_dir.resolve().name,
        model_id=args.model_id or str(output_dir.resolve()),
        license=args.license,
        evaluation=load_evaluation_summaries(args.evaluation) if args.evaluation else [],
    )


def _build_from_sa2va(args: argparse.Namespace) -> int:
    from perceptio.hub_cards.build_from_sa2va import add_depth_tokens

    conflicting = [
        flag
        for flag, value in (
            ("--base", args.base),
            ("--sam2", args.sam2),
            ("--preset", args.preset),
            ("--num-depth-tokens", args.num_depth_tokens),
        )
        if value
    ]
    if conflicting:
        raise ValueError(
            f"--from-sa2va takes its model and SAM2 from the converted folder and N from the depth tokenizer; drop "
            f"{', '.join(conflicting)}."
        )
    missing = [
        flag
        for flag, value in (("--depth-tokenizer", args.depth_tokenizer), ("--output-dir", args.output_dir))
        if not value
    ]
    if missing:
        raise ValueError(f"--from-sa2va needs {', '.join(missing)}.")
    output_dir = Path(args.output_dir)
    result = add_depth_tokens(
        args.from_sa2va,
        args.depth_tokenizer,
        output_dir,
        dtype=args.dtype,
        overwrite=args.overwrite,
        card_data=card_data_of(args, output_dir),
    )
    print(
        f"Built {result.output_dir}: vocabulary {result.base_vocab_size} -> {result.vocab_size} "
        f"({len(result.added_token_ids)} depth tokens added). Fine-tune it with perceptio train."
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    from perceptio.hub_cards.planning import get_preset, plan_build

    if args.from_sa2va is not None:
        return _plan_from_sa2va(args)
    if args.preset is None:
        raise ValueError(
            "--dry-run plans a preset or a Sa2VA: add --preset perceptio-4b, --preset perceptio-8b or --from-sa2va DIR."
        )
    preset = get_preset(args.preset)
    plan = plan_build(preset.config())
    print(f"{preset.name}: {preset.base_model_id} + {preset.sam2_model_id} + default depth tokenizer (N=100, K=128)")
    print(plan.describe(preset.name))
    return 0


def _plan_from_sa2va(args: argparse.Namespace) -> int:
    from perceptio.hub_cards.build_from_sa2va import load_any_depth_tokenizer
    from perceptio.hub_cards.planning_sa2va import plan_from_sa2va

    depth_config = load_any_depth_tokenizer(args.depth_tokenizer).config if args.depth_tokenizer else None
    planned = plan_from_sa2va(args.from_sa2va, depth_config)
    config = planned.config
    print(
        f"{args.from_sa2va} + depth tokenizer (N={config.num_depth_tokens}, K={config.num_depth_codes}); SAM2: "
        f"{planned.sam2_source}"
    )
    print(planned.plan.describe(str(args.from_sa2va)))
    return 0
