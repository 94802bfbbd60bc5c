"""HardBLINK (Aurora, "Perception Tokens"): which of 3, 4 or 5 marked points is closest to the camera.

Reads the folder layout of the release (`Data/evals/hardblink/` of Aurora's repository):

    ROOT/
      questions/blink_{3,4,5}pointscenter_questions.jsonl   (`question_id`, `image`, `text`, `category`)
      answers/blink_{3,4,5}pointscenter_answers.jsonl       (`question_id`, `text` like "(A)", `category`)
      images/blink{3,4,5}pointscenter/N.png                 (`image` is the file name in that folder)

The question's `text` is the prompt as given (the release asks the same question for every point count and does not
list the options); the answer is scored with the strict parser against the N options A.. of an N-point question.
`category` is not read. The summary reports the accuracy per point count and their mean (the paper's headline
HardBLINK number). `limit` applies per point count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..answer_parsing import parse_reference_letter
from .choice_scoring import choice_record, choice_summary, choice_summary_by
from .dataset_inputs import decode_rgb_image
from .resumable_run import BadSampleError, ResumableRun, RunSettings


HARDBLINK_POINT_COUNTS: tuple[int, ...] = (3, 4, 5)


def hardblink_paths(root: Path, num_points: int) -> tuple[Path, Path, Path]:
    """(question file, answer file, image folder) of one point count, as the release names them."""
    return (
        root / "questions" / f"blink_{num_points}pointscenter_questions.jsonl",
        root / "answers" / f"blink_{num_points}pointscenter_answers.jsonl",
        root / "images" / f"blink{num_points}pointscenter",
    )


def read_jsonl(path: Path, required_keys: Sequence[str]) -> list[dict[str, Any]]:
    """The objects of a JSONL file; ValueError naming the file and line of a bad line or a missing key."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist; see the HardBLINK layout in `perceptio eval hardblink --help`.")
    objects = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error}).") from error
        missing = [key for key in required_keys if not isinstance(value, dict) or key not in value]
        if missing:
            raise ValueError(f"{path}, line {number}: missing key(s) {missing} (needs {list(required_keys)}).")
        objects.append(value)
    return objects


def _answers_by_question(path: Path) -> dict[str, str]:
    return {str(answer["question_id"]): answer["text"] for answer in read_jsonl(path, ("question_id", "text"))}


def _hardblink_question(question: dict, answers: dict[str, str], image_folder: Path, num_points: int, where: str):
    question_id = str(question["question_id"])
    if question_id not in answers:
        raise BadSampleError(f"{where}: no answer for question_id {question_id!r} in the answer file.")
    try:
        parse_reference_letter(answers[question_id], num_points)
    except ValueError as error:
        raise BadSampleError(f"{where}: bad answer for question_id {question_id!r} ({error}).") from error
    if not isinstance(question["text"], str) or not question["text"].strip():
        raise BadSampleError(f"{where}: `text` must be the non-empty question.")
    image = decode_rgb_image(
        image_folder / str(question["image"]), f"{where} ({image_folder / str(question['image'])})"
    )
    return image, question["text"], answers[question_id]


def run_hardblink(
    model,
    processor,
    root: str | os.PathLike,
    settings: RunSettings,
    point_counts: Sequence[int] = HARDBLINK_POINT_COUNTS,
) -> dict[str, Any]:
    """Evaluate HardBLINK from its folder; returns (and writes) accuracy per point count and their mean."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"HardBLINK root {root} is not a folder (it holds questions/, answers/ and images/).")
    if not point_counts or any(count not in HARDBLINK_POINT_COUNTS for count in point_counts):
        raise ValueError(f"point_counts must be a non-empty subset of {HARDBLINK_POINT_COUNTS}; got {point_counts!r}.")
    run = ResumableRun("hardblink", settings)
    work, selected_ids = [], []
    for num_points in point_counts:
        question_path, answer_path, image_folder = hardblink_paths(root, num_points)
        questions = read_jsonl(question_path, ("question_id", "image", "text"))
        answers = _answers_by_question(answer_path)
        for line, question in enumerate(questions[: settings.selected_count(len(questions))], start=1):
            sample_id = f"{num_points}:{question['question_id']}"
            selected_ids.append(sample_id)
            where = f"{question_path.name}, line {line}"
            work.append((sample_id, num_points, question, answers, image_folder, where))

    def prepare(item):
        sample_id, num_points, question, answers, image_folder, where = item
        image, prompt, answer = _hardblink_question(question, answers, image_folder, num_points, where)
        return image, prompt, (sample_id, num_points, answer)

    keyed_work = [(item[0], item) for item in work]
    for (sample_id, num_points, answer), prediction in run.predict_pending(
        model, processor, keyed_work, prepare, "question"
    ):
        run.add(choice_record(sample_id, prediction.text, answer, num_points, num_points=num_points))
    return run.finish(hardblink_summary(run.selected_records(selected_ids)))


def hardblink_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall figures, the figures per point count, and the mean of the per-count accuracies."""
    by_points = choice_summary_by(records, "num_points")
    accuracies = [group["accuracy"] for group in by_points.values()]
    return {
        **choice_summary(records),
        "by_num_points": by_points,
        "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
    }
