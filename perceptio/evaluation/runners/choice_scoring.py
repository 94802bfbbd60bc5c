"""Per-sample records and summaries of multiple-choice benchmarks, scored with the strict answer parser."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..answer_parsing import parse_choice_letter, parse_reference_letter
from ..multiple_choice import multiple_choice_summary


def choice_record(
    sample_id: str, prediction_text: str, reference: str, num_choices: int, **details: Any
) -> dict[str, Any]:
    """The JSONL record of one question: the answer, its strictly parsed letter, the reference letter, correctness."""
    parsed = parse_choice_letter(prediction_text, num_choices)
    reference_letter = parse_reference_letter(reference, num_choices)
    return {
        "sample_id": sample_id,
        **details,
        "prediction": prediction_text,
        "parsed_letter": parsed,
        "reference": reference,
        "reference_letter": reference_letter,
        "num_choices": num_choices,
        "correct": parsed == reference_letter,
    }


def choice_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`accuracy`, `num_samples` and `num_unparsed` of the records (from `multiple_choice_summary`)."""
    if not records:
        return {"accuracy": None, "num_samples": 0, "num_unparsed": 0}
    return multiple_choice_summary(
        [record["prediction"] for record in records],
        [record["reference"] for record in records],
        [record["num_choices"] for record in records],
    )


def choice_summary_by(records: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """`choice_summary` of each group of records sharing `record[key]`, keyed by str(value), in sorted order."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record[key], []).append(record)
    return {str(value): choice_summary(groups[value]) for value in sorted(groups)}
