"""bench/marker_probe.py: linear probes on the vision tower's tokens around relative-depth markers."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import bench_script

from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.embedded_checkpoint import embedded_checkpoint_path


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("marker_probe")


def test_prints_each_checkpoints_probes_and_the_ratio_to_the_base(bench, capsys):
    folder = str(embedded_checkpoint_path())
    assert bench.main(["--models", folder, folder, "--questions", "8", "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith(f"| {folder} |")]
    assert len(rows) == 2 and rows[0] == rows[1], "the same checkpoint scores the same"
    letter, _, closest = (float(cell) for cell in rows[0].strip("|").split("|")[1:])
    assert 0.0 <= letter <= 1.0 and 0.0 <= closest <= 1.0
    assert re.search(r"/ base, closest point: (1\.00|nan)", printed)


def test_the_probes_find_a_planted_signal_and_the_closest_point_from_depth(bench):
    generator = torch.Generator().manual_seed(0)
    questions = torch.arange(40).repeat_interleave(3)
    letters = torch.arange(3).repeat(40)
    log_depths = torch.rand(120, generator=generator)
    features = torch.randn(120, 6, generator=generator)
    features[:, 0] = log_depths * 10
    features[:, 1:4] = torch.nn.functional.one_hot(letters, 3).float() * 5
    scores = bench.score_probes(bench.MarkedPoints(features, letters, log_depths, questions), 40, steps=300)
    assert scores.letter_accuracy == 1.0
    assert scores.depth_r2 > 0.9 and scores.closest_point_accuracy == 1.0


@pytest.mark.parametrize(
    "arguments, message",
    [(["--questions", "4"], "--questions"), (["--steps", "0"], "--steps")],
)
def test_bad_arguments_are_refused_with_what_was_wrong(bench, arguments, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--models", str(embedded_checkpoint_path()), *arguments])
    assert message in capsys.readouterr().err


def test_a_folder_that_is_not_a_checkpoint_is_refused(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--models", str(tmp_path)])
    assert "not a saved checkpoint" in capsys.readouterr().err


def test_probes_the_image_tokens_the_language_model_reads(bench, capsys):
    folder = str(embedded_checkpoint_path())
    assert bench.main(["--models", folder, "--questions", "8", "--steps", "3", "--tokens", "image"]) == 0
    assert "image tokens" in capsys.readouterr().out
    model, processor = load_perceptio_checkpoint(folder)
    rows = bench.render_questions(2)
    tokens = bench.checkpoint_tokens(model, processor, rows, "image")
    assert tokens.shape == (2, processor.image_seq_length, model.config.text_config.hidden_size)
    # One image token per 16-pixel cell of the 128-pixel image (8-pixel patches, merged two by two).
    assert bench.token_cell(model, "image") == 2 * bench.token_cell(model, "tower") == 16
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--models", folder, "--tokens", "projector"])
