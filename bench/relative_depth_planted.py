"""Whether a checkpoint's language-model configuration learns to answer relative-depth questions when its image tokens
say plainly where the points are and how far: planted tokens, no vision tower.

`relative_depth_language_model.py` trains a language model on the image tokens a checkpoint writes. This script asks
how hard the lookup is for that configuration in itself. Each question is drawn at random: 2 to 5 of the 64 token
cells are marked (the letter one-hot and a "marked" channel at `MARK_SCALE`), every cell carries its log depth on one
channel, the closest point is at least the task's `depth_margin` closer than the others (as in the rendered
questions), and everything else is noise. The sequence is a fixed prefix standing in for the question, the 64 image
tokens, with `--depth-block` 64 depth codes (each cell's depth quantised, as fixed embeddings), then the answer's "(".
A language model of the checkpoint's text configuration, from random weights, and a letter head train on the answer's
letter among the question's letters, for `--steps` steps of `--batch-size` questions, and every `--eval-every` steps
the held-out accuracy is printed with each question's own image tokens and with another question's. With
`--two-point-steps N` the first N steps train on questions of two points alone (a curriculum: one comparison before
several). One run per `--seeds` value: how often the lookup is learned, and by when.

    python bench/relative_depth_planted.py --model perceptio/assets/perceptio-tiny-synthetic --depth-block
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from marker_probe import refuse_non_checkpoints
from relative_depth_language_model import (
    Evaluation,
    add_letter_training_options,
    check_letter_training_options,
    evaluation_rows,
    two_point_start,
)
from torch import nn
from transformers import AutoConfig, AutoModel

from perceptio.data.synthetic_tasks import DEFAULT_TASK_CONFIG, POINT_LETTERS
from perceptio.embedded_checkpoint import embedded_checkpoint_path


TOKEN_CELLS = 64
PREFIX_LENGTH = 40
MARK_SCALE = 3.0
NOISE_STD = 0.1
# Log metric depth range of the planted cells (metres 2 to 10) and the depth block's number of code levels.
LOG_DEPTH_RANGE = (0.7, 2.3)
DEPTH_CODE_LEVELS = 16
# The marked flag and the depth sit a few channels past the letters' one-hot.
MARKED_CHANNEL = len(POINT_LETTERS) + 3
DEPTH_CHANNEL = MARKED_CHANNEL + 1
WEIGHT_DECAY = 0.01
TEST_SEED = 999


@dataclass
class PlantedQuestions:
    """Image tokens (questions, cells, hidden), each cell's depth code, the point count and the closest point's letter
    index."""

    tokens: torch.Tensor
    depth_codes: torch.Tensor
    num_points: torch.Tensor
    answers: torch.Tensor

    def __getitem__(self, index) -> PlantedQuestions:
        return PlantedQuestions(
            self.tokens[index], self.depth_codes[index], self.num_points[index], self.answers[index]
        )

    def __len__(self) -> int:
        return len(self.answers)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=str(embedded_checkpoint_path()), help="checkpoint whose text configuration is trained"
    )
    add_letter_training_options(parser, "planted questions")
    parser.add_argument("--depth-block", action="store_true", help="put 64 depth codes between image and answer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed: weights, data, order")
    arguments = parser.parse_args(argv)
    check_letter_training_options(parser, arguments)
    refuse_non_checkpoints(parser, [arguments.model], "--model")
    return arguments


def point_depths(num_points: int, generator: torch.Generator) -> torch.Tensor:
    """Log depths of `num_points` points whose closest is closer than every other by the task's relative margin."""
    low, high = LOG_DEPTH_RANGE
    margin = math.log1p(DEFAULT_TASK_CONFIG.depth_margin)
    while True:
        depths = low + (high - low) * torch.rand(num_points, generator=generator)
        nearest, runner_up = depths.sort().values[:2]
        if runner_up - nearest >= margin:
            return depths


def plant_questions(
    count: int, hidden_size: int, generator: torch.Generator, num_points: int | None = None
) -> PlantedQuestions:
    """`count` random questions written on clean channels of otherwise noisy image tokens, each with `num_points`
    points (2 to 5 at random when None)."""
    low, high = LOG_DEPTH_RANGE
    tokens = torch.randn(count, TOKEN_CELLS, hidden_size, generator=generator) * NOISE_STD
    cell_depths = low + (high - low) * torch.rand(count, TOKEN_CELLS, generator=generator)
    if num_points is None:
        num_points = torch.randint(2, len(POINT_LETTERS) + 1, (count,), generator=generator)
    else:
        num_points = torch.full((count,), num_points)
    answers = torch.empty(count, dtype=torch.long)
    for question, points in enumerate(num_points.tolist()):
        depths = point_depths(points, generator)
        cells = torch.randperm(TOKEN_CELLS, generator=generator)[:points]
        cell_depths[question, cells] = depths
        tokens[question, cells, torch.arange(points)] = MARK_SCALE
        tokens[question, cells, MARKED_CHANNEL] = MARK_SCALE
        answers[question] = depths.argmin()
    middle = (low + high) / 2
    tokens[..., DEPTH_CHANNEL] = MARK_SCALE * (cell_depths - middle)
    depth_codes = ((cell_depths - low) / (high - low) * DEPTH_CODE_LEVELS).long().clamp(0, DEPTH_CODE_LEVELS - 1)
    return PlantedQuestions(tokens, depth_codes, num_points, answers)


class PlantedReader(nn.Module):
    """A fresh language model of a checkpoint's text configuration reading prefix, image tokens, optional depth block
    and "(", and a head scoring the letters at the "(" (the letters beyond the question's point count masked)."""

    def __init__(self, text_config, depth_block: bool, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.language_model = AutoModel.from_config(text_config)
        self.head = nn.Linear(text_config.hidden_size, len(POINT_LETTERS), bias=False)
        std = text_config.initializer_range
        # Fixed, as the frozen text embeddings of a question are: only the model and head learn.
        self.register_buffer("prefix", torch.randn(PREFIX_LENGTH, text_config.hidden_size) * std)
        self.register_buffer("depth_code_embeddings", torch.randn(DEPTH_CODE_LEVELS, text_config.hidden_size) * std)
        self.register_buffer("answer_start", torch.randn(1, text_config.hidden_size) * std)
        self.depth_block = depth_block

    def forward(self, questions: PlantedQuestions, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Letter scores; `image_tokens` (questions, cells, hidden) replace the questions' own when given."""
        tokens = questions.tokens if image_tokens is None else image_tokens
        batch = len(questions)
        parts = [self.prefix.expand(batch, -1, -1), tokens]
        if self.depth_block:
            parts.append(self.depth_code_embeddings[questions.depth_codes])
        parts.append(self.answer_start.expand(batch, -1, -1))
        hidden = self.language_model(inputs_embeds=torch.cat(parts, dim=1)).last_hidden_state
        logits = self.head(hidden[:, -1])
        unused = torch.arange(len(POINT_LETTERS)) >= questions.num_points[:, None]
        return logits.masked_fill(unused, float("-inf"))


def evaluate(reader: PlantedReader, test: PlantedQuestions) -> tuple[float, float]:
    """Held-out accuracy with each question's own image tokens and with the next held-out question's."""
    reader.eval()
    with torch.no_grad():
        own = reader(test).argmax(-1) == test.answers
        other = reader(test, test.tokens.roll(1, dims=0)).argmax(-1) == test.answers
    reader.train()
    return own.float().mean().item(), other.float().mean().item()


def train_reader(text_config, arguments: argparse.Namespace, seed: int) -> list[Evaluation]:
    """Train one reader from `seed`; its held-out evaluations along the way (progress on stderr)."""
    hidden_size = text_config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    train = plant_questions(arguments.train_questions, hidden_size, generator)
    test = plant_questions(arguments.test_questions, hidden_size, torch.Generator().manual_seed(TEST_SEED))
    # As many questions of two points, drawn after the others so that the mixed ones do not depend on the option.
    two_points = (
        plant_questions(len(train), hidden_size, generator, num_points=2) if arguments.two_point_steps else None
    )
    reader = PlantedReader(text_config, arguments.depth_block, seed)
    optimiser = torch.optim.AdamW(reader.parameters(), arguments.learning_rate, weight_decay=WEIGHT_DECAY)
    evaluations = [Evaluation(0, float("nan"), *evaluate(reader, test))]
    step = 0
    while step < arguments.steps:
        for questions in torch.randperm(len(train), generator=generator).split(arguments.batch_size):
            batch = (two_points if step < arguments.two_point_steps else train)[questions]
            loss = nn.functional.cross_entropy(reader(batch), batch.answers)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            if step % arguments.eval_every == 0 or step == arguments.steps:
                own, other = evaluate(reader, test)
                evaluations.append(Evaluation(step, loss.item(), own, other))
                print(
                    f"seed {seed}: step {step}, own image {own:.3f}, another {other:.3f}", file=sys.stderr, flush=True
                )
            if step == arguments.steps:
                break
    return evaluations


def text_configuration(folder: str):
    """The text model configuration of the checkpoint saved in `folder`."""
    config = json.loads((Path(folder) / "config.json").read_text())
    text = config.get("text_config")
    if not isinstance(text, dict) or "model_type" not in text:
        raise ValueError(f"{folder}/config.json has no text_config with a model_type; is it a Perceptio checkpoint?")
    return AutoConfig.for_model(**text)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    text_config = text_configuration(arguments.model)
    runs = [train_reader(text_config, arguments, seed) for seed in arguments.seeds]
    block = "with" if arguments.depth_block else "without"
    print(
        f"{arguments.test_questions} held-out planted questions, {block} a depth block{two_point_start(arguments)}; "
        f"{text_config.num_hidden_layers} layers of width {text_config.hidden_size} from random weights"
    )
    print("| seed | step | passes | training loss | own image | another image |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed, evaluations in zip(arguments.seeds, runs):
        print("\n".join(evaluation_rows(seed, evaluations, arguments)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
