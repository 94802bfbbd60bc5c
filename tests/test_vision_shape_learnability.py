"""bench/vision_shape_learnability.py: the recipe's vision tower against a CNN on one object's shape."""

from __future__ import annotations

import argparse
import re

import pytest
from conftest import bench_script

from perceptio.trainers.synthetic_recipe import build_recipe_processor
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("vision_shape_learnability")


def test_prints_both_classifiers_beside_the_majority_shape(bench, capsys):
    bench.main(["--scenes", "6", "--test-scenes", "4", "--steps", "2", "--threads", "1"])
    printed = capsys.readouterr().out
    for name in ("vision tower", "CNN", "majority"):
        line = next(line for line in printed.splitlines() if line.startswith(name))
        accuracy = float(re.search(r"\d\.\d{3}", line[len(name) :]).group())
        assert 0.0 <= accuracy <= 1.0
    assert "vision tower / CNN:" in printed


def test_training_fits_the_training_scenes(bench):
    recipe = SyntheticTinyRecipe()
    scenes = bench.render_one_object_scenes(
        12, bench.TRAIN_SEED_OFFSET, build_recipe_processor(recipe).image_processor, 64
    )
    arguments = argparse.Namespace(steps=80, batch_size=12, learning_rate=3e-3, seed=0)
    assert bench.train_and_score(bench.ConvShapeClassifier(), scenes, scenes, arguments, "CNN") == 1.0


@pytest.mark.parametrize("flag", ["--scenes", "--test-scenes", "--steps", "--batch-size", "--threads"])
def test_rejects_non_positive_counts(bench, flag, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments([flag, "0"])
    assert f"{flag} must be a positive integer" in capsys.readouterr().err
