"""The ablation table: the synthetic-tiny recipe's ablation arms, same data, steps and seed.

Each arm is `run_synthetic_tiny_recipe(OUTPUT/ARM, recipe, ablation=ARM)` (what `perceptio train --recipe
synthetic-tiny --ablation ARM` runs), evaluated with `run_synthetic` (what `perceptio eval synthetic` runs) on

- the recipe's own test split (referring cIoU, the same with each image asked another row's sentence, depth-block
  AbsRel and pair-order accuracy; per VQA task the accuracy with the row's own image and with another test image,
  and the AbsRel of the depth blocks written on the own and on another image against the own image's depth: the
  `swapped_image`, `depth_own_image` and `depth_other_image` figures of `run_synthetic`), and
- a larger relative-depth-only split (`--relative-depth-questions` per point count, 2 to 5 points), because the
  recipe's 300-question test split holds only about 25 questions per point count; its relative-depth accuracy with
  the own and with another image is read from this split too.

An arm whose `OUTPUT/ARM/model` exists is evaluated, not retrained (so an interrupted table resumes, and the shipped
checkpoint's own run can stand as the `full` arm). The arms share every stage before the main stage, where the
ablations first act: the first arm trained saves them in `OUTPUT/shared-stages` and the others start their main
stage from there; every arm computes the same weights whichever arm saved them. The first arm takes about as long
as the recipe (65 to 90 minutes on two CPU cores), each other about 40 minutes less (35 to 50). Arms compute with
the recipe's two threads, as the shipped checkpoint's run did, so they run one after another; separate `--arms` runs
into one output folder merge when rerun with all of them.

    python bench/ablation_table.py --output-dir runs/ablations
    python bench/ablation_table.py --output-dir runs/ablations --arms full no-depth-tokens
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import datasets

from perceptio.data.synthetic_dataset import build_synthetic_dataset
from perceptio.data.synthetic_tasks import DEFAULT_TASK_CONFIG
from perceptio.evaluation.runners import RunSettings, run_synthetic
from perceptio.evaluation.runners.checkpoint_loading import load_perceptio_checkpoint
from perceptio.evaluation.runners.synthetic import ANSWER_TASKS
from perceptio.trainers.synthetic_recipe import ABLATIONS, reading_stage_ablation, run_synthetic_tiny_recipe
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe


POINT_COUNTS = (2, 3, 4, 5)
# Disjoint from the recipe's splits, which are drawn from the recipe seed.
RELATIVE_DEPTH_SEED_OFFSET = 1000


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="one folder per arm is made here")
    parser.add_argument("--arms", nargs="+", default=list(ABLATIONS), choices=ABLATIONS)
    parser.add_argument("--train-steps", type=int, help="override the recipe's training steps (all arms alike)")
    parser.add_argument(
        "--grounding-steps", type=int, help="override the recipe's SAM2 grounding steps (all arms alike)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relative-depth-questions", type=int, default=100, help="per point count (2 to 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation call")
    arguments = parser.parse_args(argv)
    if arguments.relative_depth_questions <= 0:
        parser.error("--relative-depth-questions must be a positive integer")
    for name in ("train_steps", "grounding_steps"):
        value = getattr(arguments, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    return arguments


def relative_depth_questions(output_dir: Path, per_point_count: int, image_size: int, seed: int) -> Path:
    """A saved test split of relative-depth questions, `per_point_count` for each of 2 to 5 points."""
    folder = output_dir / "relative_depth_questions"
    if not folder.is_dir():
        splits = []
        for num_points in POINT_COUNTS:
            config = replace(DEFAULT_TASK_CONFIG, point_count_range=(num_points, num_points))
            built = build_synthetic_dataset(
                0,
                0,
                per_point_count,
                image_size=image_size,
                seed=seed + RELATIVE_DEPTH_SEED_OFFSET + num_points,
                tasks=["relative_depth"],
                task_config=config,
            )
            splits.append(built["test"])
        datasets.DatasetDict({"test": datasets.concatenate_datasets(splits)}).save_to_disk(str(folder))
    return folder


def share_rendered_dataset(output_dir: Path, arm_dir: Path) -> None:
    """Start an arm with a link to another arm's dataset cache when there is one: every arm renders the same scenes,
    and one recipe's cache holds gigabytes (each pass over the training rows writes a copy with their images), so the
    arms read and add to one cache instead of copying it."""
    caches = sorted(output_dir.glob("*/dataset_cache"))
    if caches and not (arm_dir / "dataset_cache").exists():
        arm_dir.mkdir(parents=True, exist_ok=True)
        (arm_dir / "dataset_cache").symlink_to(caches[0].resolve(), target_is_directory=True)


def shared_stages_folder(output_dir: Path, recipe: SyntheticTinyRecipe, arm: str) -> Path:
    """Where `arm` finds the stages before its main stage: one folder for every arm whose reading stage trains under
    no ablation, and one of its own for an arm whose ablation changes the reading rows."""
    reading_ablation = reading_stage_ablation(recipe, arm)
    return output_dir / ("shared-stages" if reading_ablation == "full" else f"shared-stages-{reading_ablation}")


def evaluate_arm(arm_dir: Path, questions: Path, batch_size: int) -> dict:
    """Both evaluations of one trained arm, as `run_synthetic` summaries."""
    model, processor = load_perceptio_checkpoint(str(arm_dir / "model"))
    results = {}
    for name, data in (("recipe_test", arm_dir / "dataset"), ("relative_depth", questions)):
        settings = RunSettings(output_dir=arm_dir / f"eval_{name}", batch_size=batch_size, max_new_tokens=96)
        results[name] = run_synthetic(model, processor, str(data), settings, split="test")
    return results


def own_and_other(own: float | None, other: float | None) -> str:
    """A cell "own / other image", or "-" when the control has no figures."""
    return "-" if own is None or other is None else f"{own:.3f} / {other:.3f}"


def table_row(arm: str, results: dict) -> str:
    recipe_test, relative = results["recipe_test"], results["relative_depth"]["relative_depth"]["by_num_points"]
    depth, swapped = recipe_test["depth"], recipe_test["referring"]["swapped_expression_ciou"]
    image_cells = []
    for task in ANSWER_TASKS:
        split = results["relative_depth"] if task == "relative_depth" else recipe_test
        control = split["swapped_image"].get(task, {})
        image_cells.append(own_and_other(control.get("accuracy_own"), control.get("accuracy_swapped")))
    cells = [
        arm,
        f"{recipe_test['referring']['ciou']:.3f}",
        "-" if swapped is None else f"{swapped:.3f}",
        "-" if depth["num_maps"] == 0 else f"{depth['abs_rel']:.3f}",
        "-" if depth["num_maps"] == 0 else f"{depth['pair_order_accuracy']:.3f}",
        *(f"{relative[str(count)]['accuracy']:.3f}" for count in POINT_COUNTS),
        *image_cells,
        own_and_other(recipe_test["depth_own_image"]["abs_rel"], recipe_test["depth_other_image"]["abs_rel"]),
    ]
    return "| " + " | ".join(cells) + " |"


def table_header() -> str:
    """The table's header and separator rows."""
    columns = [
        "arm",
        "referring cIoU",
        "cIoU, swapped sentence",
        "depth AbsRel",
        "depth pair-order",
        "rel. depth 2 pts",
        "3 pts",
        "4 pts",
        "5 pts",
        *(f"{task} acc., own / other image" for task in ANSWER_TASKS),
        "depth AbsRel, own / other image",
    ]
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    output_dir = Path(arguments.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    overrides = {"seed": arguments.seed}
    for name in ("train_steps", "grounding_steps"):
        if getattr(arguments, name) is not None:
            overrides[name] = getattr(arguments, name)
    recipe = SyntheticTinyRecipe(**overrides)
    questions = relative_depth_questions(
        output_dir, arguments.relative_depth_questions, recipe.image_size, arguments.seed
    )
    rows = []
    for arm in arguments.arms:
        arm_dir = output_dir / arm
        if not (arm_dir / "model").is_dir():
            share_rendered_dataset(output_dir, arm_dir)
            shared = shared_stages_folder(output_dir, recipe, arm)
            run_synthetic_tiny_recipe(arm_dir, recipe, ablation=arm, shared_stages_dir=shared)
        results = evaluate_arm(arm_dir, questions, arguments.batch_size)
        (arm_dir / "ablation_results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        rows.append(table_row(arm, results))
    print(table_header())
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
