"""Multiple-choice accuracy with the strict answer parser (BLINK, HardBLINK and similar benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence

from perceptio.evaluation.answer_parsing import parse_choice_letter, parse_reference_letter


def _per_sample_num_choices(num_choices: int | Sequence[int], num_samples: int) -> list[int]:
    """One option count per sample, from a single count or a per-sample list."""
    if isinstance(num_choices, Sequence) and not isinstance(num_choices, str):
        if len(num_choices) != num_samples:
            raise ValueError(
                f"num_choices must be one int or one int per sample; got {len(num_choices)} counts "
                f"for {num_samples} samples."
            )
        return list(num_choices)
    return [num_choices] * num_samples


def parsed_letters(
    predictions: Sequence[str], references: Sequence[str], num_choices: int | Sequence[int]
) -> list[tuple[str | None, str]]:
    """Per sample, the strictly parsed predicted letter (None when unreadable) and the reference letter.

    Args:
        predictions: generated answers (spatial tokens allowed; see `parse_choice_letter`).
        references: ground-truth answers written "(A)" or "A".
        num_choices: the number of options, one for all samples or one per sample.
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have one entry per sample; got {len(predictions)} and {len(references)}."
        )
    if not predictions:
        raise ValueError("predictions and references are empty; at least one sample is needed to score.")
    counts = _per_sample_num_choices(num_choices, len(predictions))
    letters = []
    for index, (prediction, reference, count) in enumerate(zip(predictions, references, counts)):
        if not isinstance(prediction, str):
            raise ValueError(f"prediction at sample {index} must be a str; got {type(prediction).__name__}.")
        try:
            letters.append((parse_choice_letter(prediction, count), parse_reference_letter(reference, count)))
        except ValueError as error:
            raise ValueError(f"sample {index}: {error}") from error
    return letters


def multiple_choice_correctness(
    predictions: Sequence[str], references: Sequence[str], num_choices: int | Sequence[int]
) -> list[bool]:
    """Per-sample correctness: the strict parse of each prediction equals its reference letter."""
    return [predicted == reference for predicted, reference in parsed_letters(predictions, references, num_choices)]


def multiple_choice_accuracy(
    predictions: Sequence[str], references: Sequence[str], num_choices: int | Sequence[int]
) -> float:
    """Fraction of predictions whose strictly parsed option letter equals the reference.

    An answer the parser cannot read (no letter, several letters, a letter outside the choices) counts as wrong.

    Example:
        >>> multiple_choice_accuracy(["(B)", "A or B", "<DEPTH_START><DEPTH_3><DEPTH_END>A."], ["(B)", "(A)", "(A)"], 2)
        0.6666666666666666
    """
    correct = multiple_choice_correctness(predictions, references, num_choices)
    return sum(correct) / len(correct)


def multiple_choice_summary(
    predictions: Sequence[str], references: Sequence[str], num_choices: int | Sequence[int]
) -> dict[str, float | int]:
    """Accuracy plus the counts a report needs: `accuracy`, `num_samples`, `num_unparsed` (no single letter read)."""
    letters = parsed_letters(predictions, references, num_choices)
    num_correct = sum(predicted == reference for predicted, reference in letters)
    num_unparsed = sum(predicted is None for predicted, _ in letters)
    return {"accuracy": num_correct / len(letters), "num_samples": len(letters), "num_unparsed": num_unparsed}
