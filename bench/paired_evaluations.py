"""Two checkpoints evaluated by `perceptio eval synthetic` on the same questions: their difference, question by question.

Each evaluation's standard errors cover its own questions; two checkpoints asked the same questions differ by less
noise than that, because a question hard for one is mostly hard for the other. This script reads the
`synthetic_samples.jsonl` of two evaluation folders, checks that they hold the same questions, and prints per answer
task the accuracy of each and the mean paired difference (candidate minus baseline) with its standard error, and for
referring the cIoU of each and the difference with a bootstrap standard error over the questions (cIoU pools the
split, so it has no per-question difference), overall and per kind of expression where the samples name it. The
standard errors are over questions only: the spread between two training runs of one recipe is not in them.

    python bench/paired_evaluations.py --baseline runs/synthetic-tiny-eval --candidate runs/heads8-eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from perceptio.evaluation.runners.synthetic import ANSWER_TASKS, mean_and_standard_error
from perceptio.evaluation.segmentation_metrics import EMPTY_SAMPLE_IOU, ciou


SAMPLES_FILE = "synthetic_samples.jsonl"
REFERRING_TASK = "referring"
BOOTSTRAP_SEED = 0


def read_samples(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The scored samples of an evaluation folder by sample id; ValueError naming the file when it is missing or
    unreadable."""
    path = Path(folder) / SAMPLES_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass a folder written by `perceptio eval synthetic`.")
    samples = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
            samples[str(record["sample_id"])] = record
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} line {number} is not a scored sample: {error}.") from error
    return samples


def check_same_questions(baseline: dict[str, dict], candidate: dict[str, dict]) -> None:
    """ValueError unless both evaluations scored the same sample ids with the same task."""
    if set(baseline) != set(candidate):
        only = sorted(set(baseline) ^ set(candidate))
        raise ValueError(f"the evaluations scored different samples ({len(only)} in one only, e.g. {only[:3]}).")
    differing = [key for key in baseline if baseline[key]["task"] != candidate[key]["task"]]
    if differing:
        raise ValueError(
            f"sample {differing[0]} is a different task in the two evaluations; were they run on one split?"
        )


def paired_accuracy(baseline: dict[str, dict], candidate: dict[str, dict], task: str) -> dict[str, Any]:
    """Both accuracies on `task` and the mean candidate-minus-baseline difference with its standard error."""
    keys = [key for key, record in baseline.items() if record["task"] == task]
    base = [float(baseline[key]["correct"]) for key in keys]
    other = [float(candidate[key]["correct"]) for key in keys]
    difference, error = mean_and_standard_error([b - a for a, b in zip(base, other)])
    return {
        "num_samples": len(keys),
        "baseline": mean_and_standard_error(base)[0],
        "candidate": mean_and_standard_error(other)[0],
        "difference": difference,
        "difference_se": error,
    }


def pooled_iou(totals: np.ndarray) -> np.ndarray:
    """cIoU of each row of (total intersection, total union), `EMPTY_SAMPLE_IOU` where the union is empty (as `ciou`)."""
    empty = np.full(len(totals), EMPTY_SAMPLE_IOU)
    return np.divide(totals[:, 0], totals[:, 1], out=empty, where=totals[:, 1] > 0)


def referring_kinds(samples: dict[str, dict]) -> list[str]:
    """The kinds of referring expression the samples name (`expression_kind`), sorted."""
    return sorted(
        {record.get("expression_kind") for record in samples.values() if record["task"] == REFERRING_TASK} - {None}
    )


def paired_ciou(
    baseline: dict[str, dict],
    candidate: dict[str, dict],
    resamples: int,
    seed: int = BOOTSTRAP_SEED,
    kind: str | None = None,
) -> dict[str, Any]:
    """Both referring cIoUs and their difference, with the standard deviation of the difference over `resamples`
    bootstrap draws of the questions (the same draw for both); over the expressions of `kind` only, when given."""
    keys = [
        key
        for key, record in baseline.items()
        if record["task"] == REFERRING_TASK and (kind is None or record.get("expression_kind") == kind)
    ]
    counts = {
        name: np.array([[samples[key]["intersection"], samples[key]["union"]] for key in keys], dtype=np.float64)
        for name, samples in (("baseline", baseline), ("candidate", candidate))
    }
    figures: dict[str, Any] = {"num_samples": len(keys), "difference_se": None}
    if not keys:
        return {**figures, "baseline": None, "candidate": None, "difference": None}
    for name, array in counts.items():
        figures[name] = ciou(array[:, 0], array[:, 1])
    figures["difference"] = figures["candidate"] - figures["baseline"]
    if len(keys) > 1:
        draws = np.random.default_rng(seed).integers(0, len(keys), size=(resamples, len(keys)))
        base = counts["baseline"][draws].sum(axis=1)
        other = counts["candidate"][draws].sum(axis=1)
        differences = pooled_iou(other) - pooled_iou(base)
        figures["difference_se"] = float(differences.std(ddof=1))
    return figures


def format_row(name: str, figures: dict[str, Any]) -> str:
    """One markdown row: name, count, baseline, candidate, difference ± standard error."""

    def number(value: float | None, sign: str = "") -> str:
        return "n/a" if value is None else f"{value:{sign}.3f}"

    return (
        f"| {name} | {figures['num_samples']} | {number(figures['baseline'])} | {number(figures['candidate'])} | "
        f"{number(figures['difference'], '+')} ± {number(figures['difference_se'])} |"
    )


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="an output folder of `perceptio eval synthetic`")
    parser.add_argument("--candidate", required=True, help="another, evaluated on the same data and split")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap draws for the cIoU difference")
    arguments = parser.parse_args(argv)
    if arguments.resamples < 2:
        parser.error(f"--resamples must be at least 2, got {arguments.resamples}.")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        baseline, candidate = read_samples(arguments.baseline), read_samples(arguments.candidate)
        check_same_questions(baseline, candidate)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("| task | questions | baseline | candidate | difference ± standard error |")
    print("| --- | --- | --- | --- | --- |")
    for task in ANSWER_TASKS:
        print(format_row(f"{task} accuracy", paired_accuracy(baseline, candidate, task)))
    print(format_row(f"{REFERRING_TASK} cIoU", paired_ciou(baseline, candidate, arguments.resamples)))
    for kind in referring_kinds(baseline):
        figures = paired_ciou(baseline, candidate, arguments.resamples, kind=kind)
        print(format_row(f"{REFERRING_TASK} cIoU, {kind}", figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
