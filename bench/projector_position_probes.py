"""How much of where its cell is each image token says, with and without the projector's position probes.

The recipe's projector starts from probes of each token cell's colour, shape, size and depth bin
(`fit_projector_from_probes`); `positions=True` adds probes of the cell's row and column. This script fits both on a
checkpoint's frozen vision tower, as the recipe does (its probe scenes, steps and seed), and prints per arm the probes'
held-out accuracies and how often a least-squares linear readout, fitted on half of the held-out images' tokens, names
the row and the column of a token of the other half (chance: one over the grid's side). The checkpoint's own
projector is not used: each arm starts its projector from the tower alone.

    python bench/projector_position_probes.py --model perceptio/assets/perceptio-tiny-synthetic
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace

import torch

from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.trainers.projector_from_probes import token_cell_size, token_grid_side
from perceptio.trainers.synthetic_recipe import SyntheticTinyRecipe, fit_recipe_projector, render_recipe_vision_scenes


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
    side = token_grid_side(held_out)
    cells = torch.arange(side * side)
    return {
        "position_probes": positions,
        "probe_accuracy": {
            name: getattr(result, name) for name in ("colour", "shape", "size", "depth_bin", "row", "column")
        },
        "token_row_readout": linear_readout_accuracy(tokens, cells // side, side),
        "token_column_readout": linear_readout_accuracy(tokens, cells % side, side),
        "chance": 1 / side,
    }


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Perceptio checkpoint folder whose vision tower is probed")
    parser.add_argument("--probe-scenes", type=int, help="training scenes of the probes (default: the recipe's)")
    parser.add_argument("--probe-steps", type=int, help="steps of the probes (default: the recipe's)")
    parser.add_argument("--num-threads", type=int, default=1, help="torch CPU threads (default 1)")
    arguments = parser.parse_args(argv)
    for name in ("probe_scenes", "probe_steps", "num_threads"):
        value = getattr(arguments, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}.")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.num_threads)
    overrides = {"projector_probe_scenes": arguments.probe_scenes, "projector_probe_steps": arguments.probe_steps}
    recipe = SyntheticTinyRecipe(**{name: value for name, value in overrides.items() if value is not None})
    try:
        model, processor = load_perceptio_checkpoint(arguments.model, dtype="float32")
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model.eval()
    # The probes' own held-out scenes: one training scene is rendered alongside, unused.
    _, held_out = render_recipe_vision_scenes(recipe, processor, 1, token_cell_size(model))
    for positions in (False, True):
        print(json.dumps(measure_arm(model, processor, held_out, recipe, positions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
