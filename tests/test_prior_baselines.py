"""bench/prior_baselines.py: the image-blind floor of `perceptio eval synthetic`'s figures."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import bench_script

from perceptio.data.synthetic_dataset import build_synthetic_dataset


@pytest.fixture(scope="module")
def prior_baselines():
    yield from bench_script("prior_baselines")


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    built = build_synthetic_dataset(0, 24, 24, image_size=64, seed=0, cache_dir=str(folder / "cache"))
    datasets.DatasetDict({"validation": built["validation"], "test": built["test"]}).save_to_disk(str(folder / "data"))
    return folder / "data"


def test_prints_every_figure_with_the_models_beside_it(prior_baselines, saved_dataset, tmp_path, capsys):
    summary = {
        "referring": {"ciou": 0.5},
        "depth": {"abs_rel": 0.1, "delta1": 0.9, "pair_order_accuracy": 0.8},
        "relative_depth": {"by_num_points": {"3": {"accuracy": 0.25}}},
        "vqa": {"by_task": {"vqa_colour": {"accuracy": 0.75}}},
        "swapped_image": {
            "vqa_colour": {"accuracy_own": 0.75, "accuracy_swapped": 0.25},
            "relative_depth": {"accuracy_own": 0.5, "accuracy_swapped": 0.5},
            "vqa_count": {"accuracy_own": None, "accuracy_swapped": None},
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert prior_baselines.main(["--data", str(saved_dataset), "--summary", str(tmp_path / "summary.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = [[cell.strip(" |") for cell in line.split(" | ")] for line in lines[2:]]
    rows = {row[0]: row[1:] for row in cells}
    assert {"referring cIoU", "depth AbsRel", "depth pair-order"} <= set(rows)
    assert all(len(cells) == 4 for cells in rows.values())
    assert rows["referring cIoU"][2] == "0.500" and rows["referring cIoU"][3] == "-"
    assert 0.5 < float(rows["depth pair-order"][0]) <= 1, "a mean depth map orders ground-plane scenes well"
    assert rows["vqa_colour"][2:] == ["0.750", "0.750 / 0.250"]
    assert rows["relative_depth"] == ["-", "-", "-", "0.500 / 0.500"]
    assert "vqa_count" not in rows or rows["vqa_count"][3] == "-"


def test_lowest_marker_heuristic_reads_the_marker_positions(prior_baselines):
    meta = {"num_points": 2, "points": [[5, 40], [9, 12]], "letters": ["A", "B"], "answer_letter": "A"}
    other = {**meta, "answer_letter": "B"}
    rows = [
        {"task": "relative_depth", "meta": json.dumps(meta)},
        {"task": "relative_depth", "meta": json.dumps(other)},
    ]
    assert prior_baselines.lowest_marker_accuracy(rows) == {"relative_depth/2": 0.5}


def test_majority_answer_is_fitted_on_validation_only(prior_baselines):
    validation = [{"task": "vqa_colour", "answer": "Red"}, {"task": "vqa_colour", "answer": "red."}]
    test = [{"task": "vqa_colour", "answer": "Red"}, {"task": "vqa_colour", "answer": "Blue"}]
    assert prior_baselines.majority_answer_accuracy(validation, test) == {"vqa_colour": 0.5}


def test_a_dataset_without_a_validation_split_is_refused(prior_baselines, tmp_path):
    built = build_synthetic_dataset(0, 0, 2, image_size=48, seed=0, cache_dir=str(tmp_path / "cache"))
    datasets.DatasetDict({"test": built["test"]}).save_to_disk(str(tmp_path / "data"))
    with pytest.raises(SystemExit):
        prior_baselines.main(["--data", str(tmp_path / "data")])
