"""The `perceptio` command: every subcommand has --help with an example; export works end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from perceptio.cli import COMMAND_MODULES, build_parser, main


def test_every_registered_subcommand_has_help_with_an_example(capsys):
    parser = build_parser()
    registered = parser._subparsers._group_actions[0].choices
    assert set(registered) <= set(COMMAND_MODULES)
    for name in registered:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "example" in capsys.readouterr().out.lower(), name


def test_export_tiny_writes_a_loadable_folder(tmp_path):
    output = tmp_path / "tiny"
    assert main(["export", "--tiny", "--output-dir", str(output)]) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].endswith("PerceptioForConditionalGeneration")
    assert main(["export", "--tiny", "--output-dir", str(output)]) == 2


def test_console_script_runs():
    completed = subprocess.run(
        [sys.executable, "-m", "perceptio.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0 and "COMMAND" in completed.stdout


def test_eval_offers_the_one_evaluation_task_list():
    import argparse

    from perceptio.evaluation import EVALUATION_DEFAULT_SPLITS, EVALUATION_TASKS, runners
    from perceptio.hub_cards.model_card import EVALUATION_TASKS as MODEL_CARD_TASKS

    (subcommands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    (task,) = [action for action in subcommands.choices["eval"]._actions if action.dest == "task"]
    assert tuple(task.choices) == EVALUATION_TASKS == tuple(EVALUATION_DEFAULT_SPLITS)
    assert runners.EVALUATION_TASKS is EVALUATION_TASKS
    assert set(MODEL_CARD_TASKS) == set(EVALUATION_TASKS)  # a model card can name every benchmark


def test_train_help_shows_each_recipe_default_from_the_recipe(capsys, monkeypatch):
    import dataclasses

    import perceptio.trainers.synthetic_recipe_settings as recipe_module

    changed = {"train_steps": 1234, "num_train": 4321, "text_num_attention_heads": 6, "question_before_image": False}
    changed_recipe = dataclasses.replace(recipe_module.SyntheticTinyRecipe(), **changed)
    monkeypatch.setattr(recipe_module, "SyntheticTinyRecipe", lambda: changed_recipe)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    options = capsys.readouterr().out.split("options:")[1]
    lines = {" ".join(block.split()).split()[0]: " ".join(block.split()) for block in re.split(r"\n  (?=--)", options)}
    assert lines["--train-steps"].endswith("(default: 1234)")
    assert lines["--num-train"].endswith("(default: 4321)")
    assert lines["--text-num-attention-heads"].endswith("(default: 6)")
    assert lines["--question-before-image,"].endswith("(default: off)")
    assert lines["--vision-stem-channels"].endswith("(default: 32,64)")
    assert lines["--seed"].endswith("(default: 0)")
    assert "default" not in lines["--output-dir"]


def test_recipe_overrides_reach_the_recipe(tmp_path, monkeypatch):
    import perceptio.trainers.synthetic_recipe as recipe_module

    received = {}

    def record(output_dir, recipe, ablation, shared_stages_dir):
        received.update(recipe=recipe, ablation=ablation, shared_stages_dir=shared_stages_dir)
        return {"timings": {"total_s": 0.0}}

    monkeypatch.setattr(recipe_module, "run_synthetic_tiny_recipe", record)
    arguments = ["train", "--recipe", "synthetic-tiny", "--output-dir", str(tmp_path), "--seed", "3"]
    assert main([*arguments, "--vision-pretraining-steps", "7"]) == 0
    recipe = received["recipe"]
    assert recipe.vision_pretraining_steps == 7 and recipe.seed == 3
    assert received["shared_stages_dir"] is None
    assert main([*arguments, "--ablation", "no-seg", "--shared-stages-dir", str(tmp_path / "shared")]) == 0
    assert received["shared_stages_dir"] == str(tmp_path / "shared") and received["ablation"] == "no-seg"
    config_run = ["train", "--config", str(tmp_path / "run.yaml"), "--shared-stages-dir", str(tmp_path / "shared")]
    assert main(config_run) == 2, "a recipe-only option on a --config run is refused"
    defaults = recipe_module.SyntheticTinyRecipe()
    assert recipe.train_steps == defaults.train_steps
    assert main([*arguments, "--train-steps", "5"]) == 0
    assert received["recipe"].train_steps == 5
    assert received["recipe"].vision_pretraining_steps == defaults.vision_pretraining_steps
    assert main([*arguments, "--vision-pretraining-steps", "-1"]) == 2, "a bad value is one line, not a traceback"
    assert received["recipe"].num_train == defaults.num_train
    assert main([*arguments, "--num-train", "300"]) == 0
    assert received["recipe"].num_train == 300
    assert main([*arguments, "--num-train", "0"]) == 2
    assert received["recipe"].vision_marked_share == defaults.vision_marked_share
    assert main([*arguments, "--vision-marked-share", "0.5"]) == 0
    assert received["recipe"].vision_marked_share == 0.5
    assert main([*arguments, "--vision-marked-share", "1.5"]) == 2
    assert received["recipe"].vision_pretraining_scenes == defaults.vision_pretraining_scenes
    assert main([*arguments, "--vision-pretraining-scenes", "12000"]) == 0
    assert received["recipe"].vision_pretraining_scenes == 12000
    assert main([*arguments, "--vision-pretraining-scenes", "0"]) == 2
    assert received["recipe"].grounding_scenes == defaults.grounding_scenes
    assert main([*arguments, "--grounding-scenes", "500"]) == 0
    assert received["recipe"].grounding_scenes == 500
    assert main([*arguments, "--grounding-scenes", "0"]) == 2
    assert received["recipe"].grounding_schedule == defaults.grounding_schedule
    assert main([*arguments, "--sam2-backbone-hidden-size", "24", "--sam2-hidden-size", "64"]) == 0
    assert (received["recipe"].sam2_backbone_hidden_size, received["recipe"].sam2_hidden_size) == (24, 64)
    assert main([*arguments, "--sam2-hidden-size", "36"]) == 2
    assert received["recipe"].sam2_patch_stride == defaults.sam2_patch_stride
    assert main([*arguments, "--sam2-patch-stride", "2", "--grounding-steps", "1000"]) == 0
    assert (received["recipe"].sam2_patch_stride, received["recipe"].grounding_steps) == (2, 1000)
    assert main([*arguments, "--sam2-patch-stride", "3"]) == 2
    assert main([*arguments, "--grounding-steps", "0"]) == 2
    assert received["recipe"].seg_attribute_target == defaults.seg_attribute_target
    assert main([*arguments, "--seg-attribute-target", "named"]) == 0
    assert received["recipe"].seg_attribute_target == "named"
    assert main([*arguments, "--seg-attribute-target", "phrase"]) == 2
    assert main([*arguments, "--grounding-schedule", "cosine"]) == 0
    assert received["recipe"].grounding_schedule == "cosine"
    assert main([*arguments, "--grounding-schedule", "linear"]) == 2
    assert received["recipe"].vision_tally_probes == ()
    assert main([*arguments, "--vision-tally-probes", "shape_tally", "object_tally"]) == 0
    assert received["recipe"].vision_tally_probes == ("shape_tally", "object_tally")
    assert main([*arguments, "--vision-tally-probes", "spheres"]) == 2
    assert main([*arguments, "--vision-num-layers", "3"]) == 0
    assert received["recipe"].vision_num_layers == 3
    assert main([*arguments, "--vision-num-layers", "0"]) == 2
    assert received["recipe"].text_num_attention_heads == defaults.text_num_attention_heads
    assert main([*arguments, "--text-num-attention-heads", "8"]) == 0
    assert received["recipe"].text_num_attention_heads == 8
    assert main([*arguments, "--text-num-attention-heads", "5"]) == 2, "5 heads do not divide a width of 192"
    assert main([*arguments, "--seg-prompt-loss-weight", "0.5"]) == 0
    assert received["recipe"].seg_prompt_loss_weight == 0.5
    assert main([*arguments, "--seg-prompt-loss-weight", "-2"]) == 2
    assert main([*arguments, "--mask-decoder-steps", "0"]) == 0
    assert received["recipe"].mask_decoder_steps == 0
    assert main([*arguments, "--mask-decoder-steps", "-3"]) == 2
    assert received["recipe"].vision_stem_channels == [32, 64], "the embedded checkpoint's stem by default"
    assert main([*arguments, "--vision-stem-channels", "16,32"]) == 0
    assert received["recipe"].vision_stem_channels == [16, 32]
    assert main([*arguments, "--vision-stem-channels", "none"]) == 0
    assert received["recipe"].vision_stem_channels is None
    assert main([*arguments, "--vision-stem-channels", "32"]) == 2, "one stem convolution too few for 8-pixel patches"
    assert main([*arguments, "--vision-pretraining-steps", "5", "--freeze-vision-tower"]) == 0
    assert received["recipe"].freeze_vision_tower and received["recipe"].vision_pretraining_steps == 5
    no_pretraining = ["--vision-pretraining-steps", "0"]
    assert main([*arguments, *no_pretraining, "--no-projector-from-probes"]) == 2, "freezing an unpretrained tower"
    assert main([*arguments, "--vision-pretraining-steps", "5", "--no-freeze-vision-tower"]) == 0
    assert not received["recipe"].freeze_vision_tower
    assert main([*arguments, "--vision-tower-learning-rate", "1e-4"]) == 2, "the rate of a frozen tower"
    assert main([*arguments, "--no-freeze-vision-tower", "--vision-tower-learning-rate", "1e-4"]) == 0
    assert received["recipe"].vision_tower_learning_rate == 1e-4
    assert main([*arguments, "--no-freeze-vision-tower", "--vision-tower-learning-rate", "0"]) == 2
    assert received["recipe"].reading_learning_rate is None, "the reading stage at the main stage's rate by default"
    assert main([*arguments, "--reading-learning-rate", "3e-4"]) == 0
    assert received["recipe"].reading_rate == 3e-4
    assert main([*arguments, "--reading-learning-rate", "0"]) == 2
    curriculum = '[[1,200],[3,700,["vqa_count"]]]'
    assert main([*arguments, "--set", f"reading_curriculum={curriculum}", "--set", "reading_steps=0"]) == 0
    assert received["recipe"].reading_curriculum == ((1, 200), (3, 700, ("vqa_count",)))
    assert received["recipe"].reading_steps == 0
    assert main([*arguments, "--set", "reading_phases=[[1,2]]"]) == 2, "an unknown setting"
    assert main([*arguments, "--set", "reading_steps=many"]) == 2, "a value that is not JSON"
    assert main([*arguments, "--set", "reading_curriculum=[[0,5]]"]) == 2, "a value the recipe refuses"
    assert main([*arguments, "--set", "seed=4"]) == 2, "--seed already sets it"
    assert main([*arguments, "--vision-stem-channels", "16,32", "--set", "vision_stem_channels=[16,32]"]) == 2
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--set", "reading_steps=3"]) == 2
    assert received["recipe"].question_before_image, "the question first by default, as the embedded checkpoint"
    assert main([*arguments, "--no-question-before-image"]) == 0
    assert not received["recipe"].question_before_image
    assert main([*arguments, "--no-projector-from-probes"]) == 0
    assert not received["recipe"].projector_from_probes
    assert not received["recipe"].projector_position_probes
    assert main([*arguments, "--projector-position-probes"]) == 0
    assert received["recipe"].projector_position_probes
    assert main([*arguments, "--projector-position-probes", "--no-projector-from-probes"]) == 2
    assert not received["recipe"].vision_position_probes
    assert main([*arguments, "--vision-position-probes"]) == 0
    assert received["recipe"].vision_position_probes
    untrained_tower = [*no_pretraining, "--no-freeze-vision-tower", "--no-projector-from-probes"]
    assert main([*arguments, *untrained_tower]) == 0
    assert main([*arguments, *untrained_tower, "--vision-position-probes"]) == 2
    assert main([*arguments, "--vision-pretraining-steps", "5"]) == 0
    assert received["recipe"].projector_from_probes and received["recipe"].freeze_vision_tower
    unfrozen = [*no_pretraining, "--no-freeze-vision-tower"]
    assert main([*arguments, *unfrozen, "--projector-from-probes"]) == 2, "probes of an unpretrained tower"
    assert main([*arguments, *unfrozen, "--no-projector-from-probes"]) == 0
    assert received["recipe"].num_threads == 2, "the embedded checkpoint's thread count by default"
    assert main([*arguments, "--num-threads", "1"]) == 0
    assert received["recipe"].num_threads == 1
    assert main([*arguments, "--num-threads", "0"]) == 2


def test_a_malformed_stem_width_list_is_a_usage_error(tmp_path, capsys):
    arguments = ["train", "--recipe", "synthetic-tiny", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--vision-stem-channels", "32,x"])
    assert exit_info.value.code == 2
    assert "comma-separated positive widths" in capsys.readouterr().err


def test_the_ablation_help_names_every_arm(capsys):
    from perceptio.trainers.synthetic_recipe import ABLATIONS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(arm in help_text.replace("- ", "-") for arm in ABLATIONS)


def _failing_command(monkeypatch, error: Exception):
    import perceptio.commands.export as export_command

    def fail(args):
        raise error

    monkeypatch.setattr(export_command, "run", fail)


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (
            ValueError("bad --dtype 'x'\nuse one of float32, bfloat16"),
            2,
            "bad --dtype 'x' use one of float32, bfloat16",
        ),
        (
            FileNotFoundError(2, "No such file or directory", "model/config.json"),
            2,
            "No such file or directory: model/config.json",
        ),
        (RuntimeError("shape mismatch"), 1, "unexpected RuntimeError: shape mismatch (set PERCEPTIO_TRACEBACK=1"),
    ],
)
def test_any_failure_is_one_line_naming_what_failed(monkeypatch, capsys, tmp_path, error, code, line):
    _failing_command(monkeypatch, error)
    monkeypatch.delenv("PERCEPTIO_TRACEBACK", raising=False)
    assert main(["export", "--tiny", "--output-dir", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"perceptio export: error: {line}")


def test_the_traceback_variable_lets_a_failure_raise(monkeypatch, tmp_path):
    _failing_command(monkeypatch, RuntimeError("shape mismatch"))
    monkeypatch.setenv("PERCEPTIO_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["export", "--tiny", "--output-dir", str(tmp_path / "out")])
