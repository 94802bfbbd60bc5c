"""Model cards: Hub metadata, model-index from evaluation summaries, and usage code that runs as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perceptio.hub_cards.export_perceptio import export_pretrained
from perceptio.hub_cards.model_card import (
    EVALUATION_TASKS,
    PerceptioCardData,
    build_model_card,
    load_evaluation_summaries,
    write_model_card,
)


# Prepended to the card's code: makes `perceptio` unimportable, so the code can only work through the Hub files.
BLOCK_PERCEPTIO = """
import sys
class BlockPerceptio:
    def find_spec(self, name, path=None, target=None):
        if name == "perceptio" or name.startswith("perceptio."):
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, BlockPerceptio())
"""
SUMMARIES = [
    {"task": "refcoco", "split": "val", "metrics": {"cIoU": 82.7, "gIoU": 80.1}},
    {"task": "hardblink", "metrics": {"accuracy_3": 75.8, "accuracy_mean": 71.0}},
]


@pytest.fixture(scope="module")
def exported(tiny_pair, tmp_path_factory):
    model, processor = tiny_pair
    return export_pretrained(model, processor, tmp_path_factory.mktemp("card") / "tiny")


def test_card_metadata_and_model_index(exported, tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps(SUMMARIES))
    data = PerceptioCardData(
        model_name="perceptio-tiny",
        base_models=["OpenGVLab/InternVL3-8B-hf"],
        datasets=["lmms-lab/RefCOCO"],
        tags=["tiny"],
        evaluation=load_evaluation_summaries(tmp_path / "eval.json"),
    ).with_build_sources(
        base="OpenGVLab/InternVL3-8B-hf", sam2="facebook/sam2.1-hiera-large", depth_tokenizer=str(tmp_path)
    )
    card = ModelCard.load(write_model_card(exported, data))
    metadata = card.data
    assert metadata.library_name == "transformers" and metadata.pipeline_tag == "image-text-to-text"
    assert metadata.base_model == ["OpenGVLab/InternVL3-8B-hf", "facebook/sam2.1-hiera-large"]
    assert metadata.license == "apache-2.0" and metadata.datasets == ["lmms-lab/RefCOCO"]
    assert {"perceptio", "tiny"} <= set(metadata.tags)
    results = {(result.dataset_name, result.metric_type): result.metric_value for result in metadata.eval_results}
    assert results == {
        ("RefCOCO", "cIoU"): 82.7,
        ("RefCOCO", "gIoU"): 80.1,
        ("HardBLINK", "accuracy_3"): 75.8,
        ("HardBLINK", "accuracy_mean"): 71.0,
    }
    assert "| RefCOCO | val | cIoU | 82.7 |" in card.text
    config = json.loads((exported / "config.json").read_text())
    assert f"`[SEG]` (id {config['seg_token_id']})" in card.text
    assert f"N = {config['num_depth_tokens']} codes" in card.text
    for section in ("## Usage", "## Token format", "## Training recipe", "## Limitations"):
        assert section in card.text


def test_usage_code_runs_as_written_without_the_package(exported):
    card_data = PerceptioCardData(model_name="tiny", model_id=str(exported), max_new_tokens=8)
    card_path = write_model_card(exported, card_data)
    code = re.search(r"```python\n(.*?)```", card_path.read_text(), re.DOTALL).group(1)
    environment = {**os.environ, "HF_MODULES_CACHE": str(exported.parent / "modules"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", BLOCK_PERCEPTIO + code],
        capture_output=True,
        text=True,
        env=environment,
        cwd=exported.parent,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip(), "the usage code printed no answer"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    task=st.sampled_from(sorted(EVALUATION_TASKS)),
    metrics=st.dictionaries(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False) | st.integers(-1000, 1000),
        min_size=1,
        max_size=5,
    ),
)
def test_every_valid_summary_round_trips_through_the_model_index(tiny_pair, task, metrics):
    card = build_model_card(tiny_pair[0].config, PerceptioCardData(evaluation=[{"task": task, "metrics": metrics}]))
    parsed = ModelCard(str(card)).data.eval_results
    assert {result.metric_type: result.metric_value for result in parsed} == metrics
    assert {result.dataset_name for result in parsed} == {EVALUATION_TASKS[task][2]}


@pytest.mark.parametrize(
    ("summary", "message"),
    [
        ({"task": "coco", "metrics": {"x": 1}}, "task must be one of"),
        ({"task": "refcoco", "metrics": {}}, "non-empty 'metrics'"),
        ({"task": "refcoco", "metrics": {"cIoU": "82"}}, "must be numbers"),
        ({"task": "refcoco", "metrics": {"cIoU": True}}, "must be numbers"),
        (["refcoco"], "must be a JSON object"),
    ],
)
def test_bad_evaluation_json_is_rejected(tmp_path, summary, message):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(summary if isinstance(summary, dict) else summary))
    with pytest.raises(ValueError, match=message):
        load_evaluation_summaries(path)


def test_bad_card_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_evaluation_summaries(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no config.json"):
        write_model_card(tmp_path, PerceptioCardData())
    with pytest.raises(ValueError, match="max_new_tokens"):
        PerceptioCardData(max_new_tokens=0)
