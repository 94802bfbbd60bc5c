"""End-to-end tests of the benchmark runners on tiny fixtures written in the real layouts, with the tiny model."""

from __future__ import annotations

import dataclasses
import json
import random
import statistics

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import LogitsProcessor

from perceptio.data.synthetic_dataset import build_synthetic_dataset, sample_spatial_targets
from perceptio.data.synthetic_tasks import DEFAULT_TASK_CONFIG
from perceptio.evaluation.depth_metrics import abs_rel, delta1, normalized_to_positive, pair_order_counts, rmse
from perceptio.evaluation.multiple_choice import multiple_choice_accuracy
from perceptio.evaluation.runners import RunSettings, run_blink_depth, run_hardblink, run_refcoco, run_synthetic
from perceptio.evaluation.runners.answer_scoring import answer_losses
from perceptio.evaluation.runners.coco_masks import segmentation_to_mask
from perceptio.evaluation.runners.dataset_inputs import load_split
from perceptio.evaluation.runners.synthetic import (
    ANSWER_TASKS,
    answer_sample,
    normalised_answer,
    normalised_inverse_depth,
    paired_ciou_control,
    paired_image_control,
    swapped_expression_pairs,
    swapped_image_pairs,
    synthetic_summary,
)
from perceptio.evaluation.segmentation_metrics import ciou, giou, mask_intersection_union
from perceptio.tiny_models import build_tiny_perceptio
from perceptio.trainers.collator_perceptio import PerceptioDataCollator


pycocotools = pytest.importorskip("pycocotools")


class ScriptedAnswer(LogitsProcessor):
    """Forces every generated sequence to be `script` (then EOS), so the tiny random model writes [SEG]s/depth."""

    def __init__(self, script: list[int]):
        self.script = script
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None or input_ids.shape[1] <= self.prompt_length:
            self.prompt_length = input_ids.shape[1]
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[min(step, len(self.script) - 1)]] = 0
        return forced


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_perceptio(seed=0)
    return model.eval(), processor


def _script(processor, model, seg: bool = False, depth: bool = False, text: str = "(A)") -> list[int]:
    config = model.config
    ids = [config.seg_token_id] if seg else []
    if depth:
        codes = [
            config.depth_code_token_offset + (index % config.num_depth_codes)
            for index in range(config.num_depth_tokens)
        ]
        ids += [config.depth_start_token_id, *codes, config.depth_end_token_id]
    ids += processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [processor.tokenizer.eos_token_id]


def _settings(tmp_path, model, processor, script, **overrides) -> RunSettings:
    return RunSettings(
        output_dir=tmp_path / "out",
        batch_size=overrides.pop("batch_size", 4),
        max_new_tokens=len(script) + 1,
        show_progress=False,
        generate_kwargs={"logits_processor": [ScriptedAnswer(script)]},
        **overrides,
    )


@pytest.fixture
def recorded_predictions(tiny, monkeypatch):
    """Every PerceptioPrediction the runners get, in order."""
    model, _ = tiny
    predictions = []
    original = model.predict

    def recording(*args, **kwargs):
        output = original(*args, **kwargs)
        predictions.extend(output)
        return output

    monkeypatch.setattr(model, "predict", recording)
    return predictions


def _image(seed: int, size=(40, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


# --- RefCOCO ---------------------------------------------------------------------------------------------------


def _per_object_refcoco(path):
    images = [_image(0), _image(0), _image(1)]
    split = datasets.Dataset.from_dict(
        {
            "question_id": ["0", "1", "2"],
            "image": images,
            "answer": [["left dog", "the brown dog"], ["right cat"], ["a chair"]],
            "segmentation": [[2, 2, 20, 2, 20, 30, 2, 30], [25, 5, 45, 5, 45, 35, 25, 35], [0, 0, 47, 0, 47, 39]],
            "file_name": ["a.jpg", "a.jpg", "b.jpg"],
        },
        features=datasets.Features(
            {
                "question_id": datasets.Value("string"),
                "image": datasets.Image(),
                "answer": datasets.Sequence(datasets.Value("string")),
                "segmentation": datasets.Sequence(datasets.Value("float32")),
                "file_name": datasets.Value("string"),
            }
        ),
    )
    datasets.DatasetDict({"val": split}).save_to_disk(str(path))
    return split


def test_refcoco_per_object_summary_equals_metrics_and_resumes(tiny, recorded_predictions, tmp_path):
    model, processor = tiny
    split = _per_object_refcoco(tmp_path / "refcoco")
    script = _script(processor, model, seg=True, text="ok")
    settings = _settings(tmp_path, model, processor, script)
    summary = run_refcoco(model, processor, str(tmp_path / "refcoco"), settings, split="val")

    targets = [segmentation_to_mask(row["segmentation"], 40, 48) for row in split for _ in row["answer"]]
    assert len(recorded_predictions) == len(targets) == 4
    counts = [mask_intersection_union(np.any(p.masks, axis=0), t) for p, t in zip(recorded_predictions, targets)]
    assert summary["ciou"] == pytest.approx(ciou(*zip(*counts)))
    assert summary["giou"] == pytest.approx(giou(*zip(*counts)))
    assert summary["num_samples"] == 4 and summary["num_skipped"] == 0 and summary["layout"] == "per_object"
    assert json.loads((tmp_path / "out" / "refcoco_summary.json").read_text())["ciou"] == summary["ciou"]
    assert len((tmp_path / "out" / "refcoco_samples.jsonl").read_text().splitlines()) == 4

    recorded_predictions.clear()
    again = run_refcoco(model, processor, str(tmp_path / "refcoco"), settings, split="val")
    assert recorded_predictions == []
    assert again["ciou"] == summary["ciou"] and again["num_samples"] == 4


def test_refcoco_per_image_layout_runs_sam2_encoder_once_per_image(tiny, recorded_predictions, tmp_path):
    model, processor = tiny
    references = [
        {"sentences": ["left half", "the left part"], "segmentation": [[0, 0, 24, 0, 24, 40, 0, 40]]},
        {"sentences": ["top strip"], "segmentation": [[0, 0, 48, 0, 48, 10, 0, 10], [0, 5, 48, 5, 48, 12, 0, 12]]},
    ]
    split = datasets.Dataset.from_dict({"image": [_image(3), _image(4)], "references": [references, references[:1]]})
    encoded_rows = []
    handle = model.grounding_encoder.vision_encoder.register_forward_hook(
        lambda module, args, output: encoded_rows.append(args[0].shape[0])
    )
    try:
        summary = run_refcoco(
            model, processor, split, _settings(tmp_path, model, processor, _script(processor, model, seg=True))
        )
    finally:
        handle.remove()
    assert summary["layout"] == "per_image" and summary["num_samples"] == 5 and summary["num_images"] == 2
    assert sum(encoded_rows) == 2  # two images, five sentences
    targets = [
        segmentation_to_mask(reference["segmentation"], 40, 48)
        for reference in references
        for _ in reference["sentences"]
    ]
    targets += [targets[0], targets[0]]
    counts = [mask_intersection_union(np.any(p.masks, axis=0), t) for p, t in zip(recorded_predictions, targets)]
    assert summary["ciou"] == pytest.approx(ciou(*zip(*counts)))


def test_refcoco_bad_input_names_the_problem(tiny, tmp_path):
    model, processor = tiny
    _per_object_refcoco(tmp_path / "refcoco")
    settings = _settings(tmp_path, model, processor, _script(processor, model, seg=True))
    with pytest.raises(ValueError, match=r"Split 'testA' is not in the dataset at .*refcoco'; it has \['val'\]"):
        run_refcoco(model, processor, str(tmp_path / "refcoco"), settings, split="testA")
    no_sentences = datasets.Dataset.from_dict({"image": [_image(0)], "segmentation": [[0, 0, 5, 0, 5, 5]]})
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answer'\]"):
        run_refcoco(model, processor, no_sentences, settings)


def test_a_saved_dataset_with_an_empty_split_loads_its_other_splits(tmp_path):
    rows = datasets.Dataset.from_dict({"answer": ["a", "b"]})
    datasets.DatasetDict({"validation": rows.select([]), "test": rows}).save_to_disk(str(tmp_path / "data"))
    assert load_split(str(tmp_path / "data"), "test")["answer"] == ["a", "b"]
    with pytest.raises(ValueError, match=r"Could not load the saved dataset at .*validation'"):
        load_split(str(tmp_path / "data"), "validation")


# --- BLINK and HardBLINK ---------------------------------------------------------------------------------------


def test_blink_depth_summary_equals_metric(tiny, recorded_predictions, tmp_path):
    model, processor = tiny
    split = datasets.Dataset.from_dict(
        {
            "idx": ["val_Relative_Depth_1", "val_Relative_Depth_2", "val_Relative_Depth_3"],
            "question": ["Which point is closer to the camera?"] * 3,
            "image_1": [_image(5), _image(6), _image(7)],
            "choices": [["A", "B"]] * 3,
            "answer": ["(A)", "(B)", "(A)"],
        }
    )
    datasets.DatasetDict({"val": split}).save_to_disk(str(tmp_path / "blink"))
    settings = _settings(tmp_path, model, processor, _script(processor, model, text="(A)"), batch_size=2)
    summary = run_blink_depth(model, processor, str(tmp_path / "blink"), settings)
    texts = [prediction.text for prediction in recorded_predictions]
    assert summary["accuracy"] == pytest.approx(multiple_choice_accuracy(texts, split["answer"], 2))
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["num_samples"] == 3


def _hardblink(root, corrupt: tuple[int, int] | None = None):
    for points in (3, 4, 5):
        (root / "images" / f"blink{points}pointscenter").mkdir(parents=True)
        (root / "questions").mkdir(exist_ok=True)
        (root / "answers").mkdir(exist_ok=True)
        questions, answers = [], []
        for index in range(2):
            path = root / "images" / f"blink{points}pointscenter" / f"{index}.png"
            if corrupt == (points, index):
                path.write_bytes(b"not a png")
            else:
                _image(points * 10 + index).save(path)
            questions.append(
                {"question_id": index, "image": f"{index}.png", "text": "Which point is the closest to the camera?"}
            )
            answers.append({"question_id": index, "text": "(A)" if index == 0 else f"({'ABCDE'[points - 1]})"})
        (root / "questions" / f"blink_{points}pointscenter_questions.jsonl").write_text(
            "\n".join(json.dumps(question) for question in questions) + "\n"
        )
        (root / "answers" / f"blink_{points}pointscenter_answers.jsonl").write_text(
            "\n".join(json.dumps(answer) for answer in answers) + "\n"
        )


def test_hardblink_accuracy_per_point_count_and_mean(tiny, recorded_predictions, tmp_path):
    model, processor = tiny
    _hardblink(tmp_path / "hardblink")
    settings = _settings(tmp_path, model, processor, _script(processor, model, text="(A)"))
    summary = run_hardblink(model, processor, tmp_path / "hardblink", settings)
    texts = [prediction.text for prediction in recorded_predictions]
    per_count = {
        str(points): multiple_choice_accuracy(texts[2 * i : 2 * i + 2], ["(A)", f"({'ABCDE'[points - 1]})"], points)
        for i, points in enumerate((3, 4, 5))
    }
    assert {key: value["accuracy"] for key, value in summary["by_num_points"].items()} == pytest.approx(per_count)
    assert summary["mean_accuracy"] == pytest.approx(sum(per_count.values()) / 3)
    assert summary["num_samples"] == 6


def test_hardblink_corrupt_image_errors_or_is_counted(tiny, tmp_path):
    model, processor = tiny
    _hardblink(tmp_path / "hardblink", corrupt=(4, 1))
    script = _script(processor, model, text="(A)")
    with pytest.raises(ValueError, match=r"blink4pointscenter/1\.png.*fails to decode"):
        run_hardblink(model, processor, tmp_path / "hardblink", _settings(tmp_path, model, processor, script))
    summary = run_hardblink(
        model, processor, tmp_path / "hardblink", _settings(tmp_path, model, processor, script, skip_bad=True)
    )
    assert summary["num_skipped"] == 1 and summary["num_samples"] == 5
    assert "blink_4pointscenter_questions.jsonl, line 2" in summary["skipped"][0]["error"]
    (tmp_path / "hardblink" / "answers" / "blink_5pointscenter_answers.jsonl").unlink()
    with pytest.raises(ValueError, match=r"blink_5pointscenter_answers\.jsonl does not exist"):
        run_hardblink(model, processor, tmp_path / "hardblink", _settings(tmp_path, model, processor, script))


# --- synthetic -------------------------------------------------------------------------------------------------


def test_synthetic_summary_equals_metric_functions(tiny, recorded_predictions, tmp_path):
    model, processor = tiny
    data = build_synthetic_dataset(0, 0, 4, image_size=64, seed=0, cache_dir=str(tmp_path / "cache"))
    split = data["test"]
    script = _script(processor, model, seg=True, depth=True, text="(A)")
    summary = run_synthetic(model, processor, data, _settings(tmp_path, model, processor, script))
    pairs = swapped_expression_pairs(split["task"], split["prompt"])
    image_pairs = swapped_image_pairs(split["task"], split["answer"], [_num_points(meta) for meta in split["meta"]])
    assert summary["num_samples"] == 4 and len(recorded_predictions) == 4 + len(pairs) + len(image_pairs)

    referring_counts, depth_figures, correct, counted = [], [], 0, 0
    relative_texts, relative_answers, relative_points = [], [], []
    for row, prediction in zip(split, recorded_predictions):
        targets = sample_spatial_targets(row)
        if row["task"] == "referring":
            referring_counts.append(mask_intersection_union(np.any(prediction.masks, axis=0), targets.masks.any(0)))
        if row["task"] == "relative_depth":
            relative_texts.append(prediction.text)
            relative_answers.append(row["answer"])
            relative_points.append(json.loads(row["meta"])["num_points"])
        target = normalised_inverse_depth(targets.inverse_depth)
        assert prediction.depth is not None and prediction.depth.shape == target.shape
        predicted = prediction.depth.astype(np.float64)
        depth_figures.append(
            (
                abs_rel(normalized_to_positive(predicted), normalized_to_positive(target)),
                rmse(predicted, target),
                delta1(normalized_to_positive(predicted), normalized_to_positive(target)),
            )
        )
        pair = pair_order_counts(predicted, target, num_pairs=1000, margin=0.05, seed=0)
        correct, counted = correct + pair[0], counted + pair[1]
    assert summary["referring"]["ciou"] == pytest.approx(ciou(*zip(*referring_counts)))
    kinds = [json.loads(row["meta"])["kind"] for row in split if row["task"] == "referring"]
    assert sum(figures["num_samples"] for figures in summary["referring"]["by_kind"].values()) == len(kinds)
    assert set(summary["referring"]["by_kind"]) == set(kinds)
    means = np.mean(depth_figures, axis=0)
    assert [summary["depth"][key] for key in ("abs_rel", "rmse", "delta1")] == pytest.approx(list(means))
    assert summary["depth"]["pair_order_accuracy"] == pytest.approx(correct / counted)
    assert summary["relative_depth"]["accuracy"] == pytest.approx(
        multiple_choice_accuracy(relative_texts, relative_answers, relative_points)
    )
    vqa = [
        (row["answer"], prediction.text)
        for row, prediction in zip(split, recorded_predictions)
        if row["task"].startswith("vqa_")
    ]
    expected_vqa = (
        sum(answer.lower() == text.strip().rstrip(".").lower() for answer, text in vqa) / len(vqa) if vqa else None
    )
    assert summary["vqa"]["accuracy"] == expected_vqa
    assert summary["vqa"]["num_samples"] == len(vqa)
    swapped_counts = [
        mask_intersection_union(np.any(prediction.masks, axis=0), sample_spatial_targets(split[index]).masks.any(0))
        for (index, _), prediction in zip(pairs, recorded_predictions[4:])
    ]
    assert len(swapped_counts) >= 1, "the fixture split should hold two referring rows with different sentences"
    assert summary["referring"]["swapped_expression_ciou"] == pytest.approx(ciou(*zip(*swapped_counts)))


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(["referring", "vqa_count"]), st.sampled_from(["a", "b", "c"])), max_size=12
    )
)
def test_swapped_sentences_come_from_another_referring_row_with_another_sentence(rows):
    tasks, prompts = [task for task, _ in rows], [prompt for _, prompt in rows]
    pairs = swapped_expression_pairs(tasks, prompts)
    referring = [index for index, task in enumerate(tasks) if task == "referring"]
    assert [index for index, _ in pairs] == [
        index for index in referring if any(prompts[other] != prompts[index] for other in referring)
    ]
    for index, partner in pairs:
        assert tasks[partner] == "referring" and prompts[partner] != prompts[index]


def _referring_records(own: list[tuple[int, int]], swapped: list[tuple[int, int]]) -> list[dict]:
    """Referring records of rows 0, 1, ... with the (intersection, union) counts `own`, and the swapped-sentence
    records of the first len(swapped) rows with the counts `swapped`."""

    def record(row: int, task: str, counts: tuple[int, int]) -> dict:
        intersection, union = counts
        fields = {"intersection": intersection, "union": union, "num_masks": 1, "use_depth_block": False}
        return {"sample_id": f"{row}/{task}", "row": row, "task": task, "has_depth": False, **fields}

    own_records = [record(row, "referring", counts) for row, counts in enumerate(own)]
    return own_records + [record(row, "referring_swapped", counts) for row, counts in enumerate(swapped)]


def _reference_bootstrap_se(own: list[tuple[int, int]], swapped: list[tuple[int, int]] | None = None) -> float:
    """The bootstrap SE of ciou(own) (minus ciou(swapped) on the same rows), one resample at a time with another
    generator and twice the resamples."""
    generator, values = random.Random(1), []
    for _ in range(2000):
        rows = [generator.randrange(len(own)) for _ in own]
        value = ciou(*zip(*(own[row] for row in rows)))
        values.append(value - ciou(*zip(*(swapped[row] for row in rows))) if swapped else value)
    return statistics.stdev(values)


def test_swapped_sentence_margin_has_a_paired_bootstrap_standard_error():
    own = [(30, 40), (10, 50), (45, 50), (0, 20), (25, 30), (60, 80), (5, 40), (35, 45)]
    swapped = [(10, 60), (5, 55), (20, 70), (0, 30), (10, 45), (20, 90), (0, 50), (15, 60)]
    referring = synthetic_summary(_referring_records(own, swapped))["referring"]
    assert referring["swapped_expression_margin"] == pytest.approx(ciou(*zip(*own)) - ciou(*zip(*swapped)))
    assert referring["ciou_se"] == pytest.approx(_reference_bootstrap_se(own), rel=0.15)
    assert referring["swapped_expression_margin_se"] == pytest.approx(_reference_bootstrap_se(own, swapped), rel=0.15)
    assert referring["follows_sentence"] is True
    assert synthetic_summary(_referring_records(own, swapped))["referring"] == referring  # a fixed seed
    # Resamples drawn only from the two empty rows have no union: they score 1, as `ciou` does.
    own, swapped = [(0, 0), (0, 0), (5, 10)], [(0, 0), (0, 0), (0, 10)]
    records = _referring_records(own, swapped)
    control = paired_ciou_control(records[:3], records[3:])
    assert control["ciou_se"] == pytest.approx(_reference_bootstrap_se(own), rel=0.15)
    assert control["swapped_expression_margin_se"] == pytest.approx(_reference_bootstrap_se(own, swapped), rel=0.15)


def test_referring_figures_are_also_given_per_kind_of_expression():
    own = [(30, 40), (10, 50), (45, 50), (0, 20), (25, 30)]
    records = _referring_records(own, [])
    kinds = ["attributes", "relation", "attributes", "relation", None]
    for record, kind in zip(records, kinds):
        record["expression_kind"] = kind
    by_kind = synthetic_summary(records)["referring"]["by_kind"]
    assert set(by_kind) == {"attributes", "relation"}, "a row without a kind counts only in the overall figures"
    assert by_kind["attributes"]["ciou"] == pytest.approx(ciou(*zip(own[0], own[2])))
    assert by_kind["relation"]["ciou"] == pytest.approx(ciou(*zip(own[1], own[3])))
    assert by_kind["relation"]["num_samples"] == 2
    assert synthetic_summary([])["referring"]["by_kind"] == {}


def test_follows_sentence_needs_the_own_sentence_to_win_by_two_standard_errors():
    same = [(30, 40), (10, 50), (45, 50), (0, 20)]
    control = synthetic_summary(_referring_records(same, same))["referring"]
    assert control["swapped_expression_margin"] == control["swapped_expression_margin_se"] == 0
    assert control["ciou_se"] > 0 and control["follows_sentence"] is False
    # The own sentence wins on half of the rows and loses on the other half: a spread margin of 0.
    control = synthetic_summary(_referring_records([(40, 50), (10, 50)] * 4, [(10, 50), (40, 50)] * 4))["referring"]
    assert control["swapped_expression_margin"] == 0 and control["swapped_expression_margin_se"] > 0
    assert control["follows_sentence"] is False
    control = synthetic_summary(_referring_records([(3, 4), (1, 2)], [(1, 4)]))["referring"]
    assert control["swapped_expression_margin"] == 0.5 and control["ciou_se"] > 0
    assert control["swapped_expression_margin_se"] is None and control["follows_sentence"] is None
    control = synthetic_summary(_referring_records([(3, 4)], [(1, 4)]))["referring"]
    assert control["ciou_se"] is None and control["swapped_expression_margin_se"] is None
    assert synthetic_summary([])["referring"]["swapped_expression_margin"] is None


def _num_points(meta: str) -> int | None:
    return json.loads(meta).get("num_points")


@pytest.fixture(scope="module")
def answer_rows(tmp_path_factory):
    """16 answer questions (2 or 3 points for relative depth): every answer task has partners for the control."""
    config = dataclasses.replace(DEFAULT_TASK_CONFIG, point_count_range=(2, 3))
    cache = tmp_path_factory.mktemp("answer_rows")
    return build_synthetic_dataset(
        0, 0, 16, image_size=64, seed=0, tasks=list(ANSWER_TASKS), task_config=config, cache_dir=str(cache)
    )["test"]


def test_swapped_image_summary_scores_own_answers_and_resumes(
    tiny, recorded_predictions, answer_rows, tmp_path, monkeypatch
):
    model, processor = tiny
    asked, predict = [], model.predict

    def asking(images, prompts, **kwargs):
        asked.extend(zip(images, prompts))
        return predict(images, prompts, **kwargs)

    monkeypatch.setattr(model, "predict", asking)
    script = _script(processor, model, depth=True, text="(A)")
    settings = _settings(tmp_path, model, processor, script, batch_size=8)
    summary = run_synthetic(model, processor, answer_rows, settings)
    points = [_num_points(meta) for meta in answer_rows["meta"]]
    pairs = swapped_image_pairs(answer_rows["task"], answer_rows["answer"], points)
    assert set(summary["swapped_image"]) == set(ANSWER_TASKS)
    for task, control in summary["swapped_image"].items():
        rows = [index for index, _ in pairs if answer_rows[index]["task"] == task]
        assert control["num_samples"] == len(rows) >= 2
        # The scripted answer "(A)" is the same on every image: right exactly where the row's own answer is "(A)".
        expected = np.mean([normalised_answer(answer_rows[index]["answer"]) == "(a)" for index in rows])
        assert control["accuracy_own"] == control["accuracy_swapped"] == pytest.approx(expected)
        assert control["accuracy_margin"] == 0 and control["reads_image"] is False
        for name in ("accuracy_own", "accuracy_swapped"):
            assert 0 <= control[name] <= 1 and 0 <= control[f"{name}_se"] <= 0.5
        assert control["loss_own"] > 0 and control["loss_swapped"] > 0 and control["loss_margin_se"] > 0
        assert control["loss_margin"] == pytest.approx(control["loss_swapped"] - control["loss_own"])
    records = [json.loads(line) for line in (tmp_path / "out" / "synthetic_samples.jsonl").read_text().splitlines()]
    swapped = [record for record in records if record["task"] == "swapped_image"]
    assert [(record["row"], record["partner"]) for record in swapped] == pairs
    for (image, prompt), (index, partner) in zip(asked[len(answer_rows) :], pairs, strict=True):
        assert prompt == answer_rows[index]["prompt"]
        assert np.array_equal(np.asarray(image), np.asarray(answer_rows[partner]["image"].convert("RGB")))
    # Each loss is the answer's, after the own row's depth block for a row that asks for one.
    by_row = {record["row"]: record for record in swapped}
    for index, partner in (pairs[0], next(pair for pair in pairs if answer_rows[pair[0]]["use_depth_block"])):
        row = answer_rows[index]
        on_images = [answer_sample(row, answer_rows[image]["image"]) for image in (index, partner)]
        assert answer_losses(model, processor, on_images, batch_size=2) == pytest.approx(
            [by_row[index]["loss_own"], by_row[index]["loss_swapped"]], rel=1e-5
        )
    # The teacher-forced loss reads the image even where the scripted generation does not.
    assert all(record["loss_own"] != pytest.approx(record["loss_swapped"]) for record in swapped)
    # The same scripted depth block on both images, scored against the own row's depth, gives the same figures.
    assert summary["depth_other_image"] == summary["depth_own_image"]
    assert summary["depth_other_image"]["num_maps"] == len(pairs)

    recorded_predictions.clear()
    assert run_synthetic(model, processor, answer_rows, settings) == summary
    assert recorded_predictions == []


def test_image_blind_model_does_not_read_the_image(tiny, answer_rows, tmp_path):
    """The tiny model with its image features zeroed sees the same image tokens for every image: a real model whose
    generation and answer loss cannot depend on the image."""
    model, processor = tiny
    projector = model.model.multi_modal_projector
    handle = projector.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    try:
        settings = RunSettings(output_dir=tmp_path / "out", batch_size=8, max_new_tokens=3, show_progress=False)
        summary = run_synthetic(model, processor, answer_rows, settings)
    finally:
        handle.remove()
    for control in summary["swapped_image"].values():
        assert control["num_samples"] >= 2 and control["reads_image"] is False
        assert control["accuracy_margin"] == 0 and control["loss_margin"] == pytest.approx(0, abs=1e-5)


def test_reads_image_needs_the_own_image_to_win_by_two_standard_errors():
    def pairs(own: list[bool], swapped: list[bool]) -> list[tuple[dict, dict]]:
        return [({"correct": a}, {"correct": b, "loss_own": 1.0, "loss_swapped": 2.0}) for a, b in zip(own, swapped)]

    control = paired_image_control(pairs([True] * 8, [True, False] * 4))
    assert control["accuracy_margin"] == 0.5
    assert control["accuracy_margin_se"] == pytest.approx(np.sqrt(2 / 7) / np.sqrt(8))
    assert control["reads_image"] is True and control["loss_margin"] == 1 and control["loss_margin_se"] == 0
    assert paired_image_control(pairs([True, False] * 4, [False, True] * 4))["reads_image"] is False
    assert paired_image_control(pairs([True, True, False], [False, False, True]))["reads_image"] is False  # 1/3 < 2 SE
    assert paired_image_control(pairs([True], [False]))["reads_image"] is None
    assert paired_image_control([])["accuracy_own"] is None


def test_answer_loss_equals_the_models_lm_loss(tiny, answer_rows):
    model, processor = tiny
    samples = [{key: answer_rows[index][key] for key in ("image", "prompt", "answer")} for index in (0, 2)]
    assert len({len(sample["prompt"]) for sample in samples}) == 2, "the batch should need padding"
    batched = answer_losses(model, processor, samples, batch_size=2)
    for sample, loss in zip(samples, batched):
        with torch.no_grad():
            direct = model(**PerceptioDataCollator(processor)([sample])).loss_lm
        assert loss == pytest.approx(float(direct), rel=1e-5)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        answer_losses(model, processor, samples, batch_size=0)
    with pytest.raises(ValueError, match="Sample 1 has masks"):
        answer_losses(model, processor, [samples[0], {**samples[1], "masks": np.ones((1, 4, 4))}], batch_size=2)


def test_answer_loss_after_a_depth_block_scores_the_answer_alone(tiny, answer_rows):
    model, processor = tiny
    row = next(row for row in answer_rows if row["task"] == "relative_depth")
    assert row["use_depth_block"]
    sample = {key: row[key] for key in ("image", "prompt", "answer", "use_depth_block", "depth")}
    batch = PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer)([sample])
    end = int((batch["input_ids"][0] == model.config.depth_end_token_id).nonzero()[0, 0])
    with torch.no_grad():
        logits = model(**{key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")}).logits[0]
    answer_positions = torch.arange(end + 1, batch["input_ids"].shape[1])
    assert len(answer_positions) >= 2, "the answer and the end-of-turn token follow the block"
    expected = torch.nn.functional.cross_entropy(logits[answer_positions - 1], batch["input_ids"][0, answer_positions])
    (loss,) = answer_losses(model, processor, [sample], batch_size=1)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    flat_depth = {**sample, "depth": np.full_like(np.asarray(row["depth"]), 3.0)}
    without_block = {**sample, "use_depth_block": False}
    on_flat_depth, without_the_block = answer_losses(model, processor, [flat_depth, without_block], batch_size=2)
    assert on_flat_depth != pytest.approx(loss) and without_the_block != pytest.approx(loss)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["referring", *ANSWER_TASKS]),
            st.sampled_from(["(A)", "(B)", "Red", "red."]),
            st.sampled_from([2, 3]),
        ),
        max_size=14,
    )
)
def test_swapped_image_partner_asks_the_same_task_with_another_answer(rows):
    tasks, answers, points = ([row[column] for row in rows] for column in range(3))
    pairs = swapped_image_pairs(tasks, answers, points)

    def eligible(index: int, other: int) -> bool:
        same_points = tasks[index] != "relative_depth" or points[other] == points[index]
        different = normalised_answer(answers[other]) != normalised_answer(answers[index])
        return other != index and tasks[other] == tasks[index] and same_points and different

    expected = []
    for index, task in enumerate(tasks):
        following = [*range(index + 1, len(rows)), *range(index)]
        partner = next((other for other in following if eligible(index, other)), None)
        if task in ANSWER_TASKS and partner is not None:
            expected.append((index, partner))
    assert pairs == expected
    for index, partner in pairs:
        assert partner != index and tasks[partner] == tasks[index] != "referring"
        assert tasks[index] != "relative_depth" or points[partner] == points[index]
    with pytest.raises(ValueError, match="must be of one length"):
        swapped_image_pairs(tasks, answers, [*points, 2])


def test_synthetic_missing_column_names_it(tiny, tmp_path):
    model, processor = tiny
    data = build_synthetic_dataset(0, 0, 1, image_size=64, seed=0, cache_dir=str(tmp_path / "cache"))
    settings = _settings(tmp_path, model, processor, _script(processor, model))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['depth'\]"):
        run_synthetic(model, processor, data["test"].remove_columns("depth"), settings)


def test_run_settings_reject_bad_values(tmp_path):
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        RunSettings(output_dir=tmp_path, limit=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        RunSettings(output_dir=tmp_path, batch_size=-1)


def test_eval_command_runs_hardblink_on_a_saved_checkpoint(tiny, tmp_path, capsys):
    from perceptio.cli import main

    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    _hardblink(tmp_path / "hardblink")
    argv = [
        "eval",
        "hardblink",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "hardblink"),
        "--output-dir",
        str(tmp_path / "out"),
        "--limit",
        "1",
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "hardblink_summary.json").read_text())
    assert summary["num_samples"] == 3 and set(summary["by_num_points"]) == {"3", "4", "5"}
    assert main(["eval", "hardblink", "--model", str(tmp_path / "nowhere"), "--data", "x"]) == 2
    assert "not a Perceptio checkpoint folder" in capsys.readouterr().err


def test_vqa_summary_scores_exact_answers_ignoring_case_and_full_stop():
    from perceptio.evaluation.runners.synthetic import normalised_answer, vqa_summary

    assert normalised_answer(" Red. ") == normalised_answer("red") == "red"
    records = [
        {"task": "vqa_colour", "correct": True},
        {"task": "vqa_colour", "correct": False},
        {"task": "vqa_count", "correct": True},
    ]
    summary = vqa_summary(records)
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["by_task"] == {
        "vqa_colour": {"accuracy": 0.5, "num_samples": 2},
        "vqa_count": {"accuracy": 1.0, "num_samples": 1},
    }
    assert vqa_summary([])["accuracy"] is None


@pytest.mark.parametrize("ripple", [False, True])
def test_a_constant_depth_map_is_scored_in_the_tokenizers_normalised_space(ripple):
    from perceptio import PerceptioDepthTokenizer, PerceptioDepthTokenizerConfig
    from perceptio.evaluation.runners.synthetic import synthetic_record
    from perceptio.models.perceptio.post_processing_perceptio import PerceptioPrediction

    size = 16
    depth = np.full((size, size), 2.0, dtype=np.float32)
    if ripple:  # constant up to float rounding: one ulp on every other row
        depth[::2] = np.nextafter(np.float32(2.0), np.float32(3.0))
    row = {"task": "vqa_colour", "answer": "Red.", "use_depth_block": True, "masks": [], "depth": depth}
    inverse_depth = sample_spatial_targets(row).inverse_depth
    tokenizer = PerceptioDepthTokenizer(
        PerceptioDepthTokenizerConfig(image_size=size, hidden_channels=[4, 8], codebook_dim=4, num_codes=8)
    )
    tokenizer_space, _ = tokenizer.normalize(torch.from_numpy(inverse_depth)[None])
    assert not tokenizer_space.any() and not normalised_inverse_depth(inverse_depth).any()
    # A prediction of the tokenizer's normalised map scores perfectly: no invented structure in the target.
    record = synthetic_record(0, row, PerceptioPrediction(text="Red.", depth=tokenizer_space[0].numpy()))
    assert record["correct"] and record["depth"] == {
        "abs_rel": 0.0,
        "rmse": 0.0,
        "delta1": 1.0,
        "pair_correct": 0,
        "pair_counted": 0,
    }
