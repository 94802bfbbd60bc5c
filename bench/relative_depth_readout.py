"""Whether a checkpoint's image tokens answer relative-depth questions when nothing says where the points are: an
attention readout trained on them alone.

`bench/marker_probe.py` probes the tokens at each marked point, so it is told where the points are. The language model
is not: to answer, it must find the marked tokens among all of an image's tokens and pick the closest. This script
trains the smallest model that has to do the same, one attention layer over the image tokens the language model
reads (`--heads` learned queries, keys from each token plus a learned position, values scored as the five letters,
the letters beyond the question's point count masked out), on `--train-questions` relative-depth questions of each
size given (its data-size curve), and scores it on `--test-questions` others, with each question's own image and with
another test question's image. A readout that beats the other image's score finds and compares the points from the
tokens alone, with that many questions; where it does not, the language model cannot be expected to either.

Each `--models` folder is a saved Perceptio checkpoint; the first is the base, and the others' figures are printed as
a ratio of its.

    python bench/relative_depth_readout.py --models perceptio/assets/perceptio-tiny-synthetic runs/marked/model
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import torch
from marker_probe import checkpoint_tokens, refuse_non_checkpoints, refuse_non_positive, render_questions
from torch import nn

from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.data.synthetic_tasks import POINT_LETTERS


READOUT_WIDTH = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-2
BATCH_SIZE = 128


@dataclass
class Questions:
    """Image tokens (questions, tokens, hidden), the answer's letter index and the question's point count."""

    tokens: torch.Tensor
    answers: torch.Tensor
    num_points: torch.Tensor

    def __getitem__(self, index) -> Questions:
        return Questions(self.tokens[index], self.answers[index], self.num_points[index])

    def __len__(self) -> int:
        return len(self.answers)


@dataclass
class ReadoutScores:
    """Held-out accuracy with each question's own image and with another's, overall and per point count."""

    own: float
    other: float
    own_by_points: dict[int, float]


class AttentionReadout(nn.Module):
    """One attention layer from learned queries over the image tokens; its output scores the letters."""

    def __init__(self, hidden_size: int, num_tokens: int, heads: int):
        super().__init__()
        self.keys = nn.Linear(hidden_size, heads * READOUT_WIDTH)
        self.positions = nn.Parameter(torch.zeros(num_tokens, heads * READOUT_WIDTH))
        self.queries = nn.Parameter(torch.randn(heads, READOUT_WIDTH) / math.sqrt(READOUT_WIDTH))
        self.values = nn.Linear(hidden_size, heads * READOUT_WIDTH)
        self.letters = nn.Linear(heads * READOUT_WIDTH, len(POINT_LETTERS))
        self.heads = heads

    def forward(self, tokens: torch.Tensor, num_points: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, _ = tokens.shape
        keys = (self.keys(tokens) + self.positions).view(batch, num_tokens, self.heads, READOUT_WIDTH)
        values = self.values(tokens).view(batch, num_tokens, self.heads, READOUT_WIDTH)
        weights = torch.einsum("bthw,hw->bht", keys, self.queries).softmax(-1)
        read = torch.einsum("bht,bthw->bhw", weights, values).reshape(batch, -1)
        logits = self.letters(read)
        unused = torch.arange(len(POINT_LETTERS)) >= num_points[:, None]
        return logits.masked_fill(unused, float("-inf"))


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="checkpoint folders; the first is the base")
    parser.add_argument(
        "--train-questions",
        type=int,
        nargs="+",
        default=[500, 2000, 5500],
        help="training-set sizes of the data-size curve (each a prefix of the largest)",
    )
    parser.add_argument("--test-questions", type=int, default=500, help="held-out questions")
    parser.add_argument("--epochs", type=int, default=30, help="passes over each training set")
    parser.add_argument("--heads", type=int, default=4, help="the readout's learned queries")
    parser.add_argument("--seed", type=int, default=0, help="the readout's initialisation and batch order")
    arguments = parser.parse_args(argv)
    if min(arguments.train_questions) < 1:
        parser.error(f"--train-questions must be positive integers, got {arguments.train_questions}.")
    refuse_non_positive(parser, arguments, ["epochs", "heads"])
    if arguments.test_questions < 2:
        parser.error("--test-questions must be at least 2 (each is also asked with another's image).")
    refuse_non_checkpoints(parser, arguments.models)
    return arguments


def question_labels(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each question's answer as a letter index, and its point count."""
    metas = [json.loads(row["meta"]) for row in rows]
    answers = torch.tensor([POINT_LETTERS.index(meta["answer_letter"]) for meta in metas])
    return answers, torch.tensor([meta["num_points"] for meta in metas])


def standardised(tokens: torch.Tensor, test_count: int) -> torch.Tensor:
    """(questions, tokens, hidden) scaled per channel by the statistics of the questions after the first `test_count`,
    the ones a readout trains on."""
    training = tokens[test_count:]
    return (tokens - training.mean((0, 1))) / (training.std((0, 1)) + 1e-6)


def train_readout(train: Questions, epochs: int, heads: int, seed: int) -> AttentionReadout:
    torch.manual_seed(seed)
    readout = AttentionReadout(train.tokens.shape[-1], train.tokens.shape[1], heads)
    optimiser = torch.optim.AdamW(readout.parameters(), LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    for _ in range(epochs):
        for batch in torch.randperm(len(train)).split(BATCH_SIZE):
            optimiser.zero_grad()
            selected = train[batch]
            loss = nn.functional.cross_entropy(readout(selected.tokens, selected.num_points), selected.answers)
            loss.backward()
            optimiser.step()
    return readout


def score_readout(readout: AttentionReadout, test: Questions) -> ReadoutScores:
    """Accuracy on `test`, and with each question's tokens replaced by the next question's (its own letters kept)."""
    with torch.no_grad():
        own = readout(test.tokens, test.num_points).argmax(-1) == test.answers
        other = readout(test.tokens.roll(1, 0), test.num_points).argmax(-1) == test.answers
    by_points = {int(count): own[test.num_points == count].float().mean().item() for count in test.num_points.unique()}
    return ReadoutScores(own.float().mean().item(), other.float().mean().item(), by_points)


def readout_curve(folder: str, rows: list[dict], arguments: argparse.Namespace) -> dict[int, ReadoutScores]:
    """The readout's held-out scores on `folder`'s image tokens for each training-set size."""
    model, processor = load_perceptio_checkpoint(folder)
    model.eval()
    tokens = standardised(checkpoint_tokens(model, processor, rows, "image"), arguments.test_questions)
    answers, num_points = question_labels(rows)
    questions = Questions(tokens, answers, num_points)
    test, pool = questions[: arguments.test_questions], questions[arguments.test_questions :]
    return {
        size: score_readout(train_readout(pool[:size], arguments.epochs, arguments.heads, arguments.seed), test)
        for size in sorted(arguments.train_questions)
    }


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    rows = render_questions(arguments.test_questions + max(arguments.train_questions))
    curves = [readout_curve(folder, rows, arguments) for folder in arguments.models]
    point_counts = sorted(next(iter(curves[0].values())).own_by_points)
    print(f"{arguments.test_questions} held-out relative-depth questions; own image / another image")
    print(f"| checkpoint | training questions | own | other | {' | '.join(f'{n} pts' for n in point_counts)} |")
    print(f"| --- | --- | --- | --- | {' | '.join('---' for _ in point_counts)} |")
    for folder, curve in zip(arguments.models, curves):
        for size, scores in curve.items():
            by_points = " | ".join(f"{scores.own_by_points.get(n, float('nan')):.3f}" for n in point_counts)
            print(f"| {folder} | {size} | {scores.own:.3f} | {scores.other:.3f} | {by_points} |")
    largest = max(arguments.train_questions)
    base = curves[0][largest].own
    for folder, curve in zip(arguments.models[1:], curves[1:]):
        ratio = curve[largest].own / base if base else float("nan")
        print(f"{folder} / base, own image at {largest} training questions: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
