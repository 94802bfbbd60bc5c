"""`perceptio eval TASK`: run a benchmark on a Perceptio checkpoint, writing a JSON summary and a per-sample JSONL."""

from __future__ import annotations

import argparse
import json

from perceptio.evaluation import EVALUATION_DEFAULT_SPLITS, EVALUATION_TASKS, REFCOCO_TASKS


EXAMPLE = """examples:
  perceptio eval refcoco --model runs/perceptio --data lmms-lab/RefCOCO --split val --output-dir eval/refcoco
  perceptio eval blink-depth --model runs/perceptio --data BLINK-Benchmark/BLINK --split val --limit 50
  perceptio eval hardblink --model runs/perceptio --data data/evals/hardblink --batch-size 16
  perceptio eval synthetic --model runs/perceptio --data data/synthetic --skip-bad

Each run writes <output-dir>/<task>_summary.json and <task>_samples.jsonl; running it again into the same folder
resumes (samples already in the JSONL are not evaluated again).

data layouts:
  refcoco/+/g   a datasets split, one row per object (image, segmentation = one polygon, answer = sentences) as
                lmms-lab/RefCOCO, or one row per image (image, references = [{sentences, segmentation}], COCO
                polygons or RLE); prompt "Please segment {sentence}." (--prompt-template)
  blink-depth   BLINK Relative_Depth: question, image_1, choices, answer "(A)" (load with the subset's folder or
                `datasets` name; --split val)
  hardblink     the release's folder (Data/evals/hardblink of Aurora's repository): questions/
                blink_{3,4,5}pointscenter_questions.jsonl, answers/blink_{3,4,5}pointscenter_answers.jsonl and
                images/blink{3,4,5}pointscenter/N.png
  synthetic     a build_synthetic_dataset DatasetDict saved with save_to_disk (--split test)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio eval` to the command's subparsers."""
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate a checkpoint on RefCOCO/+/g, BLINK / HardBLINK relative depth or the synthetic scenes.",
        description="Run one benchmark with a Perceptio checkpoint folder: cIoU/gIoU for RefCOCO/+/g, strict "
        "multiple-choice accuracy for BLINK Relative_Depth and HardBLINK (per point count and mean), and cIoU, "
        "depth metrics and relative-depth accuracy for the synthetic scenes.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("task", choices=EVALUATION_TASKS, help="the benchmark")
    parser.add_argument("--model", required=True, help="checkpoint folder (save_pretrained or `perceptio export`)")
    parser.add_argument("--data", required=True, help="dataset folder, datasets name, or the HardBLINK root folder")
    parser.add_argument("--split", default=None, help="dataset split (default: val; synthetic: test)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N dataset rows")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--output-dir", default=None, help="where the summary and JSONL go (default: eval/<task>)")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable rows, counting them in the summary")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--prompt-template", default=None, help="refcoco prompt with a {sentence} field")
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `perceptio eval` with the parsed arguments; returns the exit status."""
    from perceptio.checkpoint_loading import load_perceptio_checkpoint
    from perceptio.evaluation.runners import (
        RunSettings,
        run_blink_depth,
        run_hardblink,
        run_refcoco,
        run_synthetic,
    )
    from perceptio.evaluation.runners.refcoco import DEFAULT_REFERRING_PROMPT
    from perceptio.evaluation.runners.resumable_run import task_file_stem

    if args.prompt_template is not None and args.task not in REFCOCO_TASKS:
        raise ValueError("--prompt-template applies to refcoco, refcoco+ and refcocog only.")
    settings = RunSettings(
        output_dir=args.output_dir or f"eval/{task_file_stem(args.task)}",
        limit=args.limit,
        batch_size=args.batch_size,
        skip_bad=args.skip_bad,
        max_new_tokens=args.max_new_tokens,
        show_progress=not args.no_progress,
    )
    split = args.split if args.split is not None else EVALUATION_DEFAULT_SPLITS[args.task]
    model, processor = load_perceptio_checkpoint(args.model, device=args.device, dtype=args.dtype)
    if args.task in REFCOCO_TASKS:
        summary = run_refcoco(
            model,
            processor,
            args.data,
            settings,
            split=split,
            task=args.task,
            prompt_template=args.prompt_template or DEFAULT_REFERRING_PROMPT,
        )
    elif args.task == "blink-depth":
        summary = run_blink_depth(model, processor, args.data, settings, split=split)
    elif args.task == "hardblink":
        summary = run_hardblink(model, processor, args.data, settings)
    else:
        summary = run_synthetic(model, processor, args.data, settings, split=split)
    print(json.dumps({key: value for key, value in summary.items() if key != "skipped"}, indent=2))
    return 0
