"""How many rendered scenes the synthetic-tiny recipe's vision pretraining needs: its probes held out and on the
training scenes, for each number of scenes.

Runs the recipe's vision pretraining stage alone (its tower, steps, batch and learning rate; `--vision-num-layers` and
`--steps` may change them) once per `--scenes` count, from the same seed, and prints each run's probe accuracies on
the held-out scenes and on as many of its own training scenes. Where the training scenes score higher, the tower has
learned its scenes rather than what they show; the first count is the base, and the others' held-out shape accuracy
is printed as a ratio of its. One thread per run (about 18 minutes per run with four tower layers and 2,500 steps);
start several processes side by side with `--output` to use more cores.

    python bench/vision_pretraining_scenes.py --scenes 3000 12000
    python bench/vision_pretraining_scenes.py --scenes 12000 --output runs/scenes-12000.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from perceptio.models.perceptio import PerceptioDepthTokenizer
from perceptio.trainers.synthetic_recipe import (
    build_recipe_model,
    build_recipe_processor,
    pretrain_recipe_vision_tower,
)
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe


# The probes the table shows: shape per patch and per object, size, depth bin and colour.
SHOWN_PROBES = ("shape", "pooled_shape", "size", "depth_bin", "colour")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scenes", type=int, nargs="+", required=True, help="training scene counts; the first is the base"
    )
    defaults = SyntheticTinyRecipe()
    parser.add_argument(
        "--steps", type=int, default=defaults.vision_pretraining_steps, help="pretraining steps per run"
    )
    parser.add_argument("--vision-num-layers", type=int, default=defaults.vision_num_layers, help="tower layers")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the recipe seed: tower, scenes and batches")
    parser.add_argument("--output", type=Path, help="write every run's accuracies to this JSON file")
    arguments = parser.parse_args(argv)
    for name in ("steps", "vision_num_layers"):
        if getattr(arguments, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(arguments, name)}.")
    if any(count <= 0 for count in arguments.scenes):
        parser.error(f"--scenes must be positive integers, got {arguments.scenes}.")
    return arguments


def pretrain_with_scenes(count: int, arguments: argparse.Namespace) -> dict[str, Any]:
    """The recipe's vision pretraining on its first `count` training scenes: held-out and training-scene accuracies."""
    recipe = SyntheticTinyRecipe(
        seed=arguments.seed,
        num_threads=1,
        render_processes=1,
        vision_pretraining_scenes=count,
        vision_pretraining_steps=arguments.steps,
        vision_num_layers=arguments.vision_num_layers,
    )
    torch.set_num_threads(recipe.num_threads)
    processor = build_recipe_processor(recipe)
    model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
    result = pretrain_recipe_vision_tower(recipe, model, processor)
    return {"scenes": count, "held_out": asdict(result.final), "training": asdict(result.training)}


def print_table(runs: list[dict[str, Any]]) -> None:
    print("| scenes | " + " | ".join(f"{name}: held out / training" for name in SHOWN_PROBES) + " | shape ratio |")
    print("| --- " * (len(SHOWN_PROBES) + 2) + "|")
    base = runs[0]["held_out"]["shape"]
    for run in runs:
        cells = [f"{run['held_out'][name]:.3f} / {run['training'][name]:.3f}" for name in SHOWN_PROBES]
        print(f"| {run['scenes']} | " + " | ".join(cells) + f" | {run['held_out']['shape'] / base:.3f} |")


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    runs = [pretrain_with_scenes(count, arguments) for count in arguments.scenes]
    if arguments.output is not None:
        arguments.output.parent.mkdir(parents=True, exist_ok=True)
        arguments.output.write_text(json.dumps(runs, indent=2), encoding="utf-8")
    print_table(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
