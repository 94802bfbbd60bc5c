"""BLINK Relative_Depth: which of the marked points is closer to the camera, multiple choice.

Reads BLINK's layout (the `Relative_Depth` subset of BLINK-Benchmark/BLINK, split "val" has answers): columns
`question`, `image_1`, `choices` (option texts) and `answer` ("(A)"). The prompt lists the options as BLINK does
and asks for the letter; the answer is scored with the strict parser (one unambiguous letter, else wrong).
"""

from __future__ import annotations

import os
import string
from typing import Any

import datasets

from ..answer_parsing import parse_reference_letter
from .choice_scoring import choice_record, choice_summary
from .dataset_inputs import decode_rgb_image, load_split, require_columns, rows_without_decoding
from .resumable_run import BadSampleError, ResumableRun, RunSettings


BLINK_SUBSET = "Relative_Depth"
BLINK_DEPTH_COLUMNS: tuple[str, ...] = ("question", "image_1", "choices", "answer")
DEFAULT_CHOICE_PROMPT = (
    "{question}\nSelect from the following choices.\n{options}\n"
    "Answer with the option's letter from the given choices directly."
)


def format_choice_prompt(question: str, choices: list[str], template: str = DEFAULT_CHOICE_PROMPT) -> str:
    """The prompt of a multiple-choice question: "(A) first option" lines filled into `template`."""
    options = "\n".join(f"({letter}) {choice}" for letter, choice in zip(string.ascii_uppercase, choices))
    return template.format(question=question, options=options)


def _blink_question(row: dict[str, Any], index: int) -> tuple[Any, str, list[str], str]:
    where = f"row {index}"
    image = decode_rgb_image(row["image_1"], where)
    question, choices, answer = row["question"], row["choices"], row["answer"]
    if not isinstance(question, str) or not question.strip():
        raise BadSampleError(f"{where}: `question` must be a non-empty string; got {question!r}.")
    if not isinstance(choices, (list, tuple)) or not 1 <= len(choices) <= len(string.ascii_uppercase):
        raise BadSampleError(f"{where}: `choices` must be a list of 1 to 26 option texts; got {choices!r}.")
    try:
        parse_reference_letter(answer, len(choices))
    except ValueError as error:
        raise BadSampleError(f"{where}: bad `answer` ({error}).") from error
    return image, question, [str(choice) for choice in choices], answer


def run_blink_depth(
    model,
    processor,
    data: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    settings: RunSettings,
    split: str | None = "val",
    prompt_template: str = DEFAULT_CHOICE_PROMPT,
) -> dict[str, Any]:
    """Evaluate BLINK Relative_Depth; returns (and writes) the summary: accuracy, counts, unparsed answers."""
    dataset = load_split(data, split, config_name=BLINK_SUBSET)
    require_columns(dataset, BLINK_DEPTH_COLUMNS, "BLINK Relative_Depth")
    dataset = rows_without_decoding(dataset, ["image_1"])
    run = ResumableRun("blink-depth", settings)
    num_rows = settings.selected_count(len(dataset))
    selected_ids = [str(index) for index in range(num_rows)]

    def prepare(index: int):
        image, question, choices, answer = _blink_question(dataset[index], index)
        return image, format_choice_prompt(question, choices, prompt_template), (index, choices, answer)

    work = [(sample_id, int(sample_id)) for sample_id in selected_ids]
    for (index, choices, answer), prediction in run.predict_pending(model, processor, work, prepare, "question"):
        run.add(choice_record(str(index), prediction.text, answer, len(choices), row=index))
    return run.finish(choice_summary(run.selected_records(selected_ids)))
