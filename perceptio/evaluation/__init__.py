"""Metrics and benchmark runners: cIoU/gIoU, depth metrics, strict multiple-choice scoring, `evaluate` modules."""

from .answer_parsing import parse_choice_letter
from .metric_modules import metric_path
from .multiple_choice import multiple_choice_accuracy
from .segmentation_metrics import ReferringSegmentationScore, ciou, giou, mask_intersection_union

__all__ = [
    "ReferringSegmentationScore",
    "ciou",
    "giou",
    "mask_intersection_union",
    "metric_path",
    "multiple_choice_accuracy",
    "parse_choice_letter",
]
