"""What `perceptio eval synthetic` scores without looking at the image: the floor every figure should be read against.

The rendered scenes share one layout (a camera over a ground plane, objects in the lower half), so some figures are
high for a model that has learnt only that layout. This script fits three image-blind predictors on the validation
split and scores them on the test split with the evaluation's own metric code:

- depth: the mean normalised inverse-depth map of the validation images, written for every test image;
- referring: the mean validation mask, thresholded at the level that gives the best validation cIoU;
- relative depth and VQA: the most frequent validation answer of each task (and point count).

Referring cIoU with another row's sentence (`perceptio eval synthetic`'s control) equals the plain cIoU for a model
whose mask ignores the sentence. The script also scores one visual heuristic, "the lowest marker in the image is the
closest" (true on a ground plane), which a model can learn from the image alone. With `--summary` (a
`synthetic_summary.json` written by `perceptio eval synthetic` on the same data) it prints the model's figures beside
them, and for each answer task (`relative_depth` over all point counts) the model's accuracy on the questions asked
with their own image and with another test image (the summary's `swapped_image` control, over the questions that
have a partner image): a model that reads the image scores lower with the other image, one that does not scores the
same, however far above the prior it is.

    python bench/prior_baselines.py --data runs/synthetic-tiny/dataset
    python bench/prior_baselines.py --data runs/synthetic-tiny/dataset --summary runs/eval/synthetic_summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from perceptio.data.synthetic_dataset import sample_spatial_targets
from perceptio.evaluation.depth_metrics import normalised_inverse_depth
from perceptio.evaluation.runners.synthetic import depth_figures, normalised_answer, pooled_depth_figures
from perceptio.evaluation.segmentation_metrics import ciou, mask_intersection_union


MASK_THRESHOLDS = np.linspace(0.05, 0.95, 19)


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, datasets.DatasetDict]:
    """The arguments and the loaded splits (the folder must hold validation and test)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a saved synthetic dataset with validation and test splits")
    parser.add_argument("--summary", help="a synthetic_summary.json of a model evaluated on the same test split")
    arguments = parser.parse_args(argv)
    splits = datasets.load_from_disk(arguments.data)
    missing = {"validation", "test"} - set(splits)
    if missing:
        parser.error(f"{arguments.data} has no {sorted(missing)} split; pass a recipe's output_dir/dataset.")
    if arguments.summary is not None and not Path(arguments.summary).is_file():
        parser.error(f"--summary {arguments.summary} is not a file.")
    return arguments, splits


def normalised_depth(row: dict) -> np.ndarray:
    """The row's exact depth as the evaluation compares it: normalised inverse depth."""
    return normalised_inverse_depth(sample_spatial_targets(row).inverse_depth)


def depth_prior_figures(validation: datasets.Dataset, test: datasets.Dataset) -> dict[str, Any]:
    """AbsRel, delta < 1.25 and pair-order accuracy of the mean validation depth map on the test depth blocks."""
    prior = np.mean([normalised_depth(row) for row in validation], axis=0)
    return pooled_depth_figures(
        [depth_figures(prior, normalised_depth(row)) for row in test if row["use_depth_block"]]
    )


def target_mask(row: dict) -> np.ndarray:
    return sample_spatial_targets(row).masks.any(axis=0)


def referring_prior_ciou(validation: datasets.Dataset, test: datasets.Dataset) -> float:
    """cIoU on the test split of the mean validation mask, at its best validation threshold."""
    referring = [row for row in validation if row["task"] == "referring"]
    mean_mask = np.mean([target_mask(row) for row in referring], axis=0)

    def score(rows, threshold: float) -> float:
        counts = [mask_intersection_union(mean_mask > threshold, target_mask(row)) for row in rows]
        return ciou([count[0] for count in counts], [count[1] for count in counts])

    threshold = max(MASK_THRESHOLDS, key=lambda value: score(referring, value))
    return score([row for row in test if row["task"] == "referring"], threshold)


def answer_key(row: dict) -> str:
    """Relative-depth questions are keyed by point count, VQA by task."""
    if row["task"] == "relative_depth":
        return f"relative_depth/{json.loads(row['meta'])['num_points']}"
    return row["task"]


def majority_answer_accuracy(validation: datasets.Dataset, test: datasets.Dataset) -> dict[str, float]:
    """Accuracy on the test split of each key's most frequent validation answer (keys unseen there score 0)."""
    answers: dict[str, Counter] = {}
    for row in validation:
        if row["task"] != "referring":
            answers.setdefault(answer_key(row), Counter())[normalised_answer(row["answer"])] += 1
    correct: dict[str, list[bool]] = {}
    for row in test:
        if row["task"] == "referring":
            continue
        key = answer_key(row)
        guess = answers[key].most_common(1)[0][0] if key in answers else None
        correct.setdefault(key, []).append(guess == normalised_answer(row["answer"]))
    return {key: float(np.mean(values)) for key, values in sorted(correct.items())}


def lowest_marker_accuracy(test: datasets.Dataset) -> dict[str, float]:
    """Accuracy per point count of answering the marker drawn lowest in the image."""
    correct: dict[str, list[bool]] = {}
    for row in test:
        if row["task"] != "relative_depth":
            continue
        meta = json.loads(row["meta"])
        lowest = int(np.argmax([point[1] for point in meta["points"]]))
        correct.setdefault(f"relative_depth/{meta['num_points']}", []).append(
            meta["letters"][lowest] == meta["answer_letter"]
        )
    return {key: float(np.mean(values)) for key, values in sorted(correct.items())}


def model_figures(summary: dict) -> dict[str, float]:
    """The same figures read from a `synthetic_summary.json`."""
    figures = {
        "referring cIoU": summary["referring"]["ciou"],
        "referring cIoU, another row's sentence": summary["referring"].get("swapped_expression_ciou"),
        "depth AbsRel": summary["depth"]["abs_rel"],
        "depth delta1": summary["depth"]["delta1"],
        "depth pair-order": summary["depth"]["pair_order_accuracy"],
    }
    for count, entry in summary["relative_depth"]["by_num_points"].items():
        figures[f"relative_depth/{count}"] = entry["accuracy"]
    for task, entry in summary["vqa"]["by_task"].items():
        figures[task] = entry["accuracy"]
    return figures


def model_image_control(summary: dict) -> dict[str, str]:
    """Cells "own / another image" of the summary's swapped-image accuracies, keyed by answer task."""
    return {
        task: f"{control['accuracy_own']:.3f} / {control['accuracy_swapped']:.3f}"
        for task, control in summary.get("swapped_image", {}).items()
        if control["accuracy_own"] is not None
    }


def main(argv: list[str] | None = None) -> int:
    arguments, splits = parse_arguments(argv)
    validation, test = splits["validation"], splits["test"]
    depth = depth_prior_figures(validation, test)
    blind = {
        "referring cIoU": referring_prior_ciou(validation, test),
        "depth AbsRel": depth["abs_rel"],
        "depth delta1": depth["delta1"],
        "depth pair-order": depth["pair_order_accuracy"],
        **majority_answer_accuracy(validation, test),
    }
    heuristic = lowest_marker_accuracy(test)
    summary = json.loads(Path(arguments.summary).read_text()) if arguments.summary else {}
    model = model_figures(summary) if summary else {}
    image_control = model_image_control(summary)
    print("| figure | image-blind prior | lowest marker | model | model, own / another image |\n|---|---|---|---|---|")
    names = [*blind, *(name for name in model if name not in blind)]
    for name in [*names, *(name for name in image_control if name not in names)]:
        cells = [
            f"{blind[name]:.3f}" if name in blind else "-",
            f"{heuristic[name]:.3f}" if name in heuristic else "-",
        ]
        cells.append(f"{model[name]:.3f}" if model.get(name) is not None else "-")
        cells.append(image_control.get(name, "-"))
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
