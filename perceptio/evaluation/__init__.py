"""Metrics and benchmark runners: cIoU/gIoU, depth metrics, strict multiple-choice scoring, `evaluate` modules."""

from .answer_parsing import parse_choice_letter
from .metric_modules import metric_path
from .multiple_choice import multiple_choice_accuracy
from .segmentation_metrics import ReferringSegmentationScore, ciou, giou, mask_intersection_union


REFCOCO_TASKS: tuple[str, ...] = ("refcoco", "refcoco+", "refcocog")
# The benchmarks of `perceptio eval TASK`, each with the split it reads by default (HardBLINK's release has none).
EVALUATION_DEFAULT_SPLITS: dict[str, str | None] = {
    **dict.fromkeys(REFCOCO_TASKS, "val"),
    "blink-depth": "val",
    "hardblink": None,
    "synthetic": "test",
}
EVALUATION_TASKS: tuple[str, ...] = tuple(EVALUATION_DEFAULT_SPLITS)

__all__ = [
    "EVALUATION_DEFAULT_SPLITS",
    "EVALUATION_TASKS",
    "REFCOCO_TASKS",
    "ReferringSegmentationScore",
    "ciou",
    "giou",
    "mask_intersection_union",
    "metric_path",
    "multiple_choice_accuracy",
    "parse_choice_letter",
]
