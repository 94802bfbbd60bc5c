"""What the language model learns to read under two versions of the synthetic-tiny recipe's first stages: the vision
pretraining and reading stages only, scored on held-out questions of the reading tasks (colour, shape and count by
default) with their own and with another image.

The full recipe takes more than an hour; the reading stage is where these answers are first learned, alone, so it is
the quicker loop for a question about the vision tower or the reading curriculum (its figures are not the finished
recipe's). Each arm is the recipe as these experiments started from (`EXPLORATION_START`: a two-layer tower
without stem or pretraining that trains with the language model, pretrained on 3,000 scenes when an arm turns its
pretraining on, a random projector, the image before the question, 300 steps on one-object then 400 on two-object
scenes) with the arm's overrides: its vision pretraining stage
(`vision_pretraining_steps`, whose held-out probe accuracies are printed), then its reading stage (the
`reading_curriculum` phases, then the full scenes' reading questions), with SAM2's image encoder frozen as after the
recipe's grounding stage. The model is saved to `OUTPUT/ARM/model` and scored with `run_synthetic` (what `perceptio
eval synthetic` runs) on about `--questions` held-out questions of each task either arm reads (the same questions for
both): accuracy with the own image and with another test image of the same task. It prints a table and each task's
own-image accuracy in the variant as a ratio of the base's. By default the two arms differ in the curriculum alone:
the variant starts with 100 steps on the one-object scenes' colour questions, taken from its one-object phase, so both
train 1,200 steps.

An arm whose `OUTPUT/ARM/model` exists is scored, not retrained. The arms share the rendered scenes (copy a recipe
run's `dataset_cache` into OUTPUT to reuse its scenes). An arm computes with the recipe's `num_threads` (2); with
`num_threads=1` in both arms' overrides they can run side by side as two processes with one `--arms` each.

    python bench/reading_stage_vision.py --output-dir runs/reading-vision
    python bench/reading_stage_vision.py --output-dir runs/reading-tower --arms variant \\
        --variant vision_stem_channels=[32,64] vision_num_layers=4 vision_pretraining_steps=3000 \\
        freeze_vision_tower=true

`--oracle-tokens` replaces the vision tower's image tokens with perfect ones: each is the area-weighted sum of
learned embeddings of the colour, shape and size of what covers its cell of the image, from the re-rendered scene
(the arms need `vision_pretraining_steps=0`). What such an arm does not answer, the language model does not bind,
whatever the tower. `--oracle-centres` also marks each object on the token holding its centroid. With the question
before the image:

    python bench/reading_stage_vision.py --output-dir runs/oracle --oracle-tokens \
        --base vision_pretraining_steps=0 'reading_curriculum=[[1,100,["vqa_colour"]],[1,200],[2,400]]' \
        --variant vision_pretraining_steps=0 'reading_curriculum=[[1,100,["vqa_colour"]],[1,200],[2,400]]' \
        question_before_image=true

An arm with `projector_from_probes=true` starts its projector from probes of its tower's token features (pretrained
or copied with `--tower-from`) before the reading stage; their held-out accuracies go to `ARM/projector_probes.json`
and `ARM/reading_results.json`.

Overrides are `FIELD=VALUE` with a JSON value (`true`, `4`, `[32,64]`, `null`), for any `SyntheticTinyRecipe` field.

`--tower-from ARM_DIR` skips the vision pretraining of the arms trained in the call: each takes the vision tower of
an earlier arm's saved model instead (an arm whose tower was pretrained and frozen, so its saved tower is the
pretrained one, with the same tower settings), and that arm's probe accuracies. A `perceptio train --recipe
synthetic-tiny` run's folder serves as well (its tower is pretrained and frozen by default; its probes are in
`recipe_summary.json`). The tower then stays frozen, or trains on at `vision_tower_learning_rate` with
`freeze_vision_tower=false`. Two curricula on one four-layer tower
then take 15 minutes each instead of 42:

    python bench/reading_stage_vision.py --output-dir runs/colour300 --arms variant \
        --tower-from runs/strong-tower/variant --variant num_threads=1 'vision_stem_channels=[32,64]' \
        vision_num_layers=4 vision_pretraining_steps=3000 freeze_vision_tower=true \
        'reading_curriculum=[[1,300,["vqa_colour"]],[1,200],[2,400]]'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling

from perceptio.data.scene_rendering import render_scene
from perceptio.data.seg_attributes import SEG_ATTRIBUTES, named_attribute_ids
from perceptio.data.synthetic_dataset import build_synthetic_dataset
from perceptio.data.synthetic_tasks import DEFAULT_TASK_CONFIG
from perceptio.evaluation.runners import RunSettings, run_synthetic
from perceptio.evaluation.runners.checkpoint_loading import load_perceptio_checkpoint
from perceptio.models.perceptio import PerceptioDepthTokenizer
from perceptio.trainers.recipe_compute import subnormals_flushed, torch_threads
from perceptio.trainers.synthetic_recipe import (
    build_recipe_model,
    build_recipe_processor,
    fit_recipe_projector,
    pretrain_recipe_vision_tower,
    reading_curriculum_split,
    reading_split,
    render_recipe_scenes,
    train_recipe_reading_stage,
)
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe, parse_recipe_override


ARMS = ("base", "variant")
# The recipe settings every arm starts from, before its overrides: those the recipe had when these experiments were
# run, so each documented command keeps measuring what it measured.
EXPLORATION_START = {
    "vision_stem_channels": None,
    "vision_num_layers": 2,
    "vision_pretraining_steps": 0,
    "vision_pretraining_scenes": 3000,
    "freeze_vision_tower": False,
    "projector_from_probes": False,
    "question_before_image": False,
    "reading_curriculum": ((1, 300), (2, 400)),
}
DEFAULT_OVERRIDES = {
    "base": ["vision_stem_channels=[32,64]", "vision_pretraining_steps=1500", "freeze_vision_tower=true"],
    "variant": [
        "vision_stem_channels=[32,64]",
        "vision_pretraining_steps=1500",
        "freeze_vision_tower=true",
        'reading_curriculum=[[1,100,["vqa_colour"]],[1,200],[2,400]]',
    ],
}
# Where an arm with projector_from_probes keeps its token-cell probes' held-out accuracies.
PROJECTOR_PROBES_FILE = "projector_probes.json"
# Where an arm trained with --tower-from records the folder its tower came from.
TOWER_SOURCE_FILE = "tower_from.txt"
# An arm's held-out tower probe accuracies; a recipe run keeps them in its summary instead.
ARM_PROBES_FILE = "vision_probes.json"
RECIPE_SUMMARY_FILE = "recipe_summary.json"
# Where an arm trained with --oracle-tokens keeps its oracle token embeddings (the saved model has no place for them).
ORACLE_TOKENS_FILE = "oracle_tokens.pt"
# Disjoint from the recipe's own splits, which are drawn from the recipe seed.
QUESTIONS_SEED_OFFSET = 2000


def parse_override(text: str) -> tuple[str, Any]:
    """`FIELD=VALUE` -> (field, JSON-decoded value), as `parse_recipe_override`, for argparse."""
    try:
        return parse_recipe_override(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="one folder per arm, and the shared rendered scenes")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    for arm in ARMS:
        parser.add_argument(
            f"--{arm}",
            nargs="+",
            type=parse_override,
            default=[parse_override(text) for text in DEFAULT_OVERRIDES[arm]],
            metavar="FIELD=VALUE",
            help=f"the {arm} arm's recipe overrides (default: {' '.join(DEFAULT_OVERRIDES[arm])})",
        )
    parser.add_argument(
        "--tower-from",
        type=Path,
        help="an earlier arm's folder, or a `perceptio train --recipe synthetic-tiny` run's, whose saved (pretrained, "
        "frozen) vision tower the arms trained now start from, instead of pretraining their own",
    )
    parser.add_argument(
        "--oracle-tokens",
        action="store_true",
        help="the arms trained now read oracle image tokens (learned embeddings of the colour, shape and size of "
        "what covers each token's cell, from the rendered scene) instead of their vision tower's",
    )
    parser.add_argument(
        "--oracle-centres",
        action="store_true",
        help="with --oracle-tokens: the token whose cell holds an object's centroid also says so, with that "
        "object's attributes at full weight (one token per object, for counting)",
    )
    parser.add_argument("--questions", type=int, default=200, help="held-out questions per reading task")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation call")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    for name in ("questions", "batch_size"):
        if getattr(arguments, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(arguments, name)}.")
    if arguments.oracle_centres and not arguments.oracle_tokens:
        parser.error("--oracle-centres marks objects in the oracle's tokens; it needs --oracle-tokens.")
    if arguments.oracle_tokens and arguments.tower_from is not None:
        parser.error("--oracle-tokens replaces the vision tower; it cannot take one with --tower-from.")
    if arguments.tower_from is not None and not (
        (arguments.tower_from / "model").is_dir()
        and any((arguments.tower_from / name).is_file() for name in (ARM_PROBES_FILE, RECIPE_SUMMARY_FILE))
    ):
        parser.error(
            f"--tower-from {arguments.tower_from} must be an arm folder holding model/ and {ARM_PROBES_FILE}, or a "
            f"recipe run's folder holding model/ and {RECIPE_SUMMARY_FILE}."
        )
    try:
        arguments.recipes = {
            arm: SyntheticTinyRecipe(seed=arguments.seed, **{**EXPLORATION_START, **dict(getattr(arguments, arm))})
            for arm in ARMS
        }
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    pretrained = [arm for arm in arguments.arms if arguments.recipes[arm].vision_pretraining_steps]
    if arguments.oracle_tokens and pretrained:
        parser.error(
            f"--oracle-tokens replaces the vision tower: set vision_pretraining_steps=0 in the {' and '.join(pretrained)} "
            "arm's overrides."
        )
    return arguments


def question_tasks(recipes: dict[str, SyntheticTinyRecipe]) -> tuple[str, ...]:
    """Every arm's reading tasks, in order: the arms are scored on the same questions, even when run one at a time."""
    return tuple(dict.fromkeys(task for recipe in recipes.values() for task in recipe.reading_tasks))


def reading_questions(output_dir: Path, recipe: SyntheticTinyRecipe, tasks: tuple[str, ...], per_task: int) -> Path:
    """A saved test split of `per_task` held-out questions of each of `tasks`, without depth blocks, in a folder named
    for the tasks and the count (so a run with other tasks or another `--questions` does not reuse it)."""
    folder = output_dir / "reading_questions" / f"{'-'.join(tasks)}-{per_task}"
    if not folder.is_dir():
        built = build_synthetic_dataset(
            0,
            0,
            per_task * len(tasks),
            image_size=recipe.image_size,
            seed=recipe.seed + QUESTIONS_SEED_OFFSET,
            tasks=dict.fromkeys(tasks, 1.0),
            task_config=replace(DEFAULT_TASK_CONFIG, depth_block_share=0.0),
        )
        built.save_to_disk(str(folder))
    return folder


def load_pretrained_tower(model, recipe: SyntheticTinyRecipe, source: Path) -> dict[str, float]:
    """Copy the vision tower of the arm saved in `source` into `model` (frozen with `recipe.freeze_vision_tower`);
    returns that arm's probe accuracies."""
    if not recipe.vision_pretraining_steps:
        raise ValueError("--tower-from stands in for vision pretraining: the arm needs vision_pretraining_steps > 0.")
    saved, _ = load_perceptio_checkpoint(str(source / "model"))
    try:
        model.model.vision_tower.load_state_dict(saved.model.vision_tower.state_dict())
    except RuntimeError as error:
        raise ValueError(
            f"The vision tower in {source / 'model'} does not fit the arm's tower settings (vision_num_layers, "
            f"vision_hidden_size, vision_stem_channels): {error}"
        ) from error
    model.model.vision_tower.requires_grad_(not recipe.freeze_vision_tower)
    return tower_probes(source)


def tower_probes(source: Path) -> dict[str, float]:
    """The held-out probe accuracies of the tower saved in `source`: an arm's `vision_probes.json`, or the final
    probes of a recipe run's vision pretraining in its `recipe_summary.json`."""
    if (source / ARM_PROBES_FILE).is_file():
        return json.loads((source / ARM_PROBES_FILE).read_text(encoding="utf-8"))
    summary = json.loads((source / RECIPE_SUMMARY_FILE).read_text(encoding="utf-8"))
    if not (summary.get("vision_pretraining") or {}).get("final"):
        raise ValueError(
            f"{source / RECIPE_SUMMARY_FILE} records no vision pretraining: its run has no pretrained tower."
        )
    return summary["vision_pretraining"]["final"]


class OracleImageTokens(nn.Module):
    """Perfect image tokens: each token is the area-weighted sum, over what covers its cell of the image, of learned
    embeddings of each object's colour, shape and size, or of the background. With them in place of the vision
    tower's, what the language model fails to answer is not for want of image features.

    With `centres`, each object is also marked once: the token whose cell holds the object's centroid adds a learned
    centre embedding and the object's attribute embeddings at full weight, so one token per object says it is there
    (what counting needs, where an object's other tokens cover one to many cells)."""

    def __init__(self, hidden_size: int, centres: bool = False):
        super().__init__()
        self.attributes = nn.ModuleList(nn.Embedding(len(values), hidden_size) for values in SEG_ATTRIBUTES.values())
        self.background = nn.Parameter(torch.zeros(hidden_size))
        for table in self.attributes:
            nn.init.normal_(table.weight, std=0.5)
        self.centre = nn.Parameter(torch.randn(hidden_size) * 0.5) if centres else None

    def forward(self, cover: torch.Tensor, attributes: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """`cover` (tokens, objects + 1): the share of each token's cell each object (then the background) covers;
        `attributes` (objects, 3): each object's class ids of `SEG_ATTRIBUTES` (colour, shape, size); `centres`
        (tokens, objects): 1 where a token's cell holds an object's centroid (used with `centres` only)."""
        objects = sum(table(attributes[:, index]) for index, table in enumerate(self.attributes))
        tokens = cover[:, :-1] @ objects + cover[:, -1:] * self.background
        if self.centre is not None:
            tokens = tokens + centres @ (objects + self.centre)
        return tokens


def image_key(pixel_values: torch.Tensor) -> str:
    """The digest of one image's pixel values, by which the oracle finds its scene."""
    return hashlib.sha1(pixel_values.detach().float().contiguous().numpy().tobytes()).hexdigest()


def scene_labels(scene_seed: int, recipe: SyntheticTinyRecipe, num_objects: int | None) -> tuple[torch.Tensor, ...]:
    """Re-render a row's scene: each token cell's cover by its objects and the background, their attributes, and the
    cell holding each visible object's centroid (`OracleImageTokens.forward`'s arguments)."""
    scene = render_scene(scene_seed, recipe.image_size, num_objects=num_objects)
    cell = 2 * recipe.vision_patch_size  # InternVL's pixel shuffle joins 2x2 patches into one token
    masks = scene.instance_masks.astype(np.float32)
    count, height, width = masks.shape
    cover = masks.reshape(count, height // cell, cell, width // cell, cell).mean((2, 4)).reshape(count, -1).T
    cover = np.concatenate([cover, 1.0 - cover.sum(1, keepdims=True)], axis=1)
    centres = np.zeros((cover.shape[0], count), dtype=np.float32)
    for index, mask in enumerate(masks):
        rows, columns = np.nonzero(mask)
        if len(rows):
            centres[int(rows.mean()) // cell * (width // cell) + int(columns.mean()) // cell, index] = 1.0
    attributes = [named_attribute_ids({name: getattr(obj, name) for name in SEG_ATTRIBUTES}) for obj in scene.objects]
    return (
        torch.from_numpy(cover),
        torch.tensor(attributes, dtype=torch.long).reshape(-1, 3),
        torch.from_numpy(centres),
    )


def oracle_label_table(
    processor, recipe: SyntheticTinyRecipe, sources: list[tuple[Dataset, int | None]]
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Every image of `sources` ((rows, objects per scene or None)) keyed by its pixel values, with its labels."""
    table = {}
    progress = tqdm(total=sum(len(rows) for rows, _ in sources), desc="Oracle scenes", unit="image")
    for rows, num_objects in sources:
        for start in range(0, len(rows), 256):
            chunk = rows.select(range(start, min(start + 256, len(rows))))
            pixel_values = processor.image_processor(images=list(chunk["image"]), max_num_tiles=1)["pixel_values"]
            for image, scene_seed in zip(pixel_values, chunk["scene_seed"]):
                key = image_key(image)
                if key not in table:
                    table[key] = scene_labels(int(scene_seed), recipe, num_objects)
            progress.update(len(chunk))
    progress.close()
    return table


def attach_oracle_tokens(model, tokens: OracleImageTokens, table: dict[str, tuple[torch.Tensor, ...]]) -> None:
    """Make `tokens` the model's image tokens (a submodule, so the trainer trains it); the vision tower is unused."""
    model.oracle_image_tokens = tokens
    model.model.vision_tower.requires_grad_(False)

    def oracle_image_features(pixel_values: torch.Tensor, *args, **kwargs) -> BaseModelOutputWithPooling:
        keys = [image_key(image) for image in pixel_values]
        missing = sum(key not in table for key in keys)
        if missing:
            raise ValueError(f"{missing} image(s) of a batch are in no scene the oracle rendered.")
        return BaseModelOutputWithPooling(pooler_output=torch.stack([tokens(*table[key]) for key in keys]))

    model.model.get_image_features = oracle_image_features


def oracle_sources(recipe: SyntheticTinyRecipe, train_split: Dataset, questions: Path, cache: Path) -> list:
    """The rows whose images an oracle arm sees: the reading stage's, and the held-out questions."""
    sources = [(reading_split(recipe, train_split), None), (Dataset.load_from_disk(str(questions / "test")), None)]
    for num_objects in sorted({phase[0] for phase in recipe.reading_curriculum}):
        sources.append((reading_curriculum_split(recipe, num_objects, cache), num_objects))
    return sources


def train_arm(
    output_dir: Path,
    arm_dir: Path,
    recipe: SyntheticTinyRecipe,
    tower_from: Path | None = None,
    oracle_questions: Path | None = None,
    oracle_centres: bool = False,
) -> None:
    """The arm's vision pretraining (or its tower copied from `tower_from`, or oracle image tokens for the scenes of
    the reading stage and of `oracle_questions`), its projector's start from probes (with `projector_from_probes`)
    and reading stages; saves the model and the held-out probe accuracies (and the oracle's embeddings)."""
    with subnormals_flushed(), torch_threads(recipe.num_threads):
        train_split = render_recipe_scenes(recipe, output_dir / "dataset_cache")["train"]
        processor = build_recipe_processor(recipe)
        model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
        oracle = None
        if oracle_questions is not None:
            oracle = OracleImageTokens(model.config.text_config.hidden_size, centres=oracle_centres)
            sources = oracle_sources(recipe, train_split, oracle_questions, output_dir / "dataset_cache")
            attach_oracle_tokens(model, oracle, oracle_label_table(processor, recipe, sources))
            probes = None
        elif tower_from is not None:
            probes = load_pretrained_tower(model, recipe, tower_from)
        elif recipe.vision_pretraining_steps:
            probes = asdict(pretrain_recipe_vision_tower(recipe, model, processor).final)
        else:
            probes = None
        model.grounding_encoder.vision_encoder.requires_grad_(False)
        # The curriculum's scenes are rendered once, into the shared cache, whichever arm comes first.
        arm_dir.mkdir(parents=True, exist_ok=True)
        if recipe.projector_from_probes:
            projector = asdict(fit_recipe_projector(recipe, model, processor))
            (arm_dir / PROJECTOR_PROBES_FILE).write_text(json.dumps(projector, indent=2), encoding="utf-8")
        if not (arm_dir / "dataset_cache").exists():
            (arm_dir / "dataset_cache").symlink_to((output_dir / "dataset_cache").resolve(), target_is_directory=True)
        train_recipe_reading_stage(recipe, model, processor, train_split, arm_dir)
        (arm_dir / ARM_PROBES_FILE).write_text(json.dumps(probes, indent=2), encoding="utf-8")
        if tower_from is not None:
            (arm_dir / TOWER_SOURCE_FILE).write_text(str(tower_from), encoding="utf-8")
        if oracle is not None:
            del model.oracle_image_tokens
            torch.save(oracle.state_dict(), arm_dir / ORACLE_TOKENS_FILE)
        model.save_pretrained(arm_dir / "model")
        processor.save_pretrained(arm_dir / "model")


def score_arm(arm_dir: Path, questions: Path, batch_size: int, recipe: SyntheticTinyRecipe) -> dict[str, Any]:
    """`run_synthetic` on the held-out reading questions (with the arm's oracle image tokens, if it has them), and
    the arm's probe accuracies (the tower's, and the projector's token-cell probes if it started from them)."""
    model, processor = load_perceptio_checkpoint(str(arm_dir / "model"))
    if (arm_dir / ORACLE_TOKENS_FILE).is_file():
        saved = torch.load(arm_dir / ORACLE_TOKENS_FILE)
        oracle = OracleImageTokens(model.config.text_config.hidden_size, centres="centre" in saved)
        oracle.load_state_dict(saved)
        rows = Dataset.load_from_disk(str(questions / "test"))
        attach_oracle_tokens(model, oracle, oracle_label_table(processor, recipe, [(rows, None)]))
    settings = RunSettings(output_dir=arm_dir / "eval", batch_size=batch_size, max_new_tokens=16)
    summary = run_synthetic(model, processor, str(questions), settings, split="test")
    probes = json.loads((arm_dir / ARM_PROBES_FILE).read_text(encoding="utf-8"))
    projector_file = arm_dir / PROJECTOR_PROBES_FILE
    projector = json.loads(projector_file.read_text(encoding="utf-8")) if projector_file.is_file() else None
    return {"swapped_image": summary["swapped_image"], "vision_probes": probes, "projector_probes": projector}


def accuracy_cell(control: dict[str, Any] | None) -> str:
    """ "own ± SE / other image" for one task's swapped-image control; "-" for a task without questions."""
    if not control or control["accuracy_own"] is None:
        return "-"
    error = "" if control["accuracy_own_se"] is None else f" ± {control['accuracy_own_se']:.3f}"
    return f"{control['accuracy_own']:.3f}{error} / {control['accuracy_swapped']:.3f}"


def probe_cell(probes: dict[str, float] | None) -> str:
    """The tower's held-out shape (per patch / per object) and size probe accuracies, or "-" without pretraining."""
    if probes is None:
        return "-"
    return f"{probes['shape']:.3f} / {probes['pooled_shape']:.3f} / {probes['size']:.3f}"


def print_table(results: dict[str, dict[str, Any]], tasks: tuple[str, ...]) -> None:
    """One row per arm, then the variant's own-image accuracy as a ratio of the base's, per task."""
    columns = ["arm", "probes: shape / object shape / size", *(f"{task} own / other image" for task in tasks)]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for arm, result in results.items():
        cells = [arm, probe_cell(result["vision_probes"])]
        cells += [accuracy_cell(result["swapped_image"].get(task)) for task in tasks]
        print("| " + " | ".join(cells) + " |")
    if set(ARMS) <= set(results):
        ratios = []
        for task in tasks:
            base, variant = (results[arm]["swapped_image"].get(task, {}).get("accuracy_own") for arm in ARMS)
            ratios.append(f"{task} {variant / base:.2f}" if base and variant is not None else f"{task} -")
        print("variant / base, own-image accuracy: " + ", ".join(ratios))


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    output_dir = Path(arguments.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tasks = question_tasks(arguments.recipes)
    questions = reading_questions(output_dir, arguments.recipes["base"], tasks, arguments.questions)
    results = {}
    for arm in arguments.arms:
        arm_dir = output_dir / arm
        recipe = arguments.recipes[arm]
        if not (arm_dir / "model").is_dir():
            oracle_questions = questions if arguments.oracle_tokens else None
            train_arm(output_dir, arm_dir, recipe, arguments.tower_from, oracle_questions, arguments.oracle_centres)
        results[arm] = score_arm(arm_dir, questions, arguments.batch_size, recipe)
        overrides = {name: value for name, value in getattr(arguments, arm)}
        source_file = arm_dir / TOWER_SOURCE_FILE
        tower_from = source_file.read_text(encoding="utf-8") if source_file.is_file() else None
        (arm_dir / "reading_results.json").write_text(
            json.dumps({"overrides": overrides, "tower_from": tower_from, **results[arm]}, indent=2), encoding="utf-8"
        )
    print_table(results, tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
