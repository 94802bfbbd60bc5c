"""bench/position_probes.py: how much of where its cell is each image token says, with and without the recipe's
position probes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import bench_script

from perceptio.embedded_checkpoint import embedded_checkpoint_path


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("position_probes")


def test_the_readout_names_a_class_the_tokens_carry_and_not_one_they_do_not(bench):
    generator = torch.Generator().manual_seed(0)
    cells = torch.arange(16)
    column = cells % 4
    embeddings = torch.randn(4, 8, generator=generator)
    carrying = embeddings[column].expand(6, -1, -1) + 0.01 * torch.randn(6, 16, 8, generator=generator)
    blind = torch.randn(6, 16, 8, generator=generator)
    assert bench.linear_readout_accuracy(carrying, column, 4) == 1.0
    assert bench.linear_readout_accuracy(blind, column, 4) < 0.6
    with pytest.raises(ValueError, match="two images"):
        bench.linear_readout_accuracy(carrying[:1], column, 4)


def test_the_position_probes_arm_reads_rows_and_columns_on_the_embedded_tower(bench, capsys):
    assert bench.main(["--model", str(embedded_checkpoint_path()), "--probe-scenes", "48", "--probe-steps", "60"]) == 0
    without, with_positions = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert not without["projector_position_probes"] and with_positions["projector_position_probes"]
    assert without["tower_probe_accuracy"] is None, "a checkpoint's tower was pretrained elsewhere"
    assert without["probe_accuracy"]["row"] is None and with_positions["probe_accuracy"]["column"] is not None
    assert with_positions["token_row_readout"] > without["token_row_readout"] + 0.2


def test_pretrained_towers_differ_only_by_the_position_target(bench, capsys):
    settings = ["--vision-pretraining-scenes", "16", "--vision-pretraining-steps", "4"]
    assert bench.main(["--pretrain-towers", *settings, "--probe-scenes", "16", "--probe-steps", "4"]) == 0
    arms = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(arm["tower"], arm["projector_position_probes"]) for arm in arms] == [
        ("recipe tower", False),
        ("recipe tower", True),
        ("recipe tower, position target", False),
        ("recipe tower, position target", True),
    ]
    plain, positioned = arms[0]["tower_probe_accuracy"], arms[2]["tower_probe_accuracy"]
    assert plain["column"] is None and 0.0 <= positioned["column"] <= 1.0 and 0.0 <= positioned["row"] <= 1.0


def test_bad_settings_are_usage_errors(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--model", "x", "--probe-steps", "0"])
    assert "--probe-steps must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--probe-steps", "3"])
    assert "one of the arguments --model --pretrain-towers is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--pretrain-towers", "--vision-pretraining-steps", "0"])
    assert "--vision-pretraining-steps must be positive" in capsys.readouterr().err
    assert bench.main(["--model", "/nonexistent/checkpoint"]) == 2
