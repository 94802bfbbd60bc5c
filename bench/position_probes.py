"""How much of where its cell is each image token says, with and without the recipe's position probes.

The recipe's projector starts from probes of each token cell's colour, shape, size and depth bin
(`fit_projector_from_probes`); `projector_position_probes` adds probes of the cell's row and column. The projector can
pass on only what its vision tower keeps of where a patch is; `vision_position_probes` trains the tower's patches to
say their row and column during its pretraining.

With `--model`, this script probes that checkpoint's frozen vision tower. With `--pretrain-towers`, it pretrains the
recipe's vision tower twice from one initialisation, as the recipe does (its scenes, steps and seed), without and with
the position target, and prints each tower's held-out pretraining probe accuracies. On every tower it fits the
projector's probes without and with the position probes, as the recipe does (its probe scenes, steps and seed), and
prints per arm the probes' held-out accuracies and how often a least-squares linear readout, fitted on half of the
held-out images' tokens, names the row and the column of a token of the other half (chance: one over the grid's side).

    python bench/position_probes.py --model perceptio/assets/perceptio-tiny-synthetic
    python bench/position_probes.py --pretrain-towers --num-threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, replace

import torch

from perceptio import PerceptioDepthTokenizer, PerceptioForConditionalGeneration
from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.trainers.projector_from_probes import token_cell_size
from perceptio.trainers.synthetic_recipe import (
    build_recipe_model,
    build_recipe_processor,
    fit_recipe_projector,
    pretrain_recipe_vision_tower,
    render_recipe_vision_scenes,
)
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe
from perceptio.trainers.vision_pretraining import cell_position_targets, label_grid_side


def linear_readout_accuracy(tokens: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """How often a least-squares readout of `tokens` (images, cells, channels), fitted on the first half of the
    images, names the class `targets` (cells,) gives each cell, on the second half."""
    images, cells, _ = tokens.shape
    if images < 2:
        raise ValueError(f"The readout needs at least two images (one to fit, one to score), got {images}.")
    labels = torch.nn.functional.one_hot(targets, num_classes).float().expand(images, -1, -1)
    inputs = torch.cat([tokens.float(), torch.ones(images, cells, 1)], -1)
    half = images // 2
    weights = torch.linalg.lstsq(inputs[:half].flatten(0, 1), labels[:half].flatten(0, 1)).solution
    predicted = (inputs[half:].flatten(0, 1) @ weights).argmax(-1)
    return float((predicted == targets.repeat(images - half)).float().mean())


def measure_arm(model, processor, held_out, recipe: SyntheticTinyRecipe, positions: bool) -> dict[str, object]:
    """Fit the recipe's projector probes (with or without the position probes) on a copy of `model` and score the
    tokens of the `held_out` scenes."""
    arm = copy.deepcopy(model)
    result = fit_recipe_projector(replace(recipe, projector_position_probes=positions), arm, processor)
    with torch.no_grad():
        tokens = arm.model.get_image_features(pixel_values=held_out.pixel_values.to(arm.device)).pooler_output.cpu()
    side = label_grid_side(held_out)
    targets = {name: cells[0] for name, cells in cell_position_targets(1, side).items()}
    return {
        "projector_position_probes": positions,
        "probe_accuracy": {
            name: getattr(result, name) for name in ("colour", "shape", "size", "depth_bin", "row", "column")
        },
        "token_row_readout": linear_readout_accuracy(tokens, targets["row"], side),
        "token_column_readout": linear_readout_accuracy(tokens, targets["column"], side),
        "chance": 1 / side,
    }


def pretrained_towers(
    recipe: SyntheticTinyRecipe, processor
) -> dict[str, tuple[PerceptioForConditionalGeneration, dict]]:
    """The recipe's model with its vision tower pretrained from one initialisation without and with the position
    target, each with its held-out pretraining probe accuracies."""
    torch.manual_seed(recipe.seed)
    initial = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config())).eval()
    towers = {}
    for positions in (False, True):
        model = copy.deepcopy(initial)
        result = pretrain_recipe_vision_tower(replace(recipe, vision_position_probes=positions), model, processor)
        towers[f"recipe tower{', position target' if positions else ''}"] = (model.eval(), asdict(result.final))
    return towers


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    towers = parser.add_mutually_exclusive_group(required=True)
    towers.add_argument("--model", help="a Perceptio checkpoint folder whose vision tower is probed")
    towers.add_argument(
        "--pretrain-towers",
        action="store_true",
        help="pretrain the recipe's vision tower without and with the position target and probe both",
    )
    parser.add_argument("--probe-scenes", type=int, help="training scenes of the probes (default: the recipe's)")
    parser.add_argument("--probe-steps", type=int, help="steps of the probes (default: the recipe's)")
    parser.add_argument(
        "--vision-pretraining-scenes", type=int, help="with --pretrain-towers: the towers' scenes (default: recipe's)"
    )
    parser.add_argument(
        "--vision-pretraining-steps", type=int, help="with --pretrain-towers: the towers' steps (default: recipe's)"
    )
    parser.add_argument("--num-threads", type=int, default=1, help="torch CPU threads (default 1)")
    arguments = parser.parse_args(argv)
    for name in (
        "probe_scenes",
        "probe_steps",
        "vision_pretraining_scenes",
        "vision_pretraining_steps",
        "num_threads",
    ):
        value = getattr(arguments, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}.")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.num_threads)
    overrides = {
        "projector_probe_scenes": arguments.probe_scenes,
        "projector_probe_steps": arguments.probe_steps,
        "vision_pretraining_scenes": arguments.vision_pretraining_scenes,
        "vision_pretraining_steps": arguments.vision_pretraining_steps,
    }
    recipe = SyntheticTinyRecipe(**{name: value for name, value in overrides.items() if value is not None})
    if arguments.model:
        try:
            model, processor = load_perceptio_checkpoint(arguments.model, dtype="float32")
        except (ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        towers = {arguments.model: (model.eval(), None)}
    else:
        processor = build_recipe_processor(recipe)
        towers = pretrained_towers(recipe, processor)
    # The probes' own held-out scenes, the same for every tower: one training scene is rendered alongside, unused.
    cell_size = token_cell_size(next(iter(towers.values()))[0])
    _, held_out = render_recipe_vision_scenes(recipe, processor, 1, cell_size)
    for name, (model, pretraining_accuracy) in towers.items():
        for positions in (False, True):
            arm = measure_arm(model, processor, held_out, recipe, positions)
            print(json.dumps({"tower": name, "tower_probe_accuracy": pretraining_accuracy, **arm}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
