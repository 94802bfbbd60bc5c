"""The project's synthetic test split: referring cIoU/gIoU, depth-block accuracy, relative-depth accuracy.

Reads a split of `perceptio.data.synthetic_dataset.build_synthetic_dataset` (a `save_to_disk` folder or the
`DatasetDict` itself, split "test" by default). Each row is asked its own `prompt`, then:

- "referring" rows: the union of the predicted masks against the union of the ground-truth masks (an object the
  sentence refers to, or several for a plural sentence), pooled into cIoU and gIoU. As a control, each referring
  image is also asked the next referring row's (different) sentence, and that mask is scored against the image's
  own target: `swapped_expression_ciou`. A model that reads the sentence scores lower there; a model that draws the
  same mask whatever the sentence (a foreground mask) scores the same;
- every row whose answer has a depth block: the decoded depth against the ground truth converted to the tokenizer's
  space (relative inverse depth 1/z, min-max normalised per image to [-1, 1], larger = nearer) at the original size.
  RMSE and pair-order accuracy are read in that space, AbsRel and delta < 1.25 after `normalized_to_positive` (the
  [1, 2] shift of `depth_metrics`); AbsRel, RMSE and delta are averaged over images, pair-order pairs are pooled
  (`DEPTH_PAIRS_PER_IMAGE` pairs per image, drawn with seed 0, whose true values differ by more than
  `DEPTH_PAIR_MARGIN`);
- "relative_depth" rows: the strictly parsed letter against the answer, with accuracy per point count.
- "vqa_*" rows (count, colour, shape): exact match of the answer, ignoring case and a final full stop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from ...data.synthetic_dataset import sample_spatial_targets
from ..depth_metrics import abs_rel, delta1, normalized_to_positive, pair_order_counts, rmse
from ..segmentation_metrics import mask_intersection_union
from .choice_scoring import choice_record, choice_summary, choice_summary_by
from .dataset_inputs import decode_rgb_image, load_split, require_columns, rows_without_decoding
from .refcoco import referring_summary
from .resumable_run import ResumableRun, RunSettings

SYNTHETIC_COLUMNS: tuple[str, ...] = ("image", "prompt", "answer", "masks", "depth", "use_depth_block", "task", "meta")
DEPTH_PAIRS_PER_IMAGE = 1000
DEPTH_PAIR_MARGIN = 0.05
DEPTH_PAIR_SEED = 0


def normalised_inverse_depth(inverse_depth: np.ndarray) -> np.ndarray:
    """Min-max normalise a relative inverse depth map to [-1, 1] (a constant map becomes 0), as the tokenizer does."""
    inverse_depth = np.asarray(inverse_depth, dtype=np.float64)
    low, high = float(inverse_depth.min()), float(inverse_depth.max())
    if high - low <= 0:
        return np.zeros_like(inverse_depth)
    return 2 * (inverse_depth - low) / (high - low) - 1


def depth_figures(predicted: np.ndarray, target: np.ndarray) -> dict[str, float | int]:
    """One image's AbsRel, RMSE, delta < 1.25 and pair-order counts (both maps normalised, larger = nearer)."""
    predicted = np.asarray(predicted, dtype=np.float64)
    if predicted.shape != target.shape:
        raise ValueError(f"predicted depth {predicted.shape} and ground truth {target.shape} differ in size.")
    predicted_positive, target_positive = normalized_to_positive(predicted), normalized_to_positive(target)
    correct, counted = pair_order_counts(
        predicted, target, num_pairs=DEPTH_PAIRS_PER_IMAGE, margin=DEPTH_PAIR_MARGIN, seed=DEPTH_PAIR_SEED
    )
    return {
        "abs_rel": abs_rel(predicted_positive, target_positive),
        "rmse": rmse(predicted, target),
        "delta1": delta1(predicted_positive, target_positive),
        "pair_correct": correct,
        "pair_counted": counted,
    }


def normalised_answer(text: str) -> str:
    """A short VQA answer compared case- and punctuation-insensitively ("Red." == "red")."""
    return text.strip().strip(".!").strip().lower()


def vqa_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy of the VQA rows, overall and per task."""
    by_task = {}
    for task in sorted({record["task"] for record in records}):
        rows = [record for record in records if record["task"] == task]
        by_task[task] = {"accuracy": sum(record["correct"] for record in rows) / len(rows), "num_samples": len(rows)}
    accuracy = sum(record["correct"] for record in records) / len(records) if records else None
    return {"accuracy": accuracy, "num_samples": len(records), "by_task": by_task}


def referring_counts(targets, prediction) -> tuple[int, int]:
    """Intersection and union of the union of the predicted masks with the union of the target masks."""
    predicted = np.zeros(targets.inverse_depth.shape, dtype=bool)
    for mask in prediction.masks:
        predicted |= np.asarray(mask) > 0
    return mask_intersection_union(predicted, targets.masks.any(axis=0))


def synthetic_record(index: int, row: dict[str, Any], prediction) -> dict[str, Any]:
    """The JSONL record of one row: what its task scores, plus the depth figures when a depth block was written."""
    task, meta = row["task"], json.loads(row["meta"])
    targets = sample_spatial_targets(row)
    record: dict[str, Any] = {
        "sample_id": str(index),
        "row": index,
        "task": task,
        "prediction": prediction.text,
        "num_masks": len(prediction.masks),
        "use_depth_block": bool(row["use_depth_block"]),
        "has_depth": prediction.depth is not None,
    }
    if task == "referring":
        record["intersection"], record["union"] = referring_counts(targets, prediction)
    if task == "relative_depth":
        record.update(choice_record(str(index), prediction.text, row["answer"], int(meta["num_points"]),
                                    num_points=int(meta["num_points"])))
    if task.startswith("vqa_"):
        record["answer"] = row["answer"]
        record["correct"] = normalised_answer(prediction.text) == normalised_answer(row["answer"])
    if prediction.depth is not None:
        record["depth"] = depth_figures(prediction.depth, normalised_inverse_depth(targets.inverse_depth))
    return record


SWAPPED_SUFFIX = "/swapped"


def swapped_expression_pairs(tasks: Sequence[str], prompts: Sequence[str]) -> list[tuple[int, int]]:
    """(row, partner) for each referring row: the partner is the next referring row (cyclically) with another
    sentence; rows whose sentence no other referring row differs from get none."""
    referring = [index for index, task in enumerate(tasks) if task == "referring"]
    pairs = []
    for position, index in enumerate(referring):
        following = referring[position + 1 :] + referring[:position]
        partner = next((other for other in following if prompts[other] != prompts[index]), None)
        if partner is not None:
            pairs.append((index, partner))
    return pairs


def swapped_expression_record(index: int, row: dict[str, Any], partner_prompt: str, prediction) -> dict[str, Any]:
    """The record of the mask predicted for another row's sentence on this row's image, against this row's target."""
    intersection, union = referring_counts(sample_spatial_targets(row), prediction)
    return {
        "sample_id": f"{index}{SWAPPED_SUFFIX}",
        "row": index,
        "task": "referring_swapped",
        "prompt": partner_prompt,
        "prediction": prediction.text,
        "num_masks": len(prediction.masks),
        "intersection": intersection,
        "union": union,
    }


def pooled_depth_figures(with_depth: Sequence[dict[str, float | int]]) -> dict[str, Any]:
    """`depth_figures` of many images: AbsRel, RMSE and delta averaged over images, pair-order pairs pooled."""
    pairs_counted = sum(figures["pair_counted"] for figures in with_depth)
    return {
        "num_maps": len(with_depth),
        "abs_rel": float(np.mean([figures["abs_rel"] for figures in with_depth])) if with_depth else None,
        "rmse": float(np.mean([figures["rmse"] for figures in with_depth])) if with_depth else None,
        "delta1": float(np.mean([figures["delta1"] for figures in with_depth])) if with_depth else None,
        "pair_order_accuracy": (
            sum(figures["pair_correct"] for figures in with_depth) / pairs_counted if pairs_counted else None
        ),
        "num_pairs": pairs_counted,
    }


def synthetic_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Referring cIoU/gIoU (and the swapped-sentence control), depth figures over images with a depth block,
    relative-depth accuracy by point count, VQA accuracy."""
    swapped = [record for record in records if record["task"] == "referring_swapped"]
    records = [record for record in records if record["task"] != "referring_swapped"]
    referring = [record for record in records if record["task"] == "referring"]
    relative_depth = [record for record in records if record["task"] == "relative_depth"]
    depth = {
        **pooled_depth_figures([record["depth"] for record in records if "depth" in record]),
        "num_missing": sum(record["use_depth_block"] and not record["has_depth"] for record in records),
    }
    by_points = choice_summary_by(relative_depth, "num_points")
    return {
        "num_samples": len(records),
        "referring": {**referring_summary(referring), "swapped_expression_ciou": referring_summary(swapped)["ciou"]},
        "depth": depth,
        "relative_depth": {**choice_summary(relative_depth), "by_num_points": by_points},
        "vqa": vqa_summary([record for record in records if record["task"].startswith("vqa_")]),
    }


def run_synthetic(
    model,
    processor,
    data: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    settings: RunSettings,
    split: str | None = "test",
) -> dict[str, Any]:
    """Evaluate on a synthetic split; returns (and writes) the summary (see the module docstring)."""
    dataset = load_split(data, split)
    require_columns(dataset, SYNTHETIC_COLUMNS, "synthetic scenes")
    dataset = rows_without_decoding(dataset, ["image"])
    run = ResumableRun("synthetic", settings)
    num_rows = settings.selected_count(len(dataset))
    selected_ids = [str(index) for index in range(num_rows)]

    def prepare(index: int):
        row = dataset[index]
        return decode_rgb_image(row["image"], f"row {index}"), row["prompt"], (index, row)

    def prepare_swapped(pair: tuple[int, int]):
        index, partner = pair
        row, partner_prompt = dataset[index], dataset[partner]["prompt"]
        return decode_rgb_image(row["image"], f"row {index}"), partner_prompt, (index, row, partner_prompt)

    work = [(sample_id, int(sample_id)) for sample_id in selected_ids]
    for (index, row), prediction in run.predict_pending(model, processor, work, prepare, "sample"):
        run.add(synthetic_record(index, row, prediction))
    selected = dataset.select(range(num_rows))
    pairs = swapped_expression_pairs(selected["task"], selected["prompt"])
    swapped_work = [(f"{index}{SWAPPED_SUFFIX}", (index, partner)) for index, partner in pairs]
    for (index, row, partner_prompt), prediction in run.predict_pending(
        model, processor, swapped_work, prepare_swapped, "swapped-sentence sample"
    ):
        run.add(swapped_expression_record(index, row, partner_prompt, prediction))
    all_ids = selected_ids + [sample_id for sample_id, _ in swapped_work]
    return run.finish(synthetic_summary(run.selected_records(all_ids)))
