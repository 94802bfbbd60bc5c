"""Where a checkpoint's referring masks land, per kind of expression: on the referred object, on another object that
has the attributes the phrase names, on another object, or on no single object.

`perceptio eval synthetic` pools the referring masks into a cIoU per kind of expression; this script says why a kind
scores low. Each referring row of a `build_synthetic_dataset` split is asked its own prompt; its scene is rendered
again from the row's `scene_seed` (and must give the row's image) for every object's mask and attributes. A mask
lands on an object when its IoU with it is at least `--landing-iou`. For expressions of one object the script also
counts the candidates, the scene's objects with the attributes the phrase names ("the cylinder" in "the cylinder
farthest from the camera"), and prints how often its masks that land on a candidate land on the referred one beside
how often a random candidate is the referred one: a kind whose masks land on candidates, but on the referred one no
more often than chance, reads the phrase's attributes and not the rest (depth order for superlatives, layout for
relations).

    python bench/referring_landings.py --model runs/synthetic-tiny/model --data runs/test-1200
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from datasets import load_from_disk
from tqdm.auto import tqdm

from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.data.scene_rendering import render_scene
from perceptio.data.synthetic_tasks import ObjectQuery
from perceptio.evaluation.segmentation_metrics import mask_intersection_union


LANDINGS = ("target", "candidate", "other_object", "no_object")


def mask_iou(first: np.ndarray, second: np.ndarray) -> float:
    """IoU of two boolean masks (0 when both are empty)."""
    intersection, union = mask_intersection_union(first, second)
    return intersection / union if union else 0.0


def landing(predicted: np.ndarray, target_ids: list[int], named: list[dict], scene, landing_iou: float) -> str:
    """Where one predicted mask lands: on the union of the referred objects, else on the object it overlaps most
    (a candidate when it has the named attributes of a one-object phrase), else on no single object."""
    target = scene.instance_masks[target_ids].any(axis=0)
    if mask_iou(predicted, target) >= landing_iou:
        return "target"
    ious = [mask_iou(predicted, mask) for mask in scene.instance_masks]
    best = int(np.argmax(ious))
    if ious[best] < landing_iou:
        return "no_object"
    if len(named) == 1 and ObjectQuery(**named[0]).matches(scene.objects[best]):
        return "candidate"
    return "other_object"


def candidate_count(named: list[dict], scene) -> int | None:
    """The scene's objects with the attributes a one-object phrase names (None for phrases of several objects)."""
    if len(named) != 1:
        return None
    query = ObjectQuery(**named[0])
    return sum(query.matches(scene_object) for scene_object in scene.objects)


def rendered_scene(row: dict[str, Any], index: int):
    """The row's scene rendered again, checked against the row's image."""
    image = np.asarray(row["image"].convert("RGB"))
    scene = render_scene(int(row["scene_seed"]), image.shape[:2])
    if not np.array_equal(scene.image, image):
        raise ValueError(
            f"row {index}: scene_seed {row['scene_seed']} does not render the row's image; was the dataset built by "
            "another version of the renderer?"
        )
    return scene


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind: rows, the share of each landing, and of the masks on a candidate the share on the referred object
    beside the chance that a random candidate of those rows is the referred one."""
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_kind[record["kind"]].append(record)
    summary = {}
    for kind, rows in sorted(by_kind.items()):
        # The masks on a candidate (the referred object is one), and the chance a random candidate is the referred
        # one in those same rows.
        on_candidates = [row for row in rows if row["candidates"] and row["landing"] in ("target", "candidate")]
        summary[kind] = {
            "rows": len(rows),
            **{name: sum(row["landing"] == name for row in rows) / len(rows) for name in LANDINGS},
            "on_a_candidate": len(on_candidates),
            "referred_of_candidates": (
                sum(row["landing"] == "target" for row in on_candidates) / len(on_candidates)
                if on_candidates
                else None
            ),
            "random_candidate": (
                float(np.mean([1 / row["candidates"] for row in on_candidates])) if on_candidates else None
            ),
        }
    return summary


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| kind | rows | on the referred object | on another candidate | on another object | on no single object "
        "| of the masks on a candidate, on the referred one | a random one of their candidates is the referred one |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    for kind, figures in summary.items():
        shares = " | ".join(share(figures[name]) for name in (*LANDINGS, "referred_of_candidates", "random_candidate"))
        lines.append(f"| {kind} | {figures['rows']} | {shares} |")
    return "\n".join(lines)


def referring_landings(model, processor, rows, batch_size: int, max_new_tokens: int, landing_iou: float) -> list:
    """One record per referring row: its kind, where its mask landed, its candidates and its IoU with the target."""
    model.processor = processor
    indices = [index for index, task in enumerate(rows["task"]) if task == "referring"]
    records = []
    for start in tqdm(range(0, len(indices), batch_size), desc="Referring rows", unit="batch"):
        batch = [rows[index] for index in indices[start : start + batch_size]]
        predictions = model.predict(
            [row["image"] for row in batch], [row["prompt"] for row in batch], max_new_tokens=max_new_tokens
        )
        for index, row, prediction in zip(indices[start : start + batch_size], batch, predictions):
            meta, scene = json.loads(row["meta"]), rendered_scene(row, index)
            predicted = np.zeros(scene.image_size, dtype=bool)
            for mask in prediction.masks:
                predicted |= np.asarray(mask) > 0
            target = scene.instance_masks[meta["object_ids"]].any(axis=0)
            records.append(
                {
                    "row": index,
                    "kind": meta["kind"],
                    "landing": landing(predicted, meta["object_ids"], meta["named"], scene, landing_iou),
                    "candidates": candidate_count(meta["named"], scene),
                    "iou": mask_iou(predicted, target),
                }
            )
    return records


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Perceptio checkpoint folder")
    parser.add_argument("--data", required=True, help="a build_synthetic_dataset DatasetDict saved with save_to_disk")
    parser.add_argument("--split", default="test", help="the split whose referring rows are asked (default test)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="room for the [SEG] and a depth block")
    parser.add_argument("--landing-iou", type=float, default=0.5, help="IoU at which a mask is on an object")
    parser.add_argument("--output", help="also write the records and the summary to this JSON file")
    arguments = parser.parse_args(argv)
    if arguments.batch_size < 1 or arguments.max_new_tokens < 1:
        parser.error("--batch-size and --max-new-tokens must be positive.")
    if not 0 < arguments.landing_iou <= 1:
        parser.error(f"--landing-iou must be in (0, 1], got {arguments.landing_iou}.")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        data = load_from_disk(arguments.data)
        if arguments.split not in data:
            raise ValueError(f"{arguments.data} has no split {arguments.split!r}; it has {sorted(data)}.")
        model, processor = load_perceptio_checkpoint(arguments.model)
        records = referring_landings(
            model,
            processor,
            data[arguments.split],
            arguments.batch_size,
            arguments.max_new_tokens,
            arguments.landing_iou,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = summarise(records)
    print(format_table(summary))
    if arguments.output:
        Path(arguments.output).write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
