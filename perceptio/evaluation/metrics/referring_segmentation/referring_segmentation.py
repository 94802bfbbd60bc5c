"""`evaluate` module for referring segmentation: cIoU and gIoU.

Load it offline by path: `evaluate.load(metric_path("referring_segmentation"))` for per-sample counts (the default,
which never holds masks) or `evaluate.load(metric_path("referring_segmentation"), "masks")` for masks. The arithmetic
is `perceptio.evaluation.segmentation_metrics`, so this module and the Python API always agree.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
import torch

from perceptio.evaluation.segmentation_metrics import ReferringSegmentationScore


COUNTS_CONFIGS = ("default", "counts")
MASKS_CONFIG = "masks"

_DESCRIPTION = """\
Referring-segmentation scores over a split. cIoU (cumulative IoU) is the total intersection over the total union;
gIoU is the mean per-sample IoU, where an empty prediction on an empty target scores 1. Masks are binarised
(foreground = value > 0) and the prediction is resized with nearest-neighbour sampling to the reference's size,
so scores are taken at the original image size.
"""

_KWARGS_DESCRIPTION = """\
Config "default" / "counts" (per-sample pixel counts, for splits of any size):
    intersections (`list` of `int`): intersection pixel count of each sample.
    unions (`list` of `int`): union pixel count of each sample.
Config "masks":
    predictions (`list` of 2-D masks): predicted masks, any size.
    references (`list` of 2-D masks): ground-truth masks at the original image size.
Returns:
    ciou (`float`): total intersection / total union, in [0, 1].
    giou (`float`): mean per-sample IoU, in [0, 1].
    num_samples (`int`): how many samples were scored.
Examples:
    >>> score = evaluate.load(metric_path("referring_segmentation"))
    >>> score.compute(intersections=[1, 0], unions=[2, 0])
    {'ciou': 0.5, 'giou': 0.75, 'num_samples': 2}
"""

_CITATION = """\
@inproceedings{lai2024lisa,
  title={LISA: Reasoning Segmentation via Large Language Model},
  author={Lai, Xin and Tian, Zhuotao and Chen, Yukang and Li, Yanwei and Yuan, Yuhui and Liu, Shu and Jia, Jiaya},
  booktitle={CVPR},
  year={2024}
}
"""


def _mask_feature() -> datasets.Sequence:
    # float32 holds booleans, 0/1/2 rasterised polygons and logits alike; binarisation happens at compute time.
    return datasets.Sequence(datasets.Sequence(datasets.Value("float32")))


def _as_float32_masks(masks):
    """Cast array and tensor masks to float32, so one batch may mix bool, int and float masks (Arrow needs one type)."""
    if masks is None:
        return None
    return [_as_float32_mask(mask) for mask in masks]


def _as_float32_mask(mask):
    """Cast an array or tensor mask to a float32 array; anything else (lists, None) passes through unchanged."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if isinstance(mask, np.ndarray) and (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.number)):
        return mask.astype(np.float32)
    return mask


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReferringSegmentation(evaluate.Metric):
    """cIoU and gIoU from per-sample intersection/union counts (default) or from masks (config "masks")."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name in COUNTS_CONFIGS:
            features = datasets.Features(
                {"intersections": datasets.Value("float64"), "unions": datasets.Value("float64")}
            )
        elif self.config_name == MASKS_CONFIG:
            features = datasets.Features({"predictions": _mask_feature(), "references": _mask_feature()})
        else:
            raise ValueError(
                f"Unknown config {self.config_name!r} for referring_segmentation; use 'counts' (the default) "
                f"or 'masks'."
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
            reference_urls=["https://arxiv.org/abs/2308.00692"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of samples (counts, or masks with config "masks")."""
        super().add_batch(
            predictions=_as_float32_masks(predictions), references=_as_float32_masks(references), **kwargs
        )

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one sample (counts, or a mask pair with config "masks")."""
        super().add(prediction=_as_float32_mask(prediction), reference=_as_float32_mask(reference), **kwargs)

    def _compute(self, intersections=None, unions=None, predictions=None, references=None) -> dict:
        score = ReferringSegmentationScore()
        if self.config_name == MASKS_CONFIG:
            for prediction, reference in zip(predictions, references):
                score.add_masks(prediction, reference)
        else:
            for intersection, union in zip(intersections, unions):
                score.add_counts(intersection, union)
        return score.compute()
