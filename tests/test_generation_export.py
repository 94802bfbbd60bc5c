"""Generation from an exported folder loaded with trust_remote_code where `perceptio` cannot be imported:
`model.predict` and `pipeline("perceptio-spatial", ...)` give the in-process results."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from test_export import run_isolated_script  # noqa: E402  (the shared isolated-interpreter runner)

from perceptio.hub_cards.export_perceptio import export_pretrained
from perceptio.models.perceptio.pipeline_perceptio import PIPELINE_TASK, custom_pipelines_config
from perceptio.tiny_models import build_tiny_perceptio


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_exported_folder_predicts_and_pipelines_without_the_package(tiny_pair, rgb_image, tmp_path):
    model, processor = copy.deepcopy(tiny_pair[0]), tiny_pair[1]
    config = model.config
    seg, start = config.seg_token_id, config.depth_start_token_id
    # Bias generation to one [SEG] then a depth block, so masks and depth cross the export boundary too.
    model.generation_config.sequence_bias = [[[seg], 100.0], [[seg, seg], -200.0], [[start], 50.0]]
    folder = export_pretrained(model, processor, tmp_path / "export")
    exported = json.loads((folder / "config.json").read_text())
    assert exported["custom_pipelines"] == custom_pipelines_config()
    prompt = "Segment the cube."
    request = {"image": rgb_image, "prompt": prompt}
    remote = run_isolated_script("isolated_hub_predict.py", folder, request, tmp_path, PIPELINE_TASK)
    assert remote["pipeline_class"] == "PerceptioSpatialPipeline"
    (local,) = model.predict([rgb_image], [prompt], processor=processor, max_new_tokens=22)
    assert len(local.masks) == 1 and local.depth is not None
    for result in (remote["predict"], remote["pipeline"]):
        assert result["token_ids"] == local.token_ids and result["text"] == local.text
        assert result["depth_codes"] == local.depth_codes
        assert all(np.array_equal(a, b) for a, b in zip(result["masks"], local.masks))
        assert len(result["masks"]) == len(local.masks)
        assert result["mask_scores"] == local.mask_scores
        assert np.array_equal(result["depth"], local.depth)


def test_an_exported_segmentation_only_folder_predicts_masks_without_the_package(rgb_image, tmp_path):
    # A segmentation-only checkpoint (as Sa2VA's convert to) has [SEG] and no depth tokens or depth tokenizer.
    model, processor = build_tiny_perceptio(seed=0, num_depth_codes=0)
    seg = model.config.seg_token_id
    model.generation_config.sequence_bias = [[[seg], 100.0], [[seg, seg], -200.0]]
    folder = export_pretrained(model, processor, tmp_path / "export")
    request = {"image": rgb_image, "prompt": "Segment the cube."}
    remote = run_isolated_script("isolated_hub_predict.py", folder, request, tmp_path, PIPELINE_TASK)
    (local,) = model.predict([rgb_image], [request["prompt"]], processor=processor, max_new_tokens=22)
    assert local.masks and local.depth is None and not local.depth_malformed
    for result in (remote["predict"], remote["pipeline"]):
        assert result["token_ids"] == local.token_ids and result["text"] == local.text
        assert result["depth"] is None and result["depth_codes"] is None
        assert len(result["masks"]) == len(local.masks)
        assert all(np.array_equal(a, b) for a, b in zip(result["masks"], local.masks))
