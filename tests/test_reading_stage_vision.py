"""bench/reading_stage_vision.py: the recipe's vision pretraining and reading stages for two towers, scored with the
swapped-image control."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import bench_script


TINY = [
    "num_threads=1",
    "render_processes=1",
    "num_train=24",
    "num_validation=2",
    "num_test=2",
    "image_size=64",
    "batch_size=4",
    "reading_curriculum=[[1,2]]",
    "reading_curriculum_scenes=9",
    "reading_steps=2",
]


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("reading_stage_vision")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("no_such_field=1", "is not FIELD=VALUE with FIELD one of"),
        ("vision_num_layers", "is not FIELD=VALUE with FIELD one of"),
        ("vision_stem_channels=32,64", "must be JSON"),
        ("vision_num_layers=0", "vision_num_layers"),
    ],
)
def test_bad_overrides_are_refused_with_what_was_wrong(bench, override, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--output-dir", "out", "--variant", override])
    assert message in capsys.readouterr().err


def test_defaults_are_the_measured_arms(bench):
    arguments = bench.parse_arguments(["--output-dir", "out"])
    base, variant = arguments.recipes["base"], arguments.recipes["variant"]
    assert (base.vision_num_layers, base.vision_pretraining_steps, base.freeze_vision_tower) == (2, 1500, True)
    assert base.vision_stem_channels == variant.vision_stem_channels == [32, 64]
    assert variant.reading_curriculum == ((1, 100, ("vqa_colour",)), (1, 200), (2, 400))
    assert sum(phase[1] for phase in base.reading_curriculum) == sum(phase[1] for phase in variant.reading_curriculum)


def test_both_arms_train_score_and_print_then_a_trained_arm_is_only_rescored(bench, tmp_path, capsys):
    base = [*TINY, "vision_pretraining_steps=2", "vision_pretraining_scenes=6"]
    variant = [*TINY, "vision_num_layers=1"]
    arguments = ["--output-dir", str(tmp_path), "--questions", "4", "--base", *base, "--variant", *variant]
    assert bench.main(arguments) == 0
    printed = capsys.readouterr().out
    base_row = next(line for line in printed.splitlines() if line.startswith("| base |"))
    variant_row = next(line for line in printed.splitlines() if line.startswith("| variant |"))
    assert base_row.count("/") >= 5 and "| - |" in variant_row  # probes only where the tower was pretrained
    assert "variant / base, own-image accuracy: vqa_colour" in printed
    results = json.loads((tmp_path / "base" / "reading_results.json").read_text())
    assert results["overrides"]["vision_pretraining_steps"] == 2
    assert 0.0 <= results["vision_probes"]["pooled_shape"] <= 1.0
    assert set(results["swapped_image"]) <= {"vqa_colour", "vqa_shape", "vqa_count"}

    weights = next((tmp_path / "variant" / "model").glob("*.safetensors"))
    written = weights.stat().st_mtime_ns
    assert bench.main([*arguments[:4], "--arms", "variant", "--variant", *variant]) == 0
    assert weights.stat().st_mtime_ns == written
    assert "| variant |" in capsys.readouterr().out


def test_an_arm_run_alone_is_scored_on_the_tasks_it_reads(bench, tmp_path, capsys):
    variant = [*TINY, 'reading_tasks=["vqa_colour","relative_depth"]']
    arguments = ["--output-dir", str(tmp_path), "--questions", "12", "--arms", "variant", "--variant", *variant]
    assert bench.main(arguments) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| arm |"))
    assert "relative_depth own / other image" in header
    results = json.loads((tmp_path / "variant" / "reading_results.json").read_text())
    assert results["swapped_image"]["relative_depth"]["num_samples"] > 0


def test_an_arm_takes_its_tower_from_an_earlier_arm_instead_of_pretraining(bench, tmp_path, capsys):
    pretrained = [*TINY, "vision_pretraining_scenes=6", "freeze_vision_tower=true"]
    # The source pretrains one step more than the arm would, so a copied tower differs from one pretrained anew.
    first = ["--output-dir", str(tmp_path / "first"), "--questions", "4", "--arms", "base"]
    assert bench.main([*first, "--base", *pretrained, "vision_pretraining_steps=3"]) == 0
    source = tmp_path / "first" / "base"
    arm = [*pretrained, "vision_pretraining_steps=2", "reading_curriculum=[[1,3]]"]
    second = ["--output-dir", str(tmp_path / "second"), "--questions", "4", "--arms", "variant"]
    assert bench.main([*second, "--tower-from", str(source), "--variant", *arm]) == 0
    capsys.readouterr()

    def tower(arm_dir: Path) -> dict:
        from perceptio.evaluation.runners.checkpoint_loading import load_perceptio_checkpoint

        return load_perceptio_checkpoint(str(arm_dir / "model"))[0].model.vision_tower.state_dict()

    copied, original = tower(tmp_path / "second" / "variant"), tower(source)
    assert all(torch.equal(value, original[name]) for name, value in copied.items())
    results = json.loads((tmp_path / "second" / "variant" / "reading_results.json").read_text())
    assert results["tower_from"] == str(source)
    assert results["vision_probes"] == json.loads((source / "vision_probes.json").read_text())
    assert results["projector_probes"] is None


def test_an_arm_takes_its_tower_from_a_recipe_runs_folder_with_the_probes_of_its_summary(bench, tmp_path, capsys):
    pretrained = [*TINY, "vision_pretraining_scenes=6", "vision_pretraining_steps=2", "freeze_vision_tower=true"]
    first = ["--output-dir", str(tmp_path / "first"), "--questions", "4", "--arms", "base", "--base", *pretrained]
    assert bench.main(first) == 0
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "first" / "base" / "model", run / "model")
    probes = json.loads((tmp_path / "first" / "base" / "vision_probes.json").read_text())
    summary = {"vision_pretraining": {"log": [], "initial": {}, "final": probes, "training": {}}}
    (run / "recipe_summary.json").write_text(json.dumps(summary))
    second = ["--output-dir", str(tmp_path / "second"), "--questions", "4", "--arms", "variant"]
    assert bench.main([*second, "--tower-from", str(run), "--variant", *pretrained, "reading_curriculum=[[1,2]]"]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "second" / "variant" / "reading_results.json").read_text())
    assert results["tower_from"] == str(run) and results["vision_probes"] == probes
    (run / "recipe_summary.json").write_text(json.dumps({"vision_pretraining": None}))
    third = ["--output-dir", str(tmp_path / "third"), "--questions", "4", "--arms", "variant"]
    with pytest.raises(ValueError, match="records no vision pretraining"):
        bench.main([*third, "--tower-from", str(run), "--variant", *pretrained, "reading_curriculum=[[1,2]]"])


def test_an_arm_starts_its_projector_from_probes_of_its_tower(bench, tmp_path, capsys):
    arm = [*TINY, "vision_pretraining_scenes=6", "vision_pretraining_steps=2", "freeze_vision_tower=true"]
    arm += ["projector_from_probes=true", "projector_probe_scenes=6", "projector_probe_steps=3"]
    assert bench.main(["--output-dir", str(tmp_path), "--questions", "4", "--arms", "base", "--base", *arm]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "base" / "reading_results.json").read_text())
    projector = results["projector_probes"]
    assert [entry["step"] for entry in projector["log"]] == [3]
    assert all(0 <= projector[name] <= 1 for name in ("colour", "shape", "size", "depth_bin", "background"))


def test_a_tower_source_that_is_no_arm_or_does_not_fit_is_refused(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--output-dir", str(tmp_path), "--tower-from", str(tmp_path / "nothing")])
    assert "must be an arm folder holding model/ and vision_probes.json, or a recipe run's" in capsys.readouterr().err
    pretrained = [*TINY, "vision_pretraining_steps=2", "vision_pretraining_scenes=6", "freeze_vision_tower=true"]
    assert (
        bench.main(["--output-dir", str(tmp_path), "--questions", "4", "--arms", "base", "--base", *pretrained]) == 0
    )
    wider = [*pretrained, "vision_num_layers=3"]
    arguments = ["--output-dir", str(tmp_path / "other"), "--questions", "4", "--arms", "variant"]
    with pytest.raises(ValueError, match="does not fit the arm's tower settings"):
        bench.main([*arguments, "--tower-from", str(tmp_path / "base"), "--variant", *wider])


def test_an_oracle_arm_reads_tokens_made_from_its_scenes_labels(bench, tmp_path, capsys):
    arguments = ["--output-dir", str(tmp_path), "--questions", "4", "--arms", "variant", "--oracle-tokens"]
    assert bench.main([*arguments, "--variant", *TINY, "question_before_image=true"]) == 0
    assert "| variant |" in capsys.readouterr().out
    saved = torch.load(tmp_path / "variant" / bench.ORACLE_TOKENS_FILE)
    assert saved["background"].abs().sum() > 0, "the oracle's embeddings trained (the background starts at zero)"

    from datasets import Dataset

    from perceptio.evaluation.runners.checkpoint_loading import load_perceptio_checkpoint

    model, processor = load_perceptio_checkpoint(str(tmp_path / "variant" / "model"))
    assert processor.text_before_images
    recipe = bench.parse_arguments([*arguments, "--variant", *TINY]).recipes["variant"]
    rows = Dataset.load_from_disk(str(next((tmp_path / "reading_questions").iterdir()) / "test"))
    rows = rows.select([0, next(i for i in range(len(rows)) if rows[i]["scene_seed"] != rows[0]["scene_seed"])])
    tokens = bench.OracleImageTokens(model.config.text_config.hidden_size)
    tokens.load_state_dict(saved)
    bench.attach_oracle_tokens(model, tokens, bench.oracle_label_table(processor, recipe, [(rows, None)]))
    pixel_values = processor.image_processor(images=list(rows["image"]), max_num_tiles=1)["pixel_values"]
    features = model.model.get_image_features(pixel_values).pooler_output
    for image, scene_seed, feature in zip(pixel_values, rows["scene_seed"], features):
        assert torch.allclose(feature, tokens(*bench.scene_labels(scene_seed, recipe, None)))
    assert not torch.allclose(features[0], features[1])
    with pytest.raises(ValueError, match="in no scene the oracle rendered"):
        model.model.get_image_features(torch.zeros_like(pixel_values[:1]))


def test_oracle_centres_mark_each_visible_object_on_one_token(bench):
    recipe = bench.parse_arguments(["--output-dir", "out", "--variant", *TINY]).recipes["variant"]
    cover, attributes, centres = bench.scene_labels(7, recipe, None)
    visible = cover[:, :-1].sum(0) > 0
    assert torch.equal(centres.sum(0), visible.float()), "one centre token per visible object, none for a hidden one"
    assert centres.sum() >= 2
    torch.manual_seed(0)
    marked = bench.OracleImageTokens(8, centres=True)
    plain = bench.OracleImageTokens(8)
    plain.load_state_dict({name: value for name, value in marked.state_dict().items() if name != "centre"})
    changed = (marked(cover, attributes, centres) - plain(cover, attributes, centres)).abs().sum(1) > 0
    assert torch.equal(changed, centres.sum(1) > 0), "only the tokens holding a centroid change"


def test_an_oracle_arm_with_centres_is_trained_and_rescored_with_them(bench, tmp_path, capsys):
    arguments = ["--output-dir", str(tmp_path), "--questions", "4", "--arms", "base", "--oracle-tokens"]
    tiny = [*TINY, "vision_pretraining_steps=0", "question_before_image=true"]
    assert bench.main([*arguments, "--oracle-centres", "--base", *tiny]) == 0
    assert "centre" in torch.load(tmp_path / "base" / bench.ORACLE_TOKENS_FILE)
    assert bench.main([*arguments, "--base", *tiny]) == 0, "a saved arm is rescored with its own oracle's centres"
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--output-dir", str(tmp_path), "--oracle-centres"])
    assert "it needs --oracle-tokens" in capsys.readouterr().err


def test_an_oracle_arm_must_not_pretrain_or_take_a_tower(bench, tmp_path, capsys):
    arguments = ["--output-dir", str(tmp_path), "--oracle-tokens", "--arms", "base"]
    with pytest.raises(SystemExit):
        bench.parse_arguments([*arguments, "--base", "vision_pretraining_steps=5"])
    assert "set vision_pretraining_steps=0 in the base arm's overrides" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_arguments([*arguments, "--tower-from", str(tmp_path)])
    assert "cannot take one with --tower-from" in capsys.readouterr().err
