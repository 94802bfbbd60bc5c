"""The synthetic-tiny recipe: a few-step smoke run end to end, and what each ablation changes."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from perceptio import PerceptioForConditionalGeneration, PerceptioProcessor
from perceptio.trainers.synthetic_recipe import (
    ABLATIONS,
    DEPTH_LOSS_WEIGHT_FIELDS,
    SyntheticTinyRecipe,
    ablate,
    run_synthetic_tiny_recipe,
)

SMOKE = dict(num_train=24, num_validation=4, num_test=4, depth_tokenizer_steps=4, train_steps=2, batch_size=4,
             logging_steps=1)


def test_recipe_smoke_run_trains_saves_and_reloads(tmp_path):
    summary = run_synthetic_tiny_recipe(tmp_path, SyntheticTinyRecipe(**SMOKE))
    log = summary["training_log"]
    assert len(log) == 2 and all(entry["loss_mask"] >= 0 and entry["loss_token"] > 0 for entry in log)
    saved = json.loads((tmp_path / "recipe_summary.json").read_text())
    assert saved["recipe"]["train_steps"] == 2 and saved["ablation"] == "full"
    model = PerceptioForConditionalGeneration.from_pretrained(tmp_path / "model")
    processor = PerceptioProcessor.from_pretrained(tmp_path / "model")
    assert model.config.num_depth_tokens == 64 and processor.image_seq_length == 64
    assert (tmp_path / "dataset" / "test").is_dir()


def test_ablations_change_only_what_they_name():
    rows = Dataset.from_dict({"masks": [[1], []], "use_depth_block": [True, False], "prompt": ["a", "b"]})
    assert ablate(rows, "full").to_dict() == rows.to_dict()
    assert ablate(rows, "no-depth-tokens")["use_depth_block"] == [False, False]
    assert ablate(rows, "no-seg")["masks"] == [[], []]
    assert ablate(rows, "depth-lm-only").to_dict() == rows.to_dict()
    assert len(ABLATIONS) == 4 and len(DEPTH_LOSS_WEIGHT_FIELDS) == 4
    with pytest.raises(ValueError, match="ablation"):
        ablate(rows, "no-text")


def test_recipe_settings_are_validated():
    with pytest.raises(ValueError, match="train_steps"):
        SyntheticTinyRecipe(train_steps=0)
    with pytest.raises(ValueError, match="vision_patch_size"):
        SyntheticTinyRecipe(image_size=100)
