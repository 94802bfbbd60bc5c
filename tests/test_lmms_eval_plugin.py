"""The lmms-eval adapter driven with lmms-eval's own `Instance` requests and registry (tiny exported model)."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch
from PIL import Image


lmms_eval = pytest.importorskip("lmms_eval")
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models.registry_v2 import ModelRegistryV2  # noqa: E402

from perceptio.evaluation.lmms_eval_plugin.perceptio_lmms import PerceptioLmms, truncate_at_stop_strings  # noqa: E402
from perceptio.tiny_models import build_tiny_perceptio  # noqa: E402


ENTRY_POINT = importlib.metadata.EntryPoint(
    name="perceptio", value="perceptio.evaluation.lmms_eval_plugin:perceptio_model_manifest", group="lmms_eval.models"
)
DOCS = [
    {
        "question": "Is there a red cube? Answer yes or no.",
        "image": Image.fromarray(np.full((40, 48, 3), 200, np.uint8)),
    },
    {"question": "How many spheres are there?", "image": Image.fromarray(np.zeros((32, 32, 3), np.uint8))},
    {"question": "Which colour is the ball?", "image": Image.fromarray(np.full((24, 56, 3), 90, np.uint8))},
]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_perceptio")
    model, processor = build_tiny_perceptio(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    lm = PerceptioLmms.create_from_arg_string(f"pretrained={folder},device=cpu,batch_size=2,max_new_tokens=6")
    lm.task_dict = {"mme": {"test": DOCS}}
    return lm


def _request(request_type: str, doc_id: int, second_argument) -> Instance:
    return Instance(
        request_type=request_type,
        arguments=(DOCS[doc_id]["question"], second_argument, lambda doc: [doc["image"]], doc_id, "mme", "test"),
        idx=0,
        metadata={"task": "mme", "doc_id": doc_id, "repeats": 1},
    )


def test_entry_point_registers_the_adapter():
    registry = ModelRegistryV2()
    registry._select_entry_points = lambda group: [ENTRY_POINT] if group == "lmms_eval.models" else []
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("perceptio") is PerceptioLmms


def test_generate_until_matches_predict_in_request_order(adapter):
    requests = [_request("generate_until", doc_id, {"max_new_tokens": 5, "until": ["\n\n"]}) for doc_id in range(3)]
    answers = adapter.generate_until(requests)
    expected = [
        adapter.model.predict(
            doc["image"], doc["question"], processor=adapter.processor, max_new_tokens=5, do_sample=False
        )[0].text
        for doc in DOCS
    ]
    assert answers == [truncate_at_stop_strings(text, ["\n\n"]) for text in expected]


def test_text_only_requests_are_answered_even_when_the_model_wants_to_segment(adapter, monkeypatch):
    config = adapter.model.config
    seg, start = config.seg_token_id, config.depth_start_token_id
    monkeypatch.setattr(
        adapter.model.generation_config, "sequence_bias", [[[seg], 100.0], [[seg, seg], -200.0], [[start], 50.0]]
    )
    requests = [
        Instance(
            request_type="generate_until",
            arguments=(
                DOCS[doc_id]["question"],
                {"max_new_tokens": 5, "until": ["\n\n"]},
                None,
                doc_id,
                "mme",
                "test",
            ),
            idx=0,
            metadata={"task": "mme", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id in range(3)
    ]
    answers = adapter.generate_until(requests)
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)


def test_loglikelihood_is_a_log_probability_and_flags_the_greedy_continuation(adapter):
    tokenizer = adapter.processor.tokenizer
    inputs = adapter.processor(images=[DOCS[0]["image"]], text=[adapter.processor.format_prompt(DOCS[0]["question"])])
    with torch.no_grad():
        logits = adapter.model(**{k: v for k, v in inputs.items() if k != "sam_pixel_values"}).logits[0, -1]
    ranked = [
        token
        for token in logits.argsort(descending=True).tolist()
        if tokenizer(tokenizer.decode([token]), add_special_tokens=False)["input_ids"] == [token]
    ]
    greedy_text, other_text = tokenizer.decode([ranked[0]]), tokenizer.decode([ranked[-1]])
    results = adapter.loglikelihood(
        [_request("loglikelihood", 0, greedy_text), _request("loglikelihood", 0, other_text)]
    )
    (greedy_logprob, greedy_flag), (other_logprob, other_flag) = results
    expected = torch.log_softmax(logits.float(), -1)
    assert greedy_flag is (ranked[0] == int(logits.argmax())) and other_flag is False
    assert greedy_logprob == pytest.approx(float(expected[ranked[0]]), abs=1e-4)
    assert other_logprob == pytest.approx(float(expected[ranked[-1]]), abs=1e-4)
    assert other_logprob < greedy_logprob <= 0


def test_bad_model_args_are_rejected(adapter, tmp_path):
    with pytest.raises(ValueError, match="Unknown model_args"):
        PerceptioLmms(pretrained=str(tmp_path), colour="red")
    with pytest.raises(ValueError, match="not a Perceptio checkpoint folder"):
        PerceptioLmms(pretrained=str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        PerceptioLmms(pretrained=str(tmp_path), batch_size="0")
