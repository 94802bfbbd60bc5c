"""`evaluate` module for dense depth: AbsRel, RMSE, delta < 1.25 and pair-order accuracy.

Load it offline by path: `evaluate.load(metric_path("depth_estimation"))`. Each metric is computed by
`perceptio.evaluation.depth_metrics` on each sample, so this module and the Python API always agree.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from perceptio.evaluation.depth_metrics import abs_rel, delta1, pair_order_counts, rmse


_DESCRIPTION = """\
Dense depth metrics over a set of (prediction, reference) map pairs. AbsRel, RMSE and delta < 1.25 are computed per
sample and averaged over samples (the usual monocular-depth protocol, so every image weighs the same whatever its
size). Pair-order accuracy pools the random point pairs of all samples: the fraction of pairs whose reference values
differ by more than `margin` and whose order the prediction gets right. Metrics are computed in the domain the maps
are given in; AbsRel and delta are ratios, so both maps must be strictly positive (map normalised [-1, 1] depth with
`perceptio.evaluation.depth_metrics.normalized_to_positive` first).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of 2-D float maps): predicted depth, each the shape of its reference.
    references (`list` of 2-D float maps): ground-truth depth; larger = nearer (relative inverse depth) for
        pair-order accuracy unless `larger_is_nearer` says the prediction uses the opposite convention.
    valid (`list` of 2-D boolean masks, *optional*): pixels to score, one mask per sample.
    num_pairs (`int`, default 10000): pairs drawn per sample for pair-order accuracy.
    margin (`float`, default 0.05): minimum reference difference for a pair to count.
    seed (`int`, default 0): sample i draws its pairs with seed + i, so results are reproducible.
    larger_is_nearer (`bool`, default True): the prediction's convention.
Returns:
    abs_rel (`float`), rmse (`float`), delta1 (`float`, in [0, 1]), pair_order_accuracy (`float`, in [0, 1]),
    num_samples (`int`).
Examples:
    >>> depth = evaluate.load(metric_path("depth_estimation"))
    >>> depth.compute(predictions=[[[1.0, 2.0], [3.0, 4.0]]], references=[[[1.0, 2.0], [3.0, 4.0]]])
    {'abs_rel': 0.0, 'rmse': 0.0, 'delta1': 1.0, 'pair_order_accuracy': 1.0, 'num_samples': 1}
"""

_CITATION = """\
@inproceedings{eigen2014depth,
  title={Depth Map Prediction from a Single Image using a Multi-Scale Deep Network},
  author={Eigen, David and Puhrsch, Christian and Fergus, Rob},
  booktitle={NeurIPS},
  year={2014}
}
"""


def _depth_feature() -> datasets.Sequence:
    return datasets.Sequence(datasets.Sequence(datasets.Value("float32")))


def _as_map(values, name: str, index: int, dtype: type) -> np.ndarray:
    """One sample's 2-D map as a numpy array, or ValueError naming the sample."""
    array = np.asarray(values, dtype=dtype)
    if array.ndim != 2:
        raise ValueError(f"{name} at sample {index} must be a 2-D map (height, width); got shape {array.shape}.")
    return array


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DepthEstimation(evaluate.Metric):
    """AbsRel, RMSE, delta < 1.25 (per-sample means) and pooled pair-order accuracy."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _depth_feature(), "references": _depth_feature()}),
        )

    def _compute(
        self,
        predictions,
        references,
        valid=None,
        num_pairs: int = 10_000,
        margin: float = 0.05,
        seed: int = 0,
        larger_is_nearer: bool = True,
    ) -> dict:
        if not predictions:
            raise ValueError("No samples to score; pass at least one prediction/reference pair.")
        if valid is not None and len(valid) != len(predictions):
            raise ValueError(f"valid must hold one mask per sample; got {len(valid)} for {len(predictions)} samples.")
        per_sample = {"abs_rel": [], "rmse": [], "delta1": []}
        correct_pairs = counted_pairs = 0
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            pred = _as_map(prediction, "prediction", index, np.float64)
            target = _as_map(reference, "reference", index, np.float64)
            mask = None if valid is None else _as_map(valid[index], "valid", index, bool)
            try:
                per_sample["abs_rel"].append(abs_rel(pred, target, valid=mask))
                per_sample["rmse"].append(rmse(pred, target, valid=mask))
                per_sample["delta1"].append(delta1(pred, target, valid=mask))
                correct, counted = pair_order_counts(
                    pred, target, num_pairs, margin, seed + index, larger_is_nearer, valid=mask
                )
            except ValueError as error:
                raise ValueError(f"sample {index}: {error}") from error
            correct_pairs += correct
            counted_pairs += counted
        if counted_pairs == 0:
            raise ValueError(
                f"pair-order accuracy has no pair: no sample has two valid pixels whose reference values differ by "
                f"more than margin={margin}."
            )
        scores = {name: float(np.mean(values)) for name, values in per_sample.items()}
        scores["pair_order_accuracy"] = correct_pairs / counted_pairs
        scores["num_samples"] = len(predictions)
        return scores
