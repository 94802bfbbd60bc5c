"""bench/relative_depth_readout.py: an attention readout over a checkpoint's image tokens answers relative depth."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import bench_script

from perceptio.embedded_checkpoint import embedded_checkpoint_path


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("relative_depth_readout")


def planted_questions(bench, count: int, seed: int):
    """Questions whose tokens hold, at each marked point's token, its letter and its depth; the rest are noise."""
    generator = torch.Generator().manual_seed(seed)
    num_tokens, hidden = 16, 12
    tokens = torch.randn(count, num_tokens, hidden, generator=generator) * 0.1
    num_points = torch.randint(2, 4, (count,), generator=generator)
    answers = torch.empty(count, dtype=torch.long)
    for question in range(count):
        places = torch.randperm(num_tokens, generator=generator)[: num_points[question]]
        depths = torch.rand(int(num_points[question]), generator=generator)
        for letter, (place, depth) in enumerate(zip(places, depths)):
            tokens[question, place, letter] = 3.0  # the letter
            tokens[question, place, 8] = 3.0  # marked
            tokens[question, place, 9] = 3.0 * depth
        answers[question] = int(depths.argmin())
    return bench.Questions(tokens, answers, num_points)


def test_the_readout_finds_the_closest_marked_point_without_being_told_where(bench):
    train, test = planted_questions(bench, 1500, seed=0), planted_questions(bench, 300, seed=1)
    scores = bench.score_readout(bench.train_readout(train, epochs=40, heads=2, seed=0), test)
    assert scores.own > 0.8, "the letter of the closest marked token is one attention step away"
    assert scores.other < 0.6, "another question's tokens do not hold this question's answer"
    assert set(scores.own_by_points) == {2, 3}


def test_prints_each_checkpoints_curve_and_the_ratio_to_the_base(bench, capsys):
    folder = str(embedded_checkpoint_path())
    arguments = ["--models", folder, folder, "--train-questions", "4", "6", "--test-questions", "4", "--epochs", "1"]
    assert bench.main(arguments) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith(f"| {folder} |")]
    assert len(rows) == 4 and rows[:2] == rows[2:], "the same checkpoint scores the same"
    assert [row.split("|")[2].strip() for row in rows[:2]] == ["4", "6"]
    assert re.search(r"/ base, own image at 6 training questions: (1\.00|nan)", printed)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--train-questions", "0"], "--train-questions"),
        (["--test-questions", "1"], "--test-questions"),
        (["--epochs", "0"], "--epochs"),
        (["--heads", "0"], "--heads"),
    ],
)
def test_bad_arguments_are_refused_with_what_was_wrong(bench, arguments, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--models", str(embedded_checkpoint_path()), *arguments])
    assert message in capsys.readouterr().err


def test_a_folder_without_a_checkpoint_is_refused(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--models", str(tmp_path)])
    assert "not a saved checkpoint" in capsys.readouterr().err
