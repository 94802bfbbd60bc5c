"""Generation from an exported folder loaded with trust_remote_code where `perceptio` cannot be imported:
`model.predict` and `pipeline("perceptio-spatial", ...)` give the in-process results."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from perceptio.hub_cards.export_perceptio import export_pretrained
from perceptio.modeling_perceptio.pipeline_perceptio import PIPELINE_TASK, custom_pipelines_config

ISOLATED_SCRIPT = '''
import sys


class BlockPerceptio:
    def find_spec(self, name, path=None, target=None):
        if name == "perceptio" or name.startswith("perceptio."):
            raise ImportError(name + " is blocked")
        return None


sys.meta_path.insert(0, BlockPerceptio())
import torch
from transformers import AutoModel, AutoProcessor, pipeline

torch.set_num_threads(1)
folder, inputs_path, outputs_path, task = sys.argv[1:5]
try:
    import perceptio
    raise SystemExit("perceptio was importable")
except ImportError:
    pass
request = torch.load(inputs_path, weights_only=False)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
(predicted,) = model.predict([request["image"]], [request["prompt"]], processor=processor, max_new_tokens=22)
pipe = pipeline(task, model=folder, trust_remote_code=True)
piped = pipe(request["image"], prompt=request["prompt"], max_new_tokens=22)
torch.save({"predict": vars(predicted), "pipeline": vars(piped), "pipeline_class": type(pipe).__name__}, outputs_path)
'''


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_exported_folder_predicts_and_pipelines_without_the_package(tiny_pair, rgb_image, tmp_path):
    model, processor = copy.deepcopy(tiny_pair[0]), tiny_pair[1]
    config = model.config
    seg, start = config.seg_token_id, config.depth_start_token_id
    # Bias generation to one [SEG] then a depth block, so masks and depth cross the export boundary too.
    model.generation_config.sequence_bias = [[[seg], 100.0], [[seg, seg], -200.0], [[start], 50.0]]
    folder = export_pretrained(model, processor, tmp_path / "export")
    config_path = folder / "config.json"
    exported = json.loads(config_path.read_text())
    exported["custom_pipelines"] = {**exported.get("custom_pipelines", {}), **custom_pipelines_config()}
    config_path.write_text(json.dumps(exported, indent=2))
    prompt = "Segment the cube."
    torch.save({"image": rgb_image, "prompt": prompt}, tmp_path / "inputs.pt")
    (tmp_path / "isolated.py").write_text(ISOLATED_SCRIPT)
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(tmp_path / "isolated.py"), str(folder), str(tmp_path / "inputs.pt"),
         str(tmp_path / "outputs.pt"), PIPELINE_TASK],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = torch.load(tmp_path / "outputs.pt", weights_only=False)
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
