"""Benchmark runners behind `perceptio eval TASK`: each writes a per-sample JSONL (resumable) and a JSON summary."""

from .. import EVALUATION_TASKS
from .blink_depth import run_blink_depth
from .hardblink import run_hardblink
from .refcoco import run_refcoco
from .resumable_run import BadSampleError, ResumableRun, RunSettings
from .synthetic import run_synthetic


__all__ = [
    "EVALUATION_TASKS",
    "BadSampleError",
    "ResumableRun",
    "RunSettings",
    "run_blink_depth",
    "run_hardblink",
    "run_refcoco",
    "run_synthetic",
]
