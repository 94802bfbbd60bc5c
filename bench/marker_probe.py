"""What a checkpoint's vision tower shows the language model about relative-depth questions: linear probes on its
patch tokens around each marked point.

Renders `--questions` held-out relative-depth questions (2 to 5 marked points with letter labels), takes the vision
tower's patch tokens in the 3 × 3 patches around each point (with `--tokens image`: the image tokens the language
model reads, after the pixel shuffle and the projector, in the 3 × 3 token cells around it), and fits on three quarters of the questions (scored on
the rest): a linear classifier of the point's letter, and a linear regression of its log metric depth. From the
regression, each held-out question's answer is the point with the smallest predicted depth, and `closest point` is how
often that is the right one. Chance at `closest point` is about 0.3 on this mix of point counts. A tower whose probes
score high carries what the question needs, so an answer that does not read the image is the language model's doing.

Each `--models` folder is a saved Perceptio checkpoint; the first is the base, and the others' figures are printed as
a ratio of its.

    python bench/marker_probe.py --models perceptio/assets/perceptio-tiny-synthetic runs/stem-frozen/model
    python bench/marker_probe.py --tokens image --models perceptio/assets/perceptio-tiny-synthetic runs/other/model
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.data.synthetic_dataset import build_synthetic_dataset
from perceptio.data.synthetic_tasks import POINT_LETTERS
from perceptio.trainers.projector_from_probes import token_cell_size, vision_patch_size
from perceptio.trainers.vision_pretraining import patch_features


# Disjoint from the recipe's own splits, which are drawn from the recipe seed.
QUESTIONS_SEED = 4242
TRAIN_SHARE = 0.75
NEIGHBOURHOOD = (-1, 0, 1)
PROBE_LEARNING_RATE = 1e-2
PROBE_WEIGHT_DECAY = 1e-4
BATCH_SIZE = 32
# What is probed: the vision tower's patch tokens, or the image tokens the language model reads.
TOKEN_KINDS = ("tower", "image")


@dataclass
class MarkedPoints:
    """One row per marked point: its patch-token neighbourhood, letter index, log depth and question index."""

    features: torch.Tensor
    letters: torch.Tensor
    log_depths: torch.Tensor
    questions: torch.Tensor


@dataclass
class ProbeScores:
    letter_accuracy: float
    depth_r2: float
    closest_point_accuracy: float


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="checkpoint folders; the first is the base")
    parser.add_argument("--questions", type=int, default=800, help="relative-depth questions rendered")
    parser.add_argument("--steps", type=int, default=400, help="full-batch Adam steps per probe")
    parser.add_argument("--seed", type=int, default=0, help="the probes' initialisation")
    parser.add_argument(
        "--tokens",
        choices=TOKEN_KINDS,
        default="tower",
        help="probe the vision tower's patch tokens (default) or the image tokens the language model reads",
    )
    arguments = parser.parse_args(argv)
    if arguments.questions < 8:
        parser.error(f"--questions must be at least 8 (a quarter is held out), got {arguments.questions}.")
    if arguments.steps <= 0:
        parser.error(f"--steps must be a positive integer, got {arguments.steps}.")
    refuse_non_checkpoints(parser, arguments.models)
    return arguments


def refuse_non_checkpoints(parser: argparse.ArgumentParser, folders: list[str], option: str = "--models") -> None:
    """Exit through `parser` naming the first of `folders` (given as `option`) that is not a saved checkpoint folder."""
    for folder in folders:
        if not (Path(folder) / "config.json").is_file():
            parser.error(f"{option}: {folder} is not a saved checkpoint (no config.json).")


def refuse_non_positive(parser: argparse.ArgumentParser, arguments: argparse.Namespace, names: list[str]) -> None:
    """Exit through `parser` naming the first of the integer options `names` (attribute names) below 1."""
    for name in names:
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(arguments, name)}.")


def render_questions(count: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as cache_dir:
        rows = build_synthetic_dataset(
            count, 0, 0, image_size=128, seed=QUESTIONS_SEED, tasks={"relative_depth": 1.0}, cache_dir=cache_dir
        )["train"]
        return [rows[index] for index in range(len(rows))]


def checkpoint_tokens(model, processor, rows: list[dict], kind: str) -> torch.Tensor:
    """Every question's image as tokens of `kind`, row-major over their grid: the vision tower's patch tokens
    (questions, patches, hidden), or the language model's image tokens (questions, token cells, text hidden)."""
    tokens = []
    with torch.no_grad():
        for start in range(0, len(rows), BATCH_SIZE):
            images = [row["image"] for row in rows[start : start + BATCH_SIZE]]
            pixel_values = torch.stack(
                [torch.as_tensor(processor.image_processor(image)["pixel_values"][0]) for image in images]
            )
            if kind == "tower":
                tokens.append(patch_features(model, pixel_values))
            else:
                tokens.append(model.model.get_image_features(pixel_values=pixel_values).pooler_output)
    return torch.cat(tokens)


def token_cell(model, kind: str) -> int:
    """The side in pixels of the image cell one token of `kind` covers."""
    return token_cell_size(model) if kind == "image" else vision_patch_size(model)


def marked_points(tokens: torch.Tensor, rows: list[dict], patch_size: int) -> MarkedPoints:
    grid = int(round(tokens.shape[1] ** 0.5))
    features, letters, log_depths, questions = [], [], [], []
    for index, row in enumerate(rows):
        meta = json.loads(row["meta"])
        for (x, y), letter, depth in zip(meta["points"], meta["letters"], meta["metric_depths"]):
            column, line = x // patch_size, y // patch_size
            patches = [
                min(max(line + dy, 0), grid - 1) * grid + min(max(column + dx, 0), grid - 1)
                for dy in NEIGHBOURHOOD
                for dx in NEIGHBOURHOOD
            ]
            features.append(tokens[index, patches].reshape(-1))
            letters.append(POINT_LETTERS.index(letter))
            log_depths.append(float(np.log(depth)))
            questions.append(index)
    return MarkedPoints(
        torch.stack(features), torch.tensor(letters), torch.tensor(log_depths), torch.tensor(questions)
    )


def fit_linear_probe(features: torch.Tensor, targets: torch.Tensor, outputs: int, steps: int) -> nn.Linear:
    """A linear map: cross-entropy for class targets, squared error for float ones."""
    probe = nn.Linear(features.shape[1], outputs)
    optimiser = torch.optim.Adam(probe.parameters(), PROBE_LEARNING_RATE, weight_decay=PROBE_WEIGHT_DECAY)
    regression = targets.is_floating_point()
    for _ in range(steps):
        optimiser.zero_grad()
        output = probe(features)
        loss = (
            nn.functional.mse_loss(output.squeeze(-1), targets)
            if regression
            else nn.functional.cross_entropy(output, targets)
        )
        loss.backward()
        optimiser.step()
    return probe


def score_probes(points: MarkedPoints, num_questions: int, steps: int) -> ProbeScores:
    train = points.questions < int(TRAIN_SHARE * num_questions)
    test = ~train
    # Standardised with the training points' statistics, shared by both probes.
    mean, std = points.features[train].mean(0), points.features[train].std(0) + 1e-6
    features = (points.features - mean) / std
    letter_probe = fit_linear_probe(features[train], points.letters[train], len(POINT_LETTERS), steps)
    depth_probe = fit_linear_probe(features[train], points.log_depths[train], 1, steps)
    with torch.no_grad():
        letters = letter_probe(features[test]).argmax(-1)
        depths = depth_probe(features[test]).squeeze(-1)
    truth, questions = points.log_depths[test], points.questions[test]
    closest = [
        float(depths[questions == question].argmin() == truth[questions == question].argmin())
        for question in questions.unique()
    ]
    return ProbeScores(
        letter_accuracy=(letters == points.letters[test]).float().mean().item(),
        depth_r2=1.0 - ((depths - truth) ** 2).mean().item() / truth.var().item(),
        closest_point_accuracy=float(np.mean(closest)),
    )


def probe_checkpoint(folder: str, rows: list[dict], steps: int, seed: int, kind: str = "tower") -> ProbeScores:
    model, processor = load_perceptio_checkpoint(folder)
    model.eval()
    points = marked_points(checkpoint_tokens(model, processor, rows, kind), rows, token_cell(model, kind))
    torch.manual_seed(seed)
    return score_probes(points, len(rows), steps)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    rows = render_questions(arguments.questions)
    scores = [
        probe_checkpoint(folder, rows, arguments.steps, arguments.seed, arguments.tokens)
        for folder in arguments.models
    ]
    held_out = len(rows) - int(TRAIN_SHARE * len(rows))
    print(f"{len(rows)} relative-depth questions, {held_out} held out; {arguments.tokens} tokens")
    print("| checkpoint | letter | depth R² | closest point |")
    print("| --- | --- | --- | --- |")
    for folder, score in zip(arguments.models, scores):
        print(
            f"| {folder} | {score.letter_accuracy:.3f} | {score.depth_r2:.3f} | {score.closest_point_accuracy:.3f} |"
        )
    base = scores[0]
    for folder, score in zip(arguments.models[1:], scores[1:]):
        ratio = (
            score.closest_point_accuracy / base.closest_point_accuracy if base.closest_point_accuracy else float("nan")
        )
        print(f"{folder} / base, closest point: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
