"""RefCOCO / RefCOCO+ / RefCOCOg referring segmentation: cIoU and gIoU of every sentence's mask.

Two dataset layouts are read (a `datasets` split: a `save_to_disk` folder, a `load_dataset` name or local path):

- one row per object (lmms-lab/RefCOCO, RefCOCO+, RefCOCOg): `image` (embedded), `segmentation` (one COCO polygon,
  a flat [x0, y0, x1, y1, ...] list) and `answer` (the object's referring sentences, a list of str or one str);
- one row per image: `image` and `references`, a list with one entry per referred object, each a dict with
  `sentences` (str, or dicts with a `sent` field as in the REFER annotations) and `segmentation` (COCO polygons or
  RLE, decoded with pycocotools).

Every sentence is one sample: the model is asked `prompt_template.format(sentence=...)` (default
"Please segment {sentence}.") and the union of the masks of its `[SEG]`s (empty when it writes none) is scored
against the object's binarised ground-truth mask at the original image size. All sentences of an image go into one
`predict` call, in which the SAM2 image encoder runs once for the image (`predict_masks` encodes each distinct image once).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from PIL import Image

from .. import REFCOCO_TASKS
from ..segmentation_metrics import ReferringSegmentationScore, mask_intersection_union
from .coco_masks import segmentation_to_mask
from .dataset_inputs import decode_rgb_image, load_split, require_columns, rows_without_decoding
from .resumable_run import BadSampleError, ResumableRun, RunSettings


DEFAULT_REFERRING_PROMPT = "Please segment {sentence}."
PER_OBJECT_COLUMNS: tuple[str, ...] = ("image", "segmentation", "answer")
PER_IMAGE_COLUMNS: tuple[str, ...] = ("image", "references")


@dataclass
class ReferringQuery:
    """One sentence to segment: its id, the text, the object's ground-truth mask and where it came from."""

    sample_id: str
    row: int
    sentence: str
    target: np.ndarray


@dataclass
class ImageQueries:
    """The image of one dataset row and its pending sentences."""

    row: int
    image: Image.Image
    queries: list[ReferringQuery]


def referring_layout(split: datasets.Dataset) -> str:
    """ "per_image" or "per_object", from the columns; ValueError naming the columns of both when neither fits."""
    if "references" in split.column_names:
        require_columns(split, PER_IMAGE_COLUMNS, "one-row-per-image RefCOCO")
        return "per_image"
    require_columns(split, PER_OBJECT_COLUMNS, "one-row-per-object RefCOCO (or give a `references` column)")
    return "per_object"


def _sentence_text(sentence: Any, where: str) -> str:
    text = sentence.get("sent", sentence.get("raw")) if isinstance(sentence, dict) else sentence
    if not isinstance(text, str) or not text.strip():
        raise BadSampleError(
            f"{where}: a sentence must be a non-empty string (or a dict with 'sent'); got {sentence!r}."
        )
    return text.strip()


def _sentences(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, (str, dict)) else list(value or [])
    if not items:
        raise BadSampleError(f"{where}: the object has no referring sentence.")
    return [_sentence_text(item, where) for item in items]


def _references(row: dict, layout: str, where: str) -> list[tuple[list[str], Any]]:
    """(sentences, segmentation) of each object of a row."""
    if layout == "per_object":
        return [(_sentences(row["answer"], where), row["segmentation"])]
    references = row["references"]
    if not isinstance(references, Sequence) or isinstance(references, (str, dict)) or not references:
        raise BadSampleError(f"{where}: `references` must be a non-empty list of {{sentences, segmentation}} dicts.")
    parsed = []
    for index, reference in enumerate(references):
        if not isinstance(reference, dict) or not {"sentences", "segmentation"} <= set(reference):
            raise BadSampleError(f"{where}, reference {index}: needs the keys 'sentences' and 'segmentation'.")
        parsed.append((_sentences(reference["sentences"], f"{where}, reference {index}"), reference["segmentation"]))
    return parsed


def _image_queries(row: dict, index: int, layout: str, run: ResumableRun, selected_ids: list[str]) -> ImageQueries:
    """Decode one row: its image and, for each of its sentences not scored yet, the query with its target mask."""
    where = f"row {index}"
    image = decode_rgb_image(row["image"], where)
    queries = []
    for reference_index, (sentences, segmentation) in enumerate(_references(row, layout, where)):
        try:
            target = segmentation_to_mask(segmentation, image.height, image.width)
        except ValueError as error:
            raise BadSampleError(f"{where}, reference {reference_index}: bad segmentation ({error}).") from error
        for sentence_index, sentence in enumerate(sentences):
            sample_id = f"{index}:{reference_index}:{sentence_index}"
            selected_ids.append(sample_id)
            if not run.is_done(sample_id):
                queries.append(ReferringQuery(sample_id, index, sentence, target))
    return ImageQueries(index, image, queries)


def _image_batches(groups: Iterator[ImageQueries], batch_size: int) -> Iterator[list[ImageQueries]]:
    """Whole images per batch, up to `batch_size` sentences; an image with more sentences is a batch of its own."""
    batch: list[ImageQueries] = []
    size = 0
    for group in groups:
        if batch and size + len(group.queries) > batch_size:
            yield batch
            batch, size = [], 0
        batch.append(group)
        size += len(group.queries)
    if batch:
        yield batch


def referring_record(query: ReferringQuery, prediction) -> dict[str, Any]:
    """The JSONL record of one sentence: the union of its predicted masks scored against the target."""
    predicted = np.zeros(query.target.shape, dtype=bool)
    for mask in prediction.masks:
        predicted |= _predicted_mask_at(mask, query.target.shape)
    intersection, union = mask_intersection_union(predicted, query.target)
    return {
        "sample_id": query.sample_id,
        "row": query.row,
        "sentence": query.sentence,
        "prediction": prediction.text,
        "num_masks": len(prediction.masks),
        "intersection": intersection,
        "union": union,
        "target_area": int(query.target.sum()),
    }


def _predicted_mask_at(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A predicted mask as bool; `predict` returns masks at the original size, so another size is a bug upstream."""
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(
            f"A predicted mask has shape {mask.shape} but the image is {tuple(shape)}; predict must return masks "
            "at the original image size."
        )
    return mask > 0


def referring_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """cIoU, gIoU and counts of the scored sentences (the records' intersection/union counts)."""
    if not records:
        return {"ciou": None, "giou": None, "num_samples": 0, "num_images": 0, "num_without_mask": 0}
    score = ReferringSegmentationScore()
    for record in records:
        score.add_counts(record["intersection"], record["union"])
    return {
        **score.compute(),
        "num_images": len({record["row"] for record in records}),
        "num_without_mask": sum(record["num_masks"] == 0 for record in records),
    }


def run_refcoco(
    model,
    processor,
    data: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    settings: RunSettings,
    split: str | None = None,
    task: str = "refcoco",
    prompt_template: str = DEFAULT_REFERRING_PROMPT,
) -> dict[str, Any]:
    """Evaluate referring segmentation on a RefCOCO-family split; returns (and writes) the summary.

    Args:
        model, processor: a Perceptio model and its processor.
        data: the dataset (see the module docstring for the two layouts).
        settings: output folder, limit (in dataset rows), batch size (sentences per call), skip_bad, generation.
        split: the split to read ("val", "testA", ...); optional when the source has one split.
        task: "refcoco", "refcoco+" or "refcocog" (names the output files).
        prompt_template: the prompt, with a `{sentence}` field.
    """
    if task not in REFCOCO_TASKS:
        raise ValueError(f"task must be one of {REFCOCO_TASKS}; got {task!r}.")
    if not isinstance(prompt_template, str) or "{sentence}" not in prompt_template:
        raise ValueError(f"prompt_template must be a str with a {{sentence}} field; got {prompt_template!r}.")
    dataset = load_split(data, split)
    layout = referring_layout(dataset)
    dataset = rows_without_decoding(dataset, ["image"])
    run = ResumableRun(task, settings)
    num_rows = settings.selected_count(len(dataset))
    selected_ids: list[str] = []
    progress = run.progress(num_rows, unit="image")

    def readable_rows() -> Iterator[ImageQueries]:
        for index in range(num_rows):
            try:
                group = _image_queries(dataset[index], index, layout, run, selected_ids)
            except BadSampleError as error:
                run.skip(error)
                progress.update(1)
                continue
            if not group.queries:
                progress.update(1)
                continue
            yield group

    for batch in _image_batches(readable_rows(), settings.batch_size):
        queries = [query for group in batch for query in group.queries]
        images = [group.image for group in batch for _ in group.queries]
        prompts = [prompt_template.format(sentence=query.sentence) for query in queries]
        predictions = model.predict(list(images), list(prompts), processor=processor, **settings.predict_kwargs())
        for query, prediction in zip(queries, predictions):
            run.add(referring_record(query, prediction))
        progress.update(len(batch))
    progress.close()
    return run.finish({"layout": layout, **referring_summary(run.selected_records(selected_ids))})
