"""bench/referring_landings.py: where referring masks land, per kind of expression, against chance among candidates."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import bench_script
from datasets import DatasetDict

from perceptio.data.synthetic_dataset import build_synthetic_dataset
from perceptio.embedded_checkpoint import embedded_checkpoint_path


@pytest.fixture(scope="module")
def landings():
    yield from bench_script("referring_landings")


def square(top: int, left: int, side: int = 4, size: int = 16) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


# Three objects: a red cube (the referred one), a blue cube and a red sphere.
SCENE = SimpleNamespace(
    instance_masks=np.stack([square(0, 0), square(0, 8), square(8, 0)]),
    objects=[
        SimpleNamespace(colour="red", shape="cube", size="small"),
        SimpleNamespace(colour="blue", shape="cube", size="small"),
        SimpleNamespace(colour="red", shape="sphere", size="small"),
    ],
)
THE_CUBE = [{"colour": None, "shape": "cube", "size": None}]


def test_a_mask_lands_on_the_referred_object_a_candidate_another_object_or_none(landings):
    assert landings.landing(square(0, 0), [0], THE_CUBE, SCENE, 0.5) == "target"
    assert landings.landing(square(0, 8), [0], THE_CUBE, SCENE, 0.5) == "candidate", "a cube, as the phrase names"
    assert landings.landing(square(8, 0), [0], THE_CUBE, SCENE, 0.5) == "other_object"
    assert landings.landing(square(12, 12), [0], THE_CUBE, SCENE, 0.5) == "no_object"
    assert landings.landing(np.zeros((16, 16), bool), [0], THE_CUBE, SCENE, 0.5) == "no_object"
    two = THE_CUBE + [{"colour": "red", "shape": "sphere", "size": None}]
    assert landings.landing(square(0, 8), [0, 2], two, SCENE, 0.5) == "other_object", "no candidates for two objects"
    assert landings.candidate_count(THE_CUBE, SCENE) == 2 and landings.candidate_count(two, SCENE) is None


def test_the_summary_sets_landings_on_candidates_against_chance(landings):
    records = [
        {"kind": "superlative", "landing": "target", "candidates": 2},
        {"kind": "superlative", "landing": "candidate", "candidates": 4},
        {"kind": "superlative", "landing": "no_object", "candidates": 2},
        {"kind": "plural", "landing": "target", "candidates": None},
    ]
    summary = landings.summarise(records)
    superlative = summary["superlative"]
    assert superlative["rows"] == 3 and superlative["target"] == superlative["no_object"] == pytest.approx(1 / 3)
    assert superlative["on_a_candidate"] == 2 and superlative["referred_of_candidates"] == 0.5
    assert superlative["random_candidate"] == pytest.approx((1 / 2 + 1 / 4) / 2), "over the rows on a candidate"
    assert summary["plural"]["referred_of_candidates"] is None and summary["plural"]["target"] == 1.0
    assert "| superlative | 3 | 0.33 | 0.33 | 0.00 | 0.33 | 0.50 | 0.38 |" in landings.format_table(summary)


@pytest.fixture(scope="module")
def referring_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("referring")
    data = build_synthetic_dataset(
        0, 0, 6, image_size=128, seed=3, tasks={"referring": 1.0}, cache_dir=str(folder / "cache")
    )
    data = DatasetDict({"test": data["test"]})
    data.save_to_disk(str(folder / "data"))
    return folder / "data", data


def test_the_embedded_checkpoints_masks_are_placed_row_by_row(landings, referring_rows, tmp_path, capsys):
    folder, data = referring_rows
    output = tmp_path / "landings.json"
    arguments = ["--model", str(embedded_checkpoint_path()), "--data", str(folder), "--output", str(output)]
    assert landings.main(arguments) == 0
    saved = json.loads(output.read_text())
    kinds = [json.loads(meta)["kind"] for meta in data["test"]["meta"]]
    assert sorted(record["kind"] for record in saved["records"]) == sorted(kinds)
    assert all(record["landing"] in landings.LANDINGS and 0 <= record["iou"] <= 1 for record in saved["records"])
    assert sum(figures["rows"] for figures in saved["summary"].values()) == 6
    assert "| kind | rows | on the referred object" in capsys.readouterr().out


def test_refuses_a_missing_split_and_a_row_its_seed_does_not_render(landings, referring_rows, tmp_path, capsys):
    folder, data = referring_rows
    model = ["--model", str(embedded_checkpoint_path())]
    assert landings.main([*model, "--data", str(folder), "--split", "train"]) == 2
    assert "has no split 'train'" in capsys.readouterr().err
    moved = data["test"].map(lambda row: {"scene_seed": row["scene_seed"] + 1})
    moved_folder = tmp_path / "moved"
    DatasetDict({"test": moved}).save_to_disk(str(moved_folder))
    assert landings.main([*model, "--data", str(moved_folder)]) == 2
    assert "row 0: scene_seed" in capsys.readouterr().err
