"""bench/vision_pretraining_scenes.py: the recipe's vision pretraining alone, per number of training scenes."""

from __future__ import annotations

import json

import pytest
from conftest import bench_script


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("vision_pretraining_scenes")


def test_prints_held_out_and_training_scene_probes_per_scene_count(bench, capsys, tmp_path):
    output = tmp_path / "runs.json"
    arguments = ["--scenes", "4", "8", "--steps", "2", "--vision-num-layers", "1", "--output", str(output)]
    assert bench.main(arguments) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 4 |", "| 8 |"))]
    assert len(rows) == 2 and rows[0].endswith("| 1.000 |"), "the first count is the base of the ratio"
    runs = json.loads(output.read_text(encoding="utf-8"))
    assert [run["scenes"] for run in runs] == [4, 8]
    for run in runs:
        for scores in (run["held_out"], run["training"]):
            assert all(0.0 <= scores[name] <= 1.0 for name in bench.SHOWN_PROBES)


@pytest.mark.parametrize("arguments", [["--scenes", "0"], ["--scenes", "4", "--steps", "0"], []])
def test_refuses_what_it_cannot_run(bench, arguments):
    with pytest.raises(SystemExit) as raised:
        bench.main(arguments)
    assert raised.value.code == 2
