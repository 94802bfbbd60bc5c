"""The `evaluate` metric modules shipped in the package: offline loading by path, and agreement with the Python API."""

import json
import os
import subprocess
import sys
import textwrap

import evaluate
import numpy as np
import pytest
import torch

from perceptio.evaluation.depth_metrics import abs_rel, delta1, pair_order_accuracy, rmse
from perceptio.evaluation.metric_modules import METRIC_NAMES, metric_path
from perceptio.evaluation.multiple_choice import multiple_choice_summary
from perceptio.evaluation.segmentation_metrics import ReferringSegmentationScore


def load(name, config_name=None):
    return evaluate.load(metric_path(name), config_name, keep_in_memory=True)


def test_metric_path_points_at_a_loadable_folder():
    for name in METRIC_NAMES:
        folder = metric_path(name)
        assert os.path.isfile(os.path.join(folder, f"{name}.py"))
    with pytest.raises(ValueError, match="referring_segmentation"):
        metric_path("accuracy")


def test_modules_load_and_compute_offline_with_the_network_blocked(tmp_path):
    script = textwrap.dedent(
        """
        import json, socket

        def refuse(*args, **kwargs):
            raise OSError("network access attempted")

        socket.socket.connect = refuse
        socket.create_connection = refuse

        import evaluate
        from perceptio.evaluation.metric_modules import metric_path

        results = {
            "segmentation": evaluate.load(metric_path("referring_segmentation")).compute(
                intersections=[1, 0], unions=[2, 0]
            ),
            "multiple_choice": evaluate.load(metric_path("multiple_choice")).compute(
                predictions=["(B)", "A or B"], references=["(B)", "(A)"], num_choices=2
            ),
            "depth": evaluate.load(metric_path("depth_estimation")).compute(
                predictions=[[[1.0, 2.0], [3.0, 4.0]]], references=[[[1.0, 2.0], [3.0, 4.0]]]
            ),
        }
        print(json.dumps(results))
        """
    )
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results["segmentation"] == {"ciou": 0.5, "giou": 0.75, "num_samples": 2}
    assert results["multiple_choice"] == {"accuracy": 0.5, "num_samples": 2, "num_unparsed": 1}
    assert results["depth"]["abs_rel"] == 0.0 and results["depth"]["pair_order_accuracy"] == 1.0


def test_segmentation_counts_module_matches_accumulator():
    intersections, unions = [90, 0, 0, 7], [100, 10, 0, 9]
    expected = ReferringSegmentationScore()
    for intersection, union in zip(intersections, unions):
        expected.add_counts(intersection, union)
    module = load("referring_segmentation")
    module.add_batch(intersections=intersections[:2], unions=unions[:2])
    module.add(intersections=intersections[2], unions=unions[2])
    module.add(intersections=intersections[3], unions=unions[3])
    result = module.compute()
    assert result["num_samples"] == 4
    assert result["ciou"] == pytest.approx(expected.ciou) == pytest.approx(97 / 119)
    assert result["giou"] == pytest.approx(expected.giou) == pytest.approx((0.9 + 0 + 1 + 7 / 9) / 4)


def test_segmentation_masks_module_scores_mixed_masks_at_reference_size():
    # Sample 1: two summed polygons (value 2 on the overlap), predicted exactly but at half resolution.
    reference = np.zeros((4, 4), dtype=np.int64)
    reference[0:2, 0:2] += 1
    reference[0:2, 0:4] += 1
    prediction = np.array([[True, True], [False, False]])
    # Sample 2: an empty logit map on an empty reference. Sample 3: a tensor missing half the object.
    predictions = [prediction, torch.full((3, 3), -4.0), torch.tensor([[1, 0], [1, 0]])]
    references = [reference, np.zeros((3, 3)), [[1, 1], [1, 1]]]
    result = load("referring_segmentation", "masks").compute(predictions=predictions, references=references)
    # Counts: (8, 8), (0, 0), (2, 4).
    assert result == {"ciou": pytest.approx(10 / 12), "giou": pytest.approx((1 + 1 + 0.5) / 3), "num_samples": 3}


def test_segmentation_module_rejects_unknown_config_and_bad_counts():
    with pytest.raises(ValueError, match="'counts'"):
        load("referring_segmentation", "polygons")
    with pytest.raises(ValueError, match="larger than the union"):
        load("referring_segmentation").compute(intersections=[3], unions=[2])


def test_multiple_choice_module_matches_python_api():
    predictions = ["(B)", "A or B", "[SEG]<DEPTH_START><DEPTH_2><DEPTH_END>A.", "A red cube", "C"]
    references = ["(B)", "(A)", "(A)", "(A)", "(C)"]
    num_choices = [2, 2, 2, 2, 3]
    result = load("multiple_choice").compute(predictions=predictions, references=references, num_choices=num_choices)
    assert result == multiple_choice_summary(predictions, references, num_choices)
    assert result == {"accuracy": pytest.approx(3 / 5), "num_samples": 5, "num_unparsed": 2}


def test_multiple_choice_module_requires_num_choices():
    with pytest.raises(ValueError, match="num_choices is required"):
        load("multiple_choice").compute(predictions=["A"], references=["(A)"])


def test_depth_module_on_a_worked_example():
    # Prediction = 2 x target: AbsRel 1, delta1 0 (ratio 2 >= 1.25), RMSE = sqrt(mean(target^2)), order kept.
    target = np.array([[1.0, 2.0], [3.0, 4.0]])
    result = load("depth_estimation").compute(predictions=[2 * target], references=[target], margin=0.5)
    assert result["abs_rel"] == pytest.approx(1.0)
    assert result["delta1"] == 0.0
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean(target**2)))
    assert result["pair_order_accuracy"] == 1.0
    assert result["num_samples"] == 1


def test_depth_module_averages_depth_metrics_functions_per_sample():
    rng = np.random.default_rng(0)
    targets = [rng.uniform(1, 5, (6, 8)), rng.uniform(1, 5, (4, 4))]
    predictions = [target * rng.uniform(0.8, 1.3, target.shape) for target in targets]
    valid = [rng.random(target.shape) > 0.2 for target in targets]
    result = load("depth_estimation").compute(predictions=predictions, references=targets, valid=valid)
    # The module stores maps as float32; compare against the functions on the same float32 values.
    stored = [
        (prediction.astype(np.float32).astype(np.float64), target.astype(np.float32).astype(np.float64))
        for prediction, target in zip(predictions, targets)
    ]
    for name, function in (("abs_rel", abs_rel), ("rmse", rmse), ("delta1", delta1)):
        expected = np.mean([function(p, t, valid=v) for (p, t), v in zip(stored, valid)])
        assert result[name] == pytest.approx(expected, rel=1e-6)
    assert 0.0 <= result["pair_order_accuracy"] <= 1.0


def test_depth_module_pair_order_follows_the_prediction_convention():
    inverse_depth = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    metric_depth = 1.0 / inverse_depth  # nearer = smaller
    module = load("depth_estimation")
    flipped = module.compute(predictions=[metric_depth], references=[inverse_depth], larger_is_nearer=False)
    assert flipped["pair_order_accuracy"] == 1.0
    assert flipped["pair_order_accuracy"] == pair_order_accuracy(metric_depth, inverse_depth, larger_is_nearer=False)
    unflipped = module.compute(predictions=[metric_depth], references=[inverse_depth])
    assert unflipped["pair_order_accuracy"] == 0.0


def test_depth_module_names_the_bad_sample():
    target = np.ones((2, 2))
    with pytest.raises(ValueError, match="sample 1"):
        load("depth_estimation").compute(predictions=[target, -target], references=[target, target])
