"""What limits the synthetic-tiny recipe's SAM2 grounding: the stage's gate, held out and on its training scenes, for
variants of the recipe.

Runs the recipe's grounding stage alone (`pretrain_recipe_grounding`: its scenes, steps, batch, learning rates and
prompts) once per `--arm NAME [FIELD=VALUE ...]`, each arm the recipe's defaults with its overrides (JSON values, any
`SyntheticTinyRecipe` field), from the same seed and with one thread unless an arm sets `num_threads`. It prints each
arm's gate on the held-out scenes and on as many of its training scenes: the masks' IoU with the object their prompt
names, and the IoU between the masks of two objects of one scene (1.0 when the mask ignores its prompt); then the image
embedding's norm, SAM2's size, the minutes the stage took (rendering included) and the held-out IoU as a ratio of the
first arm's. Where the training scenes score much higher, SAM2 has learned its scenes and more of them would help.
At the defaults an arm takes about 12 minutes on one core; start several processes side by side, each with
`--output`, to use more cores.

    python bench/grounding_pretraining_arms.py --arm recipe --arm scenes-12000 grounding_scenes=12000
    python bench/grounding_pretraining_arms.py --arm cosine 'grounding_schedule="cosine"' --output runs/cosine.json
    python bench/grounding_pretraining_arms.py --arm wide sam2_backbone_hidden_size=24 sam2_hidden_size=64
    python bench/grounding_pretraining_arms.py --arm coarse grounding_steps=1000 \
        --arm fine grounding_steps=1000 sam2_patch_stride=2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from perceptio.models.perceptio import PerceptioDepthTokenizer
from perceptio.trainers.recipe_compute import subnormals_flushed, torch_threads
from perceptio.trainers.synthetic_recipe import build_recipe_model, build_recipe_processor, pretrain_recipe_grounding
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe, parse_recipe_override


# What every arm computes with unless it overrides them: one thread (one process per core) and one rendering process.
ARM_DEFAULTS = {"num_threads": 1, "render_processes": 1}


def arm_recipe(overrides: dict[str, Any], seed: int) -> SyntheticTinyRecipe:
    """The recipe an arm runs: the defaults, `ARM_DEFAULTS`, the seed, then the arm's overrides."""
    return SyntheticTinyRecipe(**{**ARM_DEFAULTS, "seed": seed, **overrides})


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arm",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "FIELD=VALUE"),
        help="an arm: its name, then its recipe overrides; repeat for more arms (the first is the ratio's base)",
    )
    parser.add_argument("--seed", type=int, default=SyntheticTinyRecipe().seed, help="the recipe seed of every arm")
    parser.add_argument("--output", type=Path, help="write every arm's gates to this JSON file")
    arguments = parser.parse_args(argv)
    arms = []
    for name, *texts in arguments.arm:
        if "=" in name:
            parser.error(f"--arm takes a name before its overrides, got {name!r} first.")
        try:
            overrides = dict(parse_recipe_override(text) for text in texts)
            arm_recipe(overrides, arguments.seed)
        except ValueError as error:
            parser.error(f"--arm {name}: {error}")
        arms.append((name, overrides))
    if len({name for name, _ in arms}) < len(arms):
        parser.error(f"arm names must differ, got {[name for name, _ in arms]}.")
    arguments.arms = arms
    return arguments


def run_arm(name: str, overrides: dict[str, Any], seed: int) -> dict[str, Any]:
    """The recipe's grounding stage under the arm's recipe: its gates, held out and on training scenes."""
    recipe = arm_recipe(overrides, seed)
    with subnormals_flushed(), torch_threads(recipe.num_threads):
        processor = build_recipe_processor(recipe)
        model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
        started = time.perf_counter()
        result = pretrain_recipe_grounding(recipe, model, processor)
        minutes = (time.perf_counter() - started) / 60
    return {
        "arm": name,
        "overrides": overrides,
        "held_out": asdict(result.final),
        "training": asdict(result.training),
        "sam2_parameters": sum(parameter.numel() for parameter in model.grounding_encoder.parameters()),
        "minutes": minutes,
    }


def print_table(runs: list[dict[str, Any]]) -> None:
    print(
        "| arm | own-object IoU: held out / training | two masks' overlap: held out / training "
        "| image-embedding norm | SAM2 parameters | minutes | IoU ratio |"
    )
    print("| --- " * 7 + "|")
    base = runs[0]["held_out"]["prompt_iou"]
    for run in runs:
        held_out, training = run["held_out"], run["training"]
        cells = [
            run["arm"],
            f"{held_out['prompt_iou']:.3f} / {training['prompt_iou']:.3f}",
            f"{held_out['two_object_overlap']:.3f} / {training['two_object_overlap']:.3f}",
            f"{held_out['image_embedding_norm']:.2f}",
            f"{run['sam2_parameters']:,}",
            f"{run['minutes']:.1f}",
            f"{held_out['prompt_iou'] / base:.3f}" if base else "-",
        ]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    runs = [run_arm(name, overrides, arguments.seed) for name, overrides in arguments.arms]
    if arguments.output is not None:
        arguments.output.parent.mkdir(parents=True, exist_ok=True)
        arguments.output.write_text(json.dumps(runs, indent=2), encoding="utf-8")
    print_table(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
