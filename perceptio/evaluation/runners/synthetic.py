"""The project's synthetic test split: referring cIoU/gIoU, depth-block accuracy, relative-depth accuracy.

Reads a split of `perceptio.data.synthetic_dataset.build_synthetic_dataset` (a `save_to_disk` folder or the
`DatasetDict` itself, split "test" by default). Each row is asked its own `prompt`, then:

- "referring" rows: the union of the predicted masks against the union of the ground-truth masks (an object the
  sentence refers to, or several for a plural sentence), pooled into cIoU and gIoU. As a control, each referring
  image is also asked the next referring row's (different) sentence, and that mask is scored against the image's
  own target: `swapped_expression_ciou`. A model that reads the sentence scores lower there; a model that draws the
  same mask whatever the sentence (a foreground mask) scores the same. `paired_ciou_control` adds bootstrap
  standard errors of the cIoU and of the own sentence's margin over the swapped one (rows resampled in pairs), and
  `follows_sentence`: that margin exceeds two of its standard errors. `by_kind` gives the figures per kind of
  expression (the row's `meta` "kind": attributes, plural, conjunction, superlative, relation);
- every row whose answer has a depth block: the decoded depth against the ground truth converted to the tokenizer's
  space (relative inverse depth 1/z, min-max normalised per image to [-1, 1], larger = nearer) at the original size.
  RMSE and pair-order accuracy are read in that space, AbsRel and delta < 1.25 after `normalized_to_positive` (the
  [1, 2] shift of `depth_metrics`); AbsRel, RMSE and delta are averaged over images, pair-order pairs are pooled
  (`DEPTH_PAIRS_PER_IMAGE` pairs per image, drawn with seed 0, whose true values differ by more than
  `DEPTH_PAIR_MARGIN`);
- "relative_depth" rows: the strictly parsed letter against the answer, with accuracy per point count.
- "vqa_*" rows (count, colour, shape): exact match of the answer, ignoring case and a final full stop.

Whether the model reads the image is measured by asking each answer row (`ANSWER_TASKS`) its own question on a
partner row's image (`swapped_image_pairs`: the next row of the same task, and for relative depth of the same point
count so the lettered choices stay valid, whose answer differs, since an image with the same answer tests nothing).
Per task the summary's `swapped_image` section gives the accuracy against the row's own answer and the teacher-forced
loss of that answer (`answer_scoring.answer_losses`; for a row that asks for a depth block, after the block of its
own depth both ways, as in training), with the own image and with the partner's, each with its
standard error, the paired margins and `reads_image`: the own image beats the partner's by more than two standard
errors of the paired accuracy difference. A model that ignores the image answers the same both ways. The depth block
written on the partner's image is scored against the row's own ground truth (`depth_other_image`) beside the row's own
block (`depth_own_image`, the same rows): the same figures both ways for a model that ignores the image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from ...data.synthetic_dataset import sample_spatial_targets
from ..depth_metrics import abs_rel, delta1, normalised_inverse_depth, normalized_to_positive, pair_order_counts, rmse
from ..segmentation_metrics import EMPTY_SAMPLE_IOU, ciou, mask_intersection_union
from .answer_scoring import answer_losses
from .choice_scoring import choice_record, choice_summary, choice_summary_by
from .dataset_inputs import decode_rgb_image, load_split, require_columns, rows_without_decoding
from .refcoco import referring_summary
from .resumable_run import ResumableRun, RunSettings, batches


SYNTHETIC_COLUMNS: tuple[str, ...] = ("image", "prompt", "answer", "masks", "depth", "use_depth_block", "task", "meta")
DEPTH_PAIRS_PER_IMAGE = 1000
DEPTH_PAIR_MARGIN = 0.05
DEPTH_PAIR_SEED = 0
# The tasks answered in text, whose answers the swapped-image control scores.
ANSWER_TASKS: tuple[str, ...] = ("vqa_colour", "vqa_shape", "vqa_count", "relative_depth")
# The swapped-image control calls the model reading the image when the own image wins by more than this many SEs.
READS_IMAGE_STANDARD_ERRORS = 2.0
# The referring cIoU's bootstrap: resamples of the rows, drawn from a fixed seed so that a rerun reports the same SEs.
CIOU_BOOTSTRAP_RESAMPLES = 1000
CIOU_BOOTSTRAP_SEED = 0


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
    task = row["task"]
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
        record["expression_kind"] = json.loads(row["meta"]).get("kind")
    if task in ANSWER_TASKS:
        record.update(answer_fields(record["sample_id"], row, prediction.text))
    if prediction.depth is not None:
        record["depth"] = depth_figures(prediction.depth, normalised_inverse_depth(targets.inverse_depth))
    return record


def answer_fields(sample_id: str, row: dict[str, Any], text: str) -> dict[str, Any]:
    """How an answer row's `text` scores: the strictly parsed letter for relative depth, exact match for VQA."""
    if row["task"] == "relative_depth":
        num_points = int(json.loads(row["meta"])["num_points"])
        return choice_record(sample_id, text, row["answer"], num_points, num_points=num_points)
    return {"answer": row["answer"], "correct": normalised_answer(text) == normalised_answer(row["answer"])}


SWAPPED_SUFFIX = "/swapped"


def cyclic_partners(members: Sequence[int], values: Sequence[str]) -> list[tuple[int, int]]:
    """(row, partner) for each row of `members`: the next member after it (cyclically) whose value in `values`
    differs; a row that every other member shares its value with gets none."""
    pairs = []
    for position, index in enumerate(members):
        following = [*members[position + 1 :], *members[:position]]
        partner = next((other for other in following if values[other] != values[index]), None)
        if partner is not None:
            pairs.append((index, partner))
    return pairs


def swapped_expression_pairs(tasks: Sequence[str], prompts: Sequence[str]) -> list[tuple[int, int]]:
    """(row, partner) for each referring row: the partner is the next referring row (cyclically) with another
    sentence; rows whose sentence no other referring row differs from get none."""
    return cyclic_partners([index for index, task in enumerate(tasks) if task == "referring"], prompts)


def swapped_image_pairs(
    tasks: Sequence[str], answers: Sequence[str], num_points: Sequence[int | None]
) -> list[tuple[int, int]]:
    """(row, partner) for each answer row, in row order: the partner is the next row (cyclically) of the same task,
    for relative depth also of the same point count (its markers are drawn on the image, so the question's choices
    must stay valid), whose normalised answer differs; a row that no such row exists for gets none.

    `num_points` is each row's point count (read for relative-depth rows only).
    """
    if not len(tasks) == len(answers) == len(num_points):
        raise ValueError(
            "tasks, answers and num_points must be of one length; "
            f"got {len(tasks)}, {len(answers)}, {len(num_points)}."
        )
    groups: dict[tuple[str, int | None], list[int]] = {}
    for index, task in enumerate(tasks):
        if task in ANSWER_TASKS:
            groups.setdefault((task, num_points[index] if task == "relative_depth" else None), []).append(index)
    normalised = [normalised_answer(answer) for answer in answers]
    return sorted(pair for members in groups.values() for pair in cyclic_partners(members, normalised))


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


SWAPPED_IMAGE_SUFFIX = "/swapped_image"


def answer_sample(row: dict[str, Any], image) -> dict[str, Any]:
    """The row's question and answer on `image`, as `answer_losses` scores them: without masks, and for a row that
    asks for a depth block (every relative-depth row) after the block of the row's own depth, as in training. The
    block is the same whichever image is shown, so only the image can make the two losses of the control differ."""
    return {
        "image": image,
        "prompt": row["prompt"],
        "answer": row["answer"],
        "use_depth_block": bool(row["use_depth_block"]),
        "depth": row["depth"],
    }


def swapped_image_record(
    index: int, row: dict[str, Any], partner: int, prediction, loss_own: float, loss_swapped: float
) -> dict[str, Any]:
    """The record of this row's question asked on the partner's image: the answer against this row's answer, the
    teacher-forced loss of that answer on both images, and the depth block (if written) against this row's depth."""
    sample_id = f"{index}{SWAPPED_IMAGE_SUFFIX}"
    record: dict[str, Any] = {
        "sample_id": sample_id,
        "row": index,
        "partner": partner,
        "task": "swapped_image",
        "question_task": row["task"],
        **answer_fields(sample_id, row, prediction.text),
        "prediction": prediction.text,
        "loss_own": loss_own,
        "loss_swapped": loss_swapped,
    }
    if prediction.depth is not None:
        inverse_depth = sample_spatial_targets(row).inverse_depth
        record["depth"] = depth_figures(prediction.depth, normalised_inverse_depth(inverse_depth))
    return record


def mean_and_standard_error(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The mean of per-sample values and its standard error (sample standard deviation / sqrt(n)); the mean is None
    without values, the standard error below two."""
    if not values:
        return None, None
    array = np.asarray(values, dtype=np.float64)
    error = float(array.std(ddof=1) / np.sqrt(len(array))) if len(array) > 1 else None
    return float(array.mean()), error


def paired_image_control(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Accuracy and answer loss of (own record, swapped-image record) pairs on the own and the partner's image, each
    with its standard error; the margins (own better: positive) with the standard error of the paired differences;
    `reads_image` (None below two pairs)."""
    own_correct = [float(own["correct"]) for own, _ in pairs]
    swapped_correct = [float(swapped["correct"]) for _, swapped in pairs]
    figures: dict[str, Any] = {"num_samples": len(pairs)}
    for name, values in (
        ("accuracy_own", own_correct),
        ("accuracy_swapped", swapped_correct),
        ("accuracy_margin", [own - swapped for own, swapped in zip(own_correct, swapped_correct)]),
        ("loss_own", [swapped["loss_own"] for _, swapped in pairs]),
        ("loss_swapped", [swapped["loss_swapped"] for _, swapped in pairs]),
        ("loss_margin", [swapped["loss_swapped"] - swapped["loss_own"] for _, swapped in pairs]),
    ):
        figures[name], figures[f"{name}_se"] = mean_and_standard_error(values)
    margin, margin_se = figures["accuracy_margin"], figures["accuracy_margin_se"]
    figures["reads_image"] = None if margin_se is None else margin > READS_IMAGE_STANDARD_ERRORS * margin_se
    return figures


def count_arrays(records: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The records' intersection and union counts, as two float arrays."""
    intersections = np.array([record["intersection"] for record in records], dtype=np.float64)
    return intersections, np.array([record["union"] for record in records], dtype=np.float64)


def resampled_cious(intersections: np.ndarray, unions: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """The cIoU of each bootstrap resample (each row of `resamples` indexes the samples); a resample whose unions sum
    to 0 scores `EMPTY_SAMPLE_IOU`, as `ciou` does."""
    total_intersection = intersections[resamples].sum(axis=1)
    total_union = unions[resamples].sum(axis=1)
    empty = np.full(total_union.shape, EMPTY_SAMPLE_IOU)
    return np.divide(total_intersection, total_union, out=empty, where=total_union > 0)


def paired_ciou_control(
    own_records: Sequence[dict[str, Any]], swapped_records: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Bootstrap standard errors of the referring cIoU (`ciou_se`, over every own record, as `ciou` is) and of the
    margin of the own sentence's cIoU over the swapped sentence's on the rows that have both
    (`swapped_expression_margin`, paired rows resampled together), and `follows_sentence`: the margin exceeds
    `READS_IMAGE_STANDARD_ERRORS` SEs. SEs and `follows_sentence` are None below two rows (pairs)."""
    generator = np.random.default_rng(CIOU_BOOTSTRAP_SEED)

    def resamples(num_samples: int) -> np.ndarray:
        return generator.integers(0, num_samples, size=(CIOU_BOOTSTRAP_RESAMPLES, num_samples))

    ciou_se = None
    if len(own_records) > 1:
        ciou_se = float(resampled_cious(*count_arrays(own_records), resamples(len(own_records))).std(ddof=1))
    own_by_row = {record["row"]: record for record in own_records}
    pairs = [(own_by_row[record["row"]], record) for record in swapped_records if record["row"] in own_by_row]
    own, swapped = count_arrays([own_record for own_record, _ in pairs]), count_arrays([record for _, record in pairs])
    margin = ciou(*own) - ciou(*swapped) if pairs else None
    margin_se = None
    if len(pairs) > 1:
        indices = resamples(len(pairs))
        margin_se = float((resampled_cious(*own, indices) - resampled_cious(*swapped, indices)).std(ddof=1))
    return {
        "ciou_se": ciou_se,
        "swapped_expression_margin": margin,
        "swapped_expression_margin_se": margin_se,
        "follows_sentence": None if margin_se is None else margin > READS_IMAGE_STANDARD_ERRORS * margin_se,
    }


def swapped_image_summary(records: Sequence[dict[str, Any]], swapped: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`swapped_image` (per answer task present in `records`, `paired_image_control`), and the pooled depth figures
    of the blocks written on the partner's image (`depth_other_image`) and on the own image (`depth_own_image`),
    both against the own image's depth, over the rows that have both blocks."""
    own = {record["row"]: record for record in records}
    pairs = [(own[record["row"]], record) for record in swapped if record["row"] in own]
    tasks = [task for task in ANSWER_TASKS if any(record["task"] == task for record in records)]
    with_depth = [(own_record, record) for own_record, record in pairs if "depth" in own_record and "depth" in record]
    return {
        "swapped_image": {
            task: paired_image_control([pair for pair in pairs if pair[1]["question_task"] == task]) for task in tasks
        },
        "depth_other_image": pooled_depth_figures([record["depth"] for _, record in with_depth]),
        "depth_own_image": pooled_depth_figures([own_record["depth"] for own_record, _ in with_depth]),
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


def referring_summary_by_kind(referring: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The referring figures per kind of expression (attributes, plural, conjunction, superlative, relation), so a
    cIoU held down by the expressions that need depth or layout, not by the attributes, shows which."""
    kinds = sorted({record["expression_kind"] for record in referring if record.get("expression_kind")})
    return {
        kind: referring_summary([record for record in referring if record.get("expression_kind") == kind])
        for kind in kinds
    }


def synthetic_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Referring cIoU/gIoU (and the swapped-sentence control), depth figures over images with a depth block,
    relative-depth accuracy by point count, VQA accuracy, and the swapped-image control."""
    swapped = [record for record in records if record["task"] == "referring_swapped"]
    swapped_image = [record for record in records if record["task"] == "swapped_image"]
    records = [record for record in records if record["task"] not in ("referring_swapped", "swapped_image")]
    referring = [record for record in records if record["task"] == "referring"]
    relative_depth = [record for record in records if record["task"] == "relative_depth"]
    depth = {
        **pooled_depth_figures([record["depth"] for record in records if "depth" in record]),
        "num_missing": sum(record["use_depth_block"] and not record["has_depth"] for record in records),
    }
    by_points = choice_summary_by(relative_depth, "num_points")
    return {
        "num_samples": len(records),
        "referring": {
            **referring_summary(referring),
            "swapped_expression_ciou": referring_summary(swapped)["ciou"],
            **paired_ciou_control(referring, swapped),
            "by_kind": referring_summary_by_kind(referring),
        },
        "depth": depth,
        "relative_depth": {**choice_summary(relative_depth), "by_num_points": by_points},
        "vqa": vqa_summary([record for record in records if record["task"].startswith("vqa_")]),
        **swapped_image_summary(records, swapped_image),
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

    def prepare_swapped_image(pair: tuple[int, int]):
        index, partner = pair
        row = dataset[index]
        own_image = decode_rgb_image(row["image"], f"row {index}")
        partner_image = decode_rgb_image(dataset[partner]["image"], f"row {partner}")
        return partner_image, row["prompt"], (index, row, partner, own_image, partner_image)

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
    num_points = [json.loads(meta).get("num_points") for meta in selected["meta"]]
    image_pairs = swapped_image_pairs(selected["task"], selected["answer"], num_points)
    image_work = [(f"{index}{SWAPPED_IMAGE_SUFFIX}", (index, partner)) for index, partner in image_pairs]
    predicted = run.predict_pending(model, processor, image_work, prepare_swapped_image, "swapped-image sample")
    for chunk in batches(predicted, settings.batch_size):
        samples = [answer_sample(row, image) for (_, row, _, own, other), _ in chunk for image in (own, other)]
        losses = answer_losses(model, processor, samples, settings.batch_size)
        for position, ((index, row, partner, _, _), prediction) in enumerate(chunk):
            loss_own, loss_swapped = losses[2 * position : 2 * position + 2]
            run.add(swapped_image_record(index, row, partner, prediction, loss_own, loss_swapped))
    all_ids = selected_ids + [sample_id for sample_id, _ in swapped_work + image_work]
    return run.finish(synthetic_summary(run.selected_records(all_ids)))
