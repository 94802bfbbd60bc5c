"""Distillation training, resume, evaluation report and the two command-line entry points, at tiny sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessorPil

from perceptio.cli import main
from perceptio.evaluation.depth_tokenizer_evaluation import evaluate_depth_tokenizer
from perceptio.models.perceptio.configuration_perceptio_depth_tokenizer import PerceptioDepthTokenizerConfig
from perceptio.models.perceptio.modeling_perceptio_depth_tokenizer import PerceptioDepthTokenizer
from perceptio.trainers.depth_tokenizer_trainer import EVALUATION_FILE_NAME, LOGGED_OUTPUTS, train_depth_tokenizer


TINY_SIZE_ARGUMENTS = ["--image-size", "16", "--hidden-channels", "4", "8", "--codebook-dim", "4", "--num-codes", "8"]


def tiny_config() -> PerceptioDepthTokenizerConfig:
    return PerceptioDepthTokenizerConfig(
        image_size=16, hidden_channels=[4, 8], num_residual_blocks=1, codebook_dim=4, num_codes=8
    )


def plane_maps(count: int = 12, size: int = 16, seed: int = 0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size] / size
    return np.stack([a * rows + b * columns + c for a, b, c in generator.normal(size=(count, 3))]).astype(np.float32)


def test_training_logs_components_checkpoints_resumes_and_writes_report(tmp_path):
    common = dict(
        depth_maps=plane_maps(),
        config=tiny_config(),
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=2,
        eval_num_pairs=50,
        disable_tqdm=True,
    )
    train_depth_tokenizer(tmp_path, max_steps=2, **common)
    log_history = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert all(name in log_history[0] for name in LOGGED_OUTPUTS)

    result = train_depth_tokenizer(tmp_path, max_steps=4, resume_from_checkpoint=True, **common)
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["log_history"][0]["step"] == 1
    report = json.loads((tmp_path / EVALUATION_FILE_NAME).read_text())
    assert report == pytest.approx(result.evaluation.to_dict())
    assert 0 <= report["pair_order_accuracy"] <= 1 and 0 < report["codebook_usage"] <= 1
    loaded = PerceptioDepthTokenizer.from_pretrained(tmp_path)
    assert torch.equal(loaded.codebook, result.tokenizer.codebook)


def test_train_requires_exactly_one_data_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        train_depth_tokenizer(tmp_path, config=tiny_config())
    with pytest.raises(ValueError, match="eval_fraction"):
        train_depth_tokenizer(tmp_path, depth_maps=plane_maps(), config=tiny_config(), eval_fraction=1.0)


def test_evaluation_pools_all_maps_and_scores_its_own_targets():
    torch.manual_seed(0)
    tokenizer = PerceptioDepthTokenizer(tiny_config()).eval()
    maps = [*plane_maps(3), plane_maps(1, size=24)[0]]
    evaluation = evaluate_depth_tokenizer(tokenizer, maps, batch_size=2, num_pairs=40, show_progress=False)
    assert evaluation.num_maps == 4 and 0 < evaluation.num_pairs <= 160
    assert evaluation.rmse > 0 and 0 <= evaluation.delta1 <= 1
    assert "pair-order accuracy" in evaluation.to_table()


def test_cli_trains_on_ground_truth_then_evaluates(tmp_path, capsys):
    np.save(tmp_path / "depth.npy", plane_maps())
    model_dir = tmp_path / "model"
    assert (
        main(
            [
                "train-depth-tokenizer",
                "--depth",
                str(tmp_path / "depth.npy"),
                "--output-dir",
                str(model_dir),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--save-steps",
                "2",
                *TINY_SIZE_ARGUMENTS,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval-depth-tokenizer",
                "--model",
                str(model_dir),
                "--depth",
                str(tmp_path / "depth.npy"),
                "--output",
                str(tmp_path / "report.json"),
                "--num-pairs",
                "20",
            ]
        )
        == 0
    )
    assert "pair_order_accuracy" in json.loads((tmp_path / "report.json").read_text())
    assert "codebook usage" in capsys.readouterr().out
    assert main(["eval-depth-tokenizer", "--model", str(model_dir), "--depth", str(tmp_path / "missing.npy")]) == 2


def test_cli_distils_from_a_teacher_on_an_image_folder(tmp_path):
    backbone = Dinov2Config(
        image_size=32,
        patch_size=16,
        hidden_size=4,
        num_hidden_layers=2,
        num_attention_heads=1,
        intermediate_size=8,
        out_indices=[1, 2],
        reshape_hidden_states=False,
    )
    teacher_config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=4,
        neck_hidden_sizes=[2, 2],
        fusion_hidden_size=6,
        reassemble_factors=[2, 1],
        head_hidden_size=4,
    )
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(teacher_config).save_pretrained(tmp_path / "teacher")
    DPTImageProcessorPil(size={"height": 32, "width": 32}, ensure_multiple_of=16).save_pretrained(tmp_path / "teacher")
    (tmp_path / "images").mkdir()
    generator = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(generator.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{index}.png"
        )
    assert (
        main(
            [
                "train-depth-tokenizer",
                "--teacher",
                str(tmp_path / "teacher"),
                "--images",
                str(tmp_path / "images"),
                "--output-dir",
                str(tmp_path / "model"),
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--teacher-cache-dir",
                str(tmp_path / "cache"),
                *TINY_SIZE_ARGUMENTS,
            ]
        )
        == 0
    )
    assert (tmp_path / "model" / EVALUATION_FILE_NAME).is_file()
    assert list((tmp_path / "cache").glob("teacher_depth-*.arrow"))


@pytest.mark.parametrize("other_process_scale", [None, 3.0])
def test_logs_are_window_means_averaged_across_processes(tmp_path, monkeypatch, other_process_scale):
    from transformers import TrainingArguments

    from perceptio.trainers import trainer_perceptio
    from perceptio.trainers.depth_tokenizer_trainer import DepthMapCollator, DepthMapDataset, DepthTokenizerTrainer

    if other_process_scale is not None:
        # A stand-in second process whose sums are `other_process_scale` times this one's.
        def gather(tensor, parallel_mode):
            return torch.cat([tensor, other_process_scale * tensor])

        monkeypatch.setattr(trainer_perceptio, "nested_gather", gather)
    torch.manual_seed(0)
    tokenizer = PerceptioDepthTokenizer(tiny_config())
    recorded = []
    tokenizer.register_forward_hook(
        lambda module, inputs, outputs: recorded.append([getattr(outputs, name).item() for name in LOGGED_OUTPUTS])
    )
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DepthTokenizerTrainer(
        model=tokenizer, args=arguments, train_dataset=DepthMapDataset(plane_maps(8)), data_collator=DepthMapCollator()
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    scale = 1.0 if other_process_scale is None else (1.0 + other_process_scale) / 2
    assert len(recorded) == 4 and len(logged) == 2
    for window, entry in enumerate(logged):
        means = np.mean(recorded[2 * window : 2 * window + 2], axis=0) * scale
        assert [entry[name] for name in LOGGED_OUTPUTS] == pytest.approx(means.tolist(), rel=1e-5, abs=1e-6)
