"""The bookkeeping every benchmark runner shares: settings, a resumable per-sample JSONL, skipped rows, the summary.

A run writes two files into its output folder:

- `<task>_samples.jsonl`: one JSON object per scored sample, appended (and flushed) as soon as it is scored, each
  with a unique `sample_id`. Re-running the same task into the same folder skips the samples already there, so an
  interrupted run resumes where it stopped.
- `<task>_summary.json`: the task's figures, computed from the JSONL records of the samples the run selected (old and
  new alike), plus `num_skipped` and the reason of each skipped row.

A row that cannot be read (an image that fails to decode, a malformed annotation) raises a `BadSampleError` naming
it; with `skip_bad` the run records it in the summary instead and goes on. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


# Generation length when the caller gives none: enough for [SEG]s, a 100-code depth block and a short answer.
DEFAULT_MAX_NEW_TOKENS = 160
DEFAULT_BATCH_SIZE = 8


class BadSampleError(ValueError):
    """A dataset row that cannot be evaluated; the message names the file or row and says what is wrong."""


@dataclass
class RunSettings:
    """How a benchmark run is executed.

    Attributes:
        output_dir: folder of the summary JSON and the per-sample JSONL (created if missing).
        limit: evaluate only the first `limit` rows of the dataset (None: all).
        batch_size: prompts per `model.predict` call.
        skip_bad: count and skip unreadable rows instead of stopping at the first one.
        max_new_tokens: generation length per prompt.
        show_progress: show a tqdm progress bar.
        generate_kwargs: extra arguments for `model.predict` / `generate` (greedy decoding by default).
    """

    output_dir: str | os.PathLike
    limit: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    skip_bad: bool = False
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    show_progress: bool = True
    generate_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.limit is not None and (not _is_int(self.limit) or self.limit <= 0):
            raise ValueError(f"limit must be a positive integer or None (all rows); got {self.limit!r}.")
        if not _is_int(self.batch_size) or self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer; got {self.batch_size!r}.")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}.")
        if not isinstance(self.generate_kwargs, dict):
            raise ValueError(f"generate_kwargs must be a dict; got {type(self.generate_kwargs).__name__}.")
        for reserved in ("max_new_tokens", "processor"):
            if reserved in self.generate_kwargs:
                raise ValueError(f"generate_kwargs must not set {reserved!r}; it is a RunSettings field.")
        self.output_dir = Path(self.output_dir)

    def selected_count(self, num_rows: int) -> int:
        """How many of `num_rows` dataset rows the run evaluates."""
        return num_rows if self.limit is None else min(num_rows, self.limit)

    def predict_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `model.predict`: greedy unless the caller asked otherwise."""
        return {"do_sample": False, **self.generate_kwargs, "max_new_tokens": self.max_new_tokens}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def task_file_stem(task: str) -> str:
    """A file-name-safe form of a task name: "refcoco+" -> "refcoco_plus"."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", task.replace("+", "_plus"))


class ResumableRun:
    """The per-sample JSONL and summary of one task's run (see the module docstring).

    Args:
        task: the task name, used for the file names.
        settings: the run's settings.
    """

    def __init__(self, task: str, settings: RunSettings):
        self.task = task
        self.settings = settings
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        stem = task_file_stem(task)
        self.samples_path = settings.output_dir / f"{stem}_samples.jsonl"
        self.summary_path = settings.output_dir / f"{stem}_summary.json"
        self.records: dict[str, dict[str, Any]] = self._read_existing_records()
        self.skipped: list[dict[str, str]] = []

    def _read_existing_records(self) -> dict[str, dict[str, Any]]:
        """Records of an earlier run; a last line cut off by an interrupted write is dropped and rewritten."""
        if not self.samples_path.exists():
            return {}
        lines = self.samples_path.read_text(encoding="utf-8").splitlines()
        records: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if number == len(lines):
                    # An interrupted run can leave a partial final line; that sample is simply evaluated again.
                    self._rewrite(records.values())
                    break
                raise ValueError(f"{self.samples_path}, line {number}: not valid JSON ({error}).") from error
            if not isinstance(record, dict) or "sample_id" not in record:
                raise ValueError(f"{self.samples_path}, line {number}: a record must be an object with a sample_id.")
            records[str(record["sample_id"])] = record
        return records

    def _rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        with self.samples_path.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")

    def is_done(self, sample_id: str) -> bool:
        """Whether `sample_id` was already scored (by this or an earlier run)."""
        return str(sample_id) in self.records

    def add(self, record: dict[str, Any]) -> None:
        """Append one scored sample to the JSONL (flushed at once, so an interruption loses nothing scored)."""
        sample_id = str(record["sample_id"])
        if sample_id in self.records:
            raise ValueError(f"sample_id {sample_id!r} was recorded twice; sample ids must be unique.")
        record = {**record, "sample_id": sample_id}
        with self.samples_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.records[sample_id] = record

    def skip(self, error: BadSampleError) -> None:
        """Count an unreadable row when `skip_bad` is on; re-raise it otherwise."""
        if not self.settings.skip_bad:
            raise error
        self.skipped.append({"error": str(error)})

    def selected_records(self, sample_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The records of `sample_ids` that were scored, in that order (skipped ones have none)."""
        return [self.records[str(sample_id)] for sample_id in sample_ids if str(sample_id) in self.records]

    def progress(self, total: int, unit: str) -> tqdm:
        """A progress bar over the run's rows."""
        return tqdm(total=total, desc=f"Evaluating {self.task}", unit=unit, disable=not self.settings.show_progress)

    def predict_pending(
        self,
        model,
        processor,
        work: Sequence[tuple[str, Any]],
        prepare: Callable[[Any], tuple[Any, str, Any]],
        unit: str,
    ) -> Iterator[tuple[Any, Any]]:
        """Predict every `(sample_id, item)` of `work` not yet in the JSONL, `batch_size` at a time.

        `prepare(item)` returns `(image, prompt, context)` or raises `BadSampleError` (skipped, or raised without
        `--skip-bad`). Yields `(context, prediction)` for the runner to record; the progress bar counts every item.
        """
        progress = self.progress(len(work), unit=unit)
        pending = [item for sample_id, item in work if not self.is_done(sample_id)]
        progress.update(len(work) - len(pending))
        for batch in batches(pending, self.settings.batch_size):
            ready = []
            for item in batch:
                try:
                    ready.append(prepare(item))
                except BadSampleError as error:
                    self.skip(error)
                    progress.update(1)
            if ready:
                predictions = model.predict(
                    [image for image, _, _ in ready],
                    [prompt for _, prompt, _ in ready],
                    processor=processor,
                    **self.settings.predict_kwargs(),
                )
                for (_, _, context), prediction in zip(ready, predictions):
                    yield context, prediction
                progress.update(len(ready))
        progress.close()

    def finish(self, figures: dict[str, Any]) -> dict[str, Any]:
        """Write and return the summary: `figures` plus the task, the skipped rows and the two file paths."""
        summary = {
            "task": self.task,
            **figures,
            "num_skipped": len(self.skipped),
            "skipped": self.skipped,
            "samples_file": str(self.samples_path),
        }
        self.summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return summary


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
