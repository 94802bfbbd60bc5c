"""HardBLINK on a folder laid out exactly like the release (`Data/evals/hardblink/` of Aurora's repository)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_eval_runners import ScriptedAnswer  # noqa: E402  (the shared scripted-generation processor)

from perceptio.evaluation.runners import RunSettings, run_hardblink


pytestmark = pytest.mark.usefixtures("single_torch_thread")

# The release asks this same question in all three question files.
RELEASE_QUESTION = (
    "Multiple points are circled on the image, labeled by letters beside each circle. Which point is the closest to "
    "the camera?"
)
# Two rows per point count; the model below always answers "(B)".
ANSWERS = {3: ["(B)", "(B)"], 4: ["(B)", "(D)"], 5: ["(A)", "(E)"]}


def write_release_layout(root) -> None:
    """questions/, answers/ and images/ as released: integer question ids, `N.png` names, a `category` field."""
    (root / "questions").mkdir(parents=True)
    (root / "answers").mkdir()
    rng = np.random.default_rng(0)
    for points, answers in ANSWERS.items():
        image_folder = root / "images" / f"blink{points}pointscenter"
        image_folder.mkdir(parents=True)
        questions, answer_rows = [], []
        for question_id, answer in enumerate(answers):
            image = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
            image.save(image_folder / f"{question_id}.png")
            questions.append(
                {
                    "question_id": question_id,
                    "image": f"{question_id}.png",
                    "text": RELEASE_QUESTION,
                    "category": "count",
                }
            )
            answer_rows.append({"question_id": question_id, "text": answer, "category": "count"})
        for folder, name, rows in (
            ("questions", f"blink_{points}pointscenter_questions.jsonl", questions),
            ("answers", f"blink_{points}pointscenter_answers.jsonl", answer_rows),
        ):
            (root / folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_the_released_layout_is_scored_per_point_count(tiny_pair, tmp_path):
    model, processor = tiny_pair
    write_release_layout(tmp_path / "hardblink")
    tokenizer = processor.tokenizer
    script = tokenizer("(B)", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    settings = RunSettings(
        output_dir=tmp_path / "out",
        batch_size=2,
        max_new_tokens=len(script) + 1,
        show_progress=False,
        generate_kwargs={"logits_processor": [ScriptedAnswer(script)]},
    )
    summary = run_hardblink(model, processor, tmp_path / "hardblink", settings)
    assert {points: group["accuracy"] for points, group in summary["by_num_points"].items()} == {
        "3": 1.0,
        "4": 0.5,
        "5": 0.0,
    }
    assert summary["mean_accuracy"] == pytest.approx(0.5) and summary["num_samples"] == 6
    records = [json.loads(line) for line in (tmp_path / "out" / "hardblink_samples.jsonl").read_text().splitlines()]
    assert sorted(record["sample_id"] for record in records) == ["3:0", "3:1", "4:0", "4:1", "5:0", "5:1"]


def test_a_missing_question_file_is_named(tiny_pair, tmp_path):
    model, processor = tiny_pair
    write_release_layout(tmp_path / "hardblink")
    (tmp_path / "hardblink" / "questions" / "blink_4pointscenter_questions.jsonl").unlink()
    with pytest.raises(ValueError, match=r"blink_4pointscenter_questions\.jsonl does not exist"):
        run_hardblink(model, processor, tmp_path / "hardblink", RunSettings(output_dir=tmp_path / "out"))
