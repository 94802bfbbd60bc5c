"""bench/grounding_pretraining_arms.py: the recipe's SAM2 grounding stage alone, per recipe variant."""

from __future__ import annotations

import json

import pytest
from conftest import bench_script


SHORT = ["grounding_scenes=6", "grounding_steps=2", "batch_size=2"]


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("grounding_pretraining_arms")


def test_prints_held_out_and_training_gates_per_arm(bench, capsys, tmp_path):
    output = tmp_path / "arms.json"
    arguments = ["--arm", "short", *SHORT, "--arm", "wide", *SHORT, "sam2_hidden_size=64", "--output", str(output)]
    assert bench.main(arguments) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| short |", "| wide |"))]
    assert len(rows) == 2 and rows[0].endswith("| 1.000 |"), "the first arm is the base of the ratio"
    runs = json.loads(output.read_text(encoding="utf-8"))
    assert [run["arm"] for run in runs] == ["short", "wide"]
    assert runs[1]["overrides"]["sam2_hidden_size"] == 64 and runs[1]["sam2_parameters"] > runs[0]["sam2_parameters"]
    for run in runs:
        for gate in (run["held_out"], run["training"]):
            assert 0.0 <= gate["prompt_iou"] <= 1.0 and 0.0 <= gate["two_object_overlap"] <= 1.0


@pytest.mark.parametrize(
    "arguments",
    [
        [],
        ["--arm", "bad", "no_such_field=1"],
        ["--arm", "bad", "grounding_steps=0"],
        ["--arm", "bad", "grounding_schedule=cosine"],
        ["--arm", "same", "--arm", "same"],
        ["--arm", "grounding_scenes=12000"],
    ],
)
def test_refuses_what_it_cannot_run(bench, arguments):
    with pytest.raises(SystemExit) as raised:
        bench.main(arguments)
    assert raised.value.code == 2
