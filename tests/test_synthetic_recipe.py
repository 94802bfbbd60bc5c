"""The synthetic-tiny recipe: a few-step smoke run end to end, and what each ablation changes."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Sequence, Value
from datasets import Image as DatasetImage
from PIL import Image
from safetensors.torch import load_file

from perceptio import PerceptioDepthTokenizer, PerceptioForConditionalGeneration, PerceptioProcessor
from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.data.scene_rendering import render_scene
from perceptio.data.seg_attributes import seg_attribute_classes, seg_attribute_names
from perceptio.data.synthetic_dataset import build_synthetic_dataset
from perceptio.tiny_models import tiny_sam2_config
from perceptio.trainers.grounding_pretraining import AttributePromptEmbedding
from perceptio.trainers.recipe_compute import recipe_device
from perceptio.trainers.recipe_shared_stages import load_pre_main_stages
from perceptio.trainers.synthetic_recipe import (
    ABLATIONS,
    ablate,
    build_recipe_model,
    build_recipe_processor,
    fit_recipe_projector,
    pretrain_recipe_grounding,
    pretrain_recipe_vision_tower,
    reading_curriculum_split,
    reading_split,
    reading_stage_ablation,
    referring_rows_with_masks,
    render_recipe_scenes,
    render_recipe_vision_scenes,
    run_synthetic_tiny_recipe,
    train_pre_main_stages,
    train_recipe_mask_decoder_stage,
    train_recipe_model,
    train_recipe_reading_stage,
)
from perceptio.trainers.synthetic_recipe_settings import (
    DEPTH_LOSS_WEIGHT_FIELDS,
    MAIN_STAGE_FIELDS,
    SyntheticTinyRecipe,
)


SMOKE = dict(
    num_threads=1,
    render_processes=1,
    num_train=24,
    num_validation=4,
    num_test=4,
    depth_tokenizer_steps=4,
    vision_pretraining_scenes=8,
    vision_pretraining_steps=2,
    projector_from_probes=True,
    projector_probe_scenes=8,
    projector_probe_steps=2,
    grounding_scenes=8,
    grounding_steps=2,
    reading_curriculum=((1, 2), (2, 1)),
    reading_curriculum_scenes=8,
    reading_steps=2,
    train_steps=2,
    mask_decoder_steps=2,
    batch_size=4,
    logging_steps=1,
)


def test_recipe_smoke_run_trains_saves_reloads_and_reproduces(tmp_path):
    summary = run_synthetic_tiny_recipe(tmp_path, SyntheticTinyRecipe(**SMOKE))
    log = summary["training_log"]
    assert len(log) == 2 and all(entry["loss_mask"] >= 0 and entry["loss_token"] > 0 for entry in log)
    saved = json.loads((tmp_path / "recipe_summary.json").read_text())
    assert saved["recipe"]["train_steps"] == 2 and saved["ablation"] == "full"
    grounding = saved["grounding_pretraining"]
    assert 0 <= grounding["final"]["prompt_iou"] <= 1 and [entry["step"] for entry in grounding["log"]] == [1, 2]
    assert 0 <= grounding["final"]["two_object_overlap"] <= 1
    assert 0 <= grounding["training"]["prompt_iou"] <= 1, "the gate on training scenes shows overfitting"
    seg_attributes = saved["seg_attribute_accuracy"]
    assert seg_attributes["num_seg"] > 0 and list(seg_attributes["accuracy"]) == seg_attribute_names("referred")
    assert set(seg_attributes["by_kind"]) <= {"attributes", "conjunction", "plural", "relation", "superlative"}
    assert [(entry["objects_per_scene"], entry["step"]) for entry in saved["reading_log"]] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (0, 1),
        (0, 2),
    ]
    vision = saved["vision_pretraining"]
    assert [entry["step"] for entry in vision["log"]] == [1, 2] and 0 <= vision["final"]["pooled_shape"] <= 1
    assert 0 <= vision["training"]["pooled_shape"] <= 1, "the probes on training scenes show overfitting"
    projector = saved["projector_probes"]
    assert [entry["step"] for entry in projector["log"]] == [1, 2] and 0 <= projector["depth_bin"] <= 1
    assert vision["final"]["marker_letter"] is None and projector["marker_letter"] is None, "no marked scenes"
    assert [entry["step"] for entry in saved["mask_decoder_log"]] == [1, 2]
    assert all(entry["loss_mask"] > 0 for entry in saved["mask_decoder_log"])
    stages = {"dataset_s", "depth_tokenizer_s", "vision_s", "grounding_s", "reading_s", "model_s", "mask_decoder_s"}
    assert {*stages, "total_s"} == set(saved["timings"])
    model = PerceptioForConditionalGeneration.from_pretrained(tmp_path / "model")
    processor = PerceptioProcessor.from_pretrained(tmp_path / "model")
    assert model.config.num_depth_tokens == 64 and processor.image_seq_length == 64
    assert (tmp_path / "dataset" / "test").is_dir()
    assert saved["recipe"]["num_threads"] == SMOKE["num_threads"]
    assert saved["shared_stages"] is None
    run_synthetic_tiny_recipe(tmp_path / "again", SyntheticTinyRecipe(**SMOKE))
    first, again = (load_file(folder / "model" / "model.safetensors") for folder in (tmp_path, tmp_path / "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[name], again[name]) for name in first), (
        "the same seed and thread count must give the same weights"
    )


def test_runs_sharing_the_stages_before_the_main_stage_compute_the_same_weights(tmp_path):
    shared = tmp_path / "shared"
    saving = run_synthetic_tiny_recipe(tmp_path / "saving", SyntheticTinyRecipe(**SMOKE), shared_stages_dir=shared)
    assert saving["shared_stages"] == {"folder": str(shared), "loaded": False}
    assert not shared.with_name("shared.partial").exists()
    loading = run_synthetic_tiny_recipe(tmp_path / "loading", SyntheticTinyRecipe(**SMOKE), shared_stages_dir=shared)
    assert loading["shared_stages"] == {"folder": str(shared), "loaded": True}
    summaries = [json.loads((tmp_path / run / "recipe_summary.json").read_text()) for run in ("saving", "loading")]
    for report in ("vision_pretraining", "projector_probes", "grounding_pretraining", "reading_log", "training_log"):
        assert summaries[0][report] == summaries[1][report], report
    assert summaries[1]["timings"]["vision_s"] == summaries[0]["timings"]["vision_s"], "the saving run's timings"
    _, before_main_stage = load_perceptio_checkpoint(str(shared / "model"))
    assert (
        before_main_stage.tokenizer.get_vocab()
        == build_recipe_processor(SyntheticTinyRecipe(**SMOKE)).tokenizer.get_vocab()
    )
    saved, loaded = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("saving", "loading"))
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[name], loaded[name]) for name in saved), (
        "a run must compute the same weights whether it saved the shared stages or loaded them"
    )
    with pytest.raises(ValueError, match=r"grounding_steps differ"):
        load_pre_main_stages(shared, SyntheticTinyRecipe(**{**SMOKE, "grounding_steps": 3}), "full")
    main_stage_changed = {"train_steps": 3, "mask_decoder_steps": 1, "mask_decoder_learning_rate": 5e-4}
    assert load_pre_main_stages(shared, SyntheticTinyRecipe(**{**SMOKE, **main_stage_changed}), "full") is not None
    main_rate_changed = SyntheticTinyRecipe(**SMOKE, learning_rate=5e-4, reading_learning_rate=1e-3)
    assert load_pre_main_stages(shared, main_rate_changed, "full") is not None
    with pytest.raises(ValueError, match=r"reading_learning_rate \(learning_rate where it is unset\) differ"):
        load_pre_main_stages(shared, SyntheticTinyRecipe(**SMOKE, learning_rate=5e-4), "full")
    with pytest.raises(ValueError, match="this run's is 'no-seg'"):
        load_pre_main_stages(shared, SyntheticTinyRecipe(**SMOKE), "no-seg")
    assert load_pre_main_stages(tmp_path / "nothing-saved", SyntheticTinyRecipe(**SMOKE), "full") is None
    with pytest.raises(ValueError, match="holds files but no saved stages"):
        load_pre_main_stages(tmp_path / "saving", SyntheticTinyRecipe(**SMOKE), "full")


RECIPE_SETTINGS = frozenset(setting.name for setting in dataclasses.fields(SyntheticTinyRecipe))


class ReadRecordingRecipe(SyntheticTinyRecipe):
    """A recipe that records which of its settings are read."""

    def __getattribute__(self, name):
        if name in RECIPE_SETTINGS:
            object.__getattribute__(self, "__dict__").setdefault("_read", set()).add(name)
        return object.__getattribute__(self, name)


def test_the_stages_before_the_main_stage_read_none_of_the_settings_runs_sharing_them_may_change(tmp_path):
    recipe = ReadRecordingRecipe(**SMOKE, reading_learning_rate=1e-3)
    recipe.__dict__["_read"] = set()  # what validating the settings read
    dataset = render_recipe_scenes(recipe, tmp_path / "cache")
    processor = build_recipe_processor(recipe)
    train_pre_main_stages(recipe, processor, dataset["train"], tmp_path, reading_stage_ablation(recipe, "full"))
    read = recipe.__dict__["_read"]
    assert {"reading_learning_rate", "grounding_steps", "reading_steps"} <= read
    assert not read & set(MAIN_STAGE_FIELDS), "a setting in MAIN_STAGE_FIELDS is read before the main stage"


def test_only_a_reading_stage_with_referring_rows_trains_under_an_ablation():
    recipe = SyntheticTinyRecipe(**SMOKE)
    assert {reading_stage_ablation(recipe, ablation) for ablation in ABLATIONS} == {"full"}
    with_referring = SyntheticTinyRecipe(**SMOKE, reading_tasks=("vqa_colour", "referring"))
    assert reading_stage_ablation(with_referring, "no-seg") == "no-seg"
    assert reading_stage_ablation(with_referring, "no-seg-attribute-loss") == "no-seg-attribute-loss"
    assert reading_stage_ablation(with_referring, "depth-lm-only") == "full"
    with pytest.raises(ValueError, match="ablation must be one of"):
        reading_stage_ablation(recipe, "no-vision")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_every_stage_of_the_recipe_runs_there(tmp_path):
    recipe = SyntheticTinyRecipe(**SMOKE)
    summary = run_synthetic_tiny_recipe(tmp_path, recipe)
    assert recipe_device().type == "cuda"
    assert [entry["step"] for entry in summary["mask_decoder_log"]] == [1, 2]
    assert PerceptioForConditionalGeneration.from_pretrained(tmp_path / "model").config.num_depth_tokens == 64


@pytest.mark.parametrize("freeze", [True, False])
def test_main_stage_trains_the_seg_projection_on_a_pretrained_sam2(tmp_path, freeze):
    recipe = SyntheticTinyRecipe(**SMOKE, freeze_grounding_encoder=freeze)
    dataset = build_synthetic_dataset(
        8, 1, 1, image_size=recipe.image_size, seed=0, tasks={"referring": 1.0}, cache_dir=str(tmp_path / "cache")
    )
    processor = build_recipe_processor(recipe)
    model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
    untrained_encoder = copy.deepcopy(model.grounding_encoder.vision_encoder.state_dict())
    pretrain_recipe_grounding(recipe, model, processor)
    pretrained = copy.deepcopy(model.grounding_encoder.state_dict())
    projection = copy.deepcopy(model.text_hidden_fcs.state_dict())
    heads = copy.deepcopy(model.seg_attribute_heads.state_dict())
    assert any(
        not torch.equal(value, pretrained[f"vision_encoder.{name}"]) for name, value in untrained_encoder.items()
    )
    if freeze:
        model.grounding_encoder.requires_grad_(False)
    log = train_recipe_model(recipe, model, processor, dataset["train"], tmp_path / "trainer")
    assert all(entry["loss_seg_attribute"] > 0 for entry in log), "every referring [SEG] has attribute labels"
    assert any(not torch.equal(value, heads[name]) for name, value in model.seg_attribute_heads.state_dict().items())
    after = model.grounding_encoder.state_dict()
    encoder = [name for name in after if name.startswith("vision_encoder.")]
    decoder = [name for name in after if name.startswith("mask_decoder.")]
    assert all(torch.equal(after[name], pretrained[name]) for name in encoder)
    assert all(torch.equal(after[name], pretrained[name]) for name in decoder) == freeze
    assert any(not torch.equal(value, projection[name]) for name, value in model.text_hidden_fcs.state_dict().items())


@pytest.mark.parametrize("freeze", [True, False])
def test_a_frozen_vision_tower_keeps_its_pretrained_weights_through_the_language_stages(tmp_path, freeze):
    recipe, train, processor, model = _stage_inputs(tmp_path, freeze_vision_tower=freeze)
    pretrain_recipe_vision_tower(recipe, model, processor)
    pretrained = copy.deepcopy(model.model.vision_tower.state_dict())
    train_recipe_reading_stage(recipe, model, processor, train, tmp_path, "full")
    train_recipe_model(recipe, model, processor, train, tmp_path / "trainer")
    after = model.model.vision_tower.state_dict()
    assert all(torch.equal(value, pretrained[name]) for name, value in after.items()) == freeze


def test_a_trainable_vision_tower_steps_at_its_own_rate_in_the_language_stages(tmp_path):
    recipe, train, processor, model = _stage_inputs(
        tmp_path, freeze_vision_tower=False, vision_tower_learning_rate=1e-8
    )
    before = copy.deepcopy(model.state_dict())
    train_recipe_model(recipe, model, processor, train, tmp_path / "trainer")

    def largest_step(prefix: str) -> float:
        return max(
            (value - before[name]).abs().max().item()
            for name, value in model.state_dict().items()
            if name.startswith(prefix)
        )

    # Adam moves a weight by about its rate per step: two steps at 1e-8 against the rest's 1e-3.
    assert 0 < largest_step("model.vision_tower.") < 5e-8
    assert largest_step("model.language_model.") > 1e-4


def test_the_reading_stage_steps_at_its_own_rate(tmp_path):
    recipe, train, processor, model = _stage_inputs(tmp_path, reading_learning_rate=1e-8)
    language_model = "model.language_model."
    before = {name: value.clone() for name, value in model.state_dict().items() if name.startswith(language_model)}
    log = train_recipe_reading_stage(recipe, model, processor, train, tmp_path, "full")
    largest_step = max((model.state_dict()[name] - value).abs().max().item() for name, value in before.items())
    # Adam moves a weight by about its rate per step: five reading steps at 1e-8 against the main stage's 1e-3.
    assert 0 < largest_step < 1e-7
    assert max(entry["learning_rate"] for entry in log) <= 1e-8
    assert recipe.reading_rate == 1e-8 and SyntheticTinyRecipe(learning_rate=5e-4).reading_rate == 5e-4
    main_log = train_recipe_model(recipe, model, processor, train, tmp_path / "trainer")
    assert max(entry["learning_rate"] for entry in main_log) > 1e-4, "the main stage keeps learning_rate"


@pytest.mark.parametrize("rate", [0, -1e-3, True, "3e-4"])
def test_the_reading_rate_is_validated(rate):
    with pytest.raises(ValueError, match="reading_learning_rate must be a positive number or None"):
        SyntheticTinyRecipe(reading_learning_rate=rate)


def _stage_inputs(tmp_path, **settings):
    recipe = SyntheticTinyRecipe(**{**SMOKE, **settings})
    dataset = build_synthetic_dataset(
        12, 1, 1, image_size=recipe.image_size, seed=0, tasks=recipe.task_weights, cache_dir=str(tmp_path / "cache")
    )
    processor = build_recipe_processor(recipe)
    model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
    return recipe, dataset["train"], processor, model


def test_mask_decoder_stage_trains_only_the_seg_projection_and_mask_decoder(tmp_path):
    recipe, train_split, processor, model = _stage_inputs(tmp_path)
    model.grounding_encoder.vision_encoder.requires_grad_(False)
    trainable_before = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    before = copy.deepcopy(model.state_dict())
    log = train_recipe_mask_decoder_stage(recipe, model, processor, train_split)
    assert [entry["step"] for entry in log] == [1, 2] and all(entry["loss_mask"] > 0 for entry in log)
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(
        name.startswith(("text_hidden_fcs.", "grounding_encoder.mask_decoder.")) for name in changed
    )
    assert any(name.startswith("text_hidden_fcs.") for name in changed)
    assert any(name.startswith("grounding_encoder.mask_decoder.") for name in changed)
    assert {name for name, parameter in model.named_parameters() if parameter.requires_grad} == trainable_before


def test_mask_decoder_stage_trains_nothing_without_masks(tmp_path, caplog):
    recipe, train_split, processor, model = _stage_inputs(tmp_path)
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.WARNING, logger="perceptio.trainers.synthetic_recipe"):
        log = train_recipe_mask_decoder_stage(recipe, model, processor, ablate(train_split, "no-seg"))
    assert log == [] and "trains nothing" in caplog.text
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_referring_rows_with_masks_keeps_only_referring_rows_that_have_a_mask():
    mask = Image.new("L", (4, 4), 255)
    rows = Dataset.from_dict(
        {"task": ["referring", "referring", "vqa_colour", "referring"], "masks": [[mask], [], [], [mask, mask]]},
        features=Features({"task": Value("string"), "masks": Sequence(DatasetImage(mode="L"))}),
    )
    kept = referring_rows_with_masks(rows)
    assert [len(masks) for masks in kept["masks"]] == [1, 2]
    assert len(referring_rows_with_masks(ablate(rows, "no-seg"))) == 0


def test_reading_stage_keeps_only_answer_tasks_without_depth_blocks(tmp_path):
    recipe = SyntheticTinyRecipe(**SMOKE)
    dataset = build_synthetic_dataset(
        40, 1, 1, image_size=recipe.image_size, seed=0, tasks=recipe.task_weights, cache_dir=str(tmp_path / "cache")
    )
    rows = reading_split(recipe, dataset["train"])
    assert len(rows) > 0 and set(rows["task"]) <= set(recipe.reading_tasks)
    assert not any(rows["use_depth_block"]) and not any("depth" in prompt for prompt in rows["prompt"])
    expected = sum(task in recipe.reading_tasks for task in dataset["train"]["task"])
    assert len(rows) == expected


def test_ablations_change_only_what_they_name():
    rows = Dataset.from_dict({"masks": [[1], []], "use_depth_block": [True, False], "prompt": ["a", "b"]})
    assert ablate(rows, "full").to_dict() == rows.to_dict()
    assert ablate(rows, "no-depth-tokens")["use_depth_block"] == [False, False]
    assert ablate(rows, "no-seg")["masks"] == [[], []]
    assert ablate(rows, "depth-lm-only").to_dict() == rows.to_dict()
    assert ablate(rows, "no-seg-attribute-loss").to_dict() == rows.to_dict()
    assert len(ABLATIONS) == 5 and len(DEPTH_LOSS_WEIGHT_FIELDS) == 4
    with pytest.raises(ValueError, match="ablation"):
        ablate(rows, "no-text")


def test_recipe_settings_are_validated():
    with pytest.raises(ValueError, match="train_steps"):
        SyntheticTinyRecipe(train_steps=0)
    with pytest.raises(ValueError, match="vision_patch_size"):
        SyntheticTinyRecipe(image_size=100)
    with pytest.raises(ValueError, match="reading_tasks"):
        SyntheticTinyRecipe(reading_tasks=("captioning",))
    with pytest.raises(ValueError, match="reading_steps"):
        SyntheticTinyRecipe(reading_steps=-1)
    with pytest.raises(ValueError, match="vision_pretraining_steps"):
        SyntheticTinyRecipe(vision_pretraining_steps=-5)
    with pytest.raises(ValueError, match="freeze_vision_tower"):
        SyntheticTinyRecipe(vision_pretraining_steps=0, projector_from_probes=False)
    for rate in (0.0, -1e-4, True, "1e-4"):
        with pytest.raises(ValueError, match="vision_tower_learning_rate"):
            SyntheticTinyRecipe(freeze_vision_tower=False, vision_tower_learning_rate=rate)
    with pytest.raises(ValueError, match="freeze_vision_tower"):
        SyntheticTinyRecipe(vision_pretraining_steps=10, freeze_vision_tower=True, vision_tower_learning_rate=1e-4)
    with pytest.raises(ValueError, match="question_before_image"):
        SyntheticTinyRecipe(question_before_image="yes")
    for tallies in ("object_tally", ["objects"], ["shape_tally", "shape_tally"], True):
        with pytest.raises(ValueError, match="vision_tally_probes"):
            SyntheticTinyRecipe(vision_tally_probes=tallies)
    assert SyntheticTinyRecipe(vision_tally_probes=["object_tally", "colour_tally"]).vision_tally_probes == (
        "colour_tally",
        "object_tally",
    ), "a list of tallies becomes a tuple in the one order the probes are built in"
    with pytest.raises(ValueError, match="vision_tally_probes trains"):
        SyntheticTinyRecipe(
            vision_pretraining_steps=0,
            freeze_vision_tower=False,
            projector_from_probes=False,
            vision_tally_probes=("object_tally",),
        )
    for share in (-0.5, 2, None):
        with pytest.raises(ValueError, match="vision_marked_share"):
            SyntheticTinyRecipe(vision_marked_share=share)
    for processes in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="render_processes"):
            SyntheticTinyRecipe(render_processes=processes)
    with pytest.raises(ValueError, match="vision_pretraining_scenes"):
        SyntheticTinyRecipe(vision_pretraining_steps=10, vision_pretraining_scenes=0)
    with pytest.raises(ValueError, match="vision_pretraining_steps > 0"):
        SyntheticTinyRecipe(vision_pretraining_steps=0, freeze_vision_tower=False, projector_from_probes=True)
    with pytest.raises(ValueError, match="projector_from_probes"):
        SyntheticTinyRecipe(vision_pretraining_steps=10, projector_from_probes="yes")
    with pytest.raises(ValueError, match="projector_position_probes"):
        SyntheticTinyRecipe(projector_position_probes=1)
    with pytest.raises(ValueError, match="vision_position_probes must be True or False"):
        SyntheticTinyRecipe(vision_position_probes="yes")
    with pytest.raises(ValueError, match="vision_position_probes trains"):
        SyntheticTinyRecipe(
            vision_position_probes=True,
            vision_pretraining_steps=0,
            freeze_vision_tower=False,
            projector_from_probes=False,
        )
    with pytest.raises(ValueError, match="set that too"):
        SyntheticTinyRecipe(projector_from_probes=False, projector_position_probes=True)
    with pytest.raises(ValueError, match="projector_probe_steps"):
        SyntheticTinyRecipe(vision_pretraining_steps=10, projector_from_probes=True, projector_probe_steps=0)
    with pytest.raises(ValueError, match="vision_pretraining_learning_rate"):
        SyntheticTinyRecipe(vision_pretraining_learning_rate=0.0)
    with pytest.raises(ValueError, match="mask_decoder_steps"):
        SyntheticTinyRecipe(mask_decoder_steps=-1)
    with pytest.raises(ValueError, match="grounding_schedule"):
        SyntheticTinyRecipe(grounding_schedule="linear")
    with pytest.raises(ValueError, match="mask_decoder_learning_rate"):
        SyntheticTinyRecipe(mask_decoder_learning_rate=0.0)
    with pytest.raises(ValueError, match="vision_num_layers"):
        SyntheticTinyRecipe(vision_num_layers=0)
    with pytest.raises(ValueError, match="num_threads"):
        SyntheticTinyRecipe(num_threads=0)


def test_the_recipe_computes_with_its_thread_count_and_restores_the_callers(tmp_path, monkeypatch):
    import perceptio.trainers.synthetic_recipe as recipe_module

    seen = []
    monkeypatch.setattr(recipe_module, "_run_recipe", lambda *args: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    run_synthetic_tiny_recipe(tmp_path, SyntheticTinyRecipe(num_threads=before + 1))
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_the_attribute_loss_ablation_keeps_the_heads_and_weights_their_loss_zero(tmp_path):
    recipe = SyntheticTinyRecipe(**SMOKE)
    dataset = build_synthetic_dataset(
        8, 1, 1, image_size=recipe.image_size, seed=0, tasks={"referring": 1.0}, cache_dir=str(tmp_path / "cache")
    )
    processor = build_recipe_processor(recipe)
    model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
    heads = copy.deepcopy(model.seg_attribute_heads.state_dict())
    log = train_recipe_model(recipe, model, processor, dataset["train"], tmp_path / "t", "no-seg-attribute-loss")
    assert model.config.seg_attribute_loss_weight == 0.0
    assert all(entry["loss_seg_attribute"] > 0 for entry in log), "the term is still measured"
    assert all(torch.equal(value, heads[name]) for name, value in model.seg_attribute_heads.state_dict().items())


def test_the_seg_attribute_heads_follow_their_loss_weight():
    recipe = SyntheticTinyRecipe(**SMOKE)
    processor = build_recipe_processor(recipe)
    tokenizer = PerceptioDepthTokenizer(recipe.depth_tokenizer_config())
    model = build_recipe_model(recipe, processor, tokenizer)
    assert recipe.seg_attribute_target == "referred"
    assert model.config.seg_attribute_classes == seg_attribute_classes("referred")
    assert [head.out_features for head in model.seg_attribute_heads] == seg_attribute_classes("referred")
    without = build_recipe_model(SyntheticTinyRecipe(**SMOKE, seg_attribute_loss_weight=0.0), processor, tokenizer)
    assert without.seg_attribute_heads is None and without.config.seg_attribute_classes is None
    named = build_recipe_model(SyntheticTinyRecipe(**SMOKE, seg_attribute_target="named"), processor, tokenizer)
    assert [head.out_features for head in named.seg_attribute_heads] == seg_attribute_classes("named")
    with pytest.raises(ValueError, match="must be one of \\('named', 'referred'\\), got 'object'"):
        SyntheticTinyRecipe(seg_attribute_target="object")
    with pytest.raises(ValueError, match="seg_attribute_loss_weight"):
        SyntheticTinyRecipe(seg_attribute_loss_weight=-1.0)


def test_the_recipe_sizes_the_vision_tower():
    recipe = SyntheticTinyRecipe(**SMOKE, vision_hidden_size=32, vision_num_layers=3)
    processor = build_recipe_processor(recipe)
    model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
    vision = model.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size) == (32, 3, 128)
    assert len(model.model.vision_tower.encoder.layer) == 3


def test_the_recipe_sizes_sam2_and_its_seg_prompts():
    recipe = SyntheticTinyRecipe(**SMOKE, sam2_backbone_hidden_size=24, sam2_hidden_size=64)
    processor = build_recipe_processor(recipe)
    model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
    sam = model.grounding_encoder
    assert sam.config.vision_config.backbone_config.embed_dim_per_stage == [24, 48, 96, 192]
    image_embeddings = model.sam_image_embeddings(torch.zeros(1, 3, 128, 128))
    assert image_embeddings[-1].shape == (1, 64, 8, 8)
    states = torch.zeros(1, 2, recipe.text_hidden_size)
    sparse, dense = model.seg_prompt_embeddings(model.text_hidden_fcs(states))
    logits, _ = model.run_mask_decoder(image_embeddings, sparse, dense)
    assert logits.shape[:2] == (1, 2) and sparse.shape[-1] == 64
    for width in (0, 36, 32.0):
        with pytest.raises(ValueError, match="hidden_size must be a (positive integer|multiple of 8)"):
            SyntheticTinyRecipe(sam2_hidden_size=width)
    with pytest.raises(ValueError, match="backbone_hidden_size must be a positive integer"):
        SyntheticTinyRecipe(sam2_backbone_hidden_size=0)


def test_the_recipe_sets_the_resolution_of_sam2s_image_embedding_and_masks():
    recipe = SyntheticTinyRecipe(**SMOKE, sam2_patch_stride=2)
    processor = build_recipe_processor(recipe)
    model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
    image_embeddings = model.sam_image_embeddings(torch.zeros(1, 3, 128, 128))
    assert image_embeddings[-1].shape == (1, 32, 16, 16)
    sparse, dense = model.seg_prompt_embeddings(model.text_hidden_fcs(torch.zeros(1, 1, recipe.text_hidden_size)))
    assert dense.shape[-2:] == (16, 16), "the prompt encoder's grid follows the image embedding"
    logits, _ = model.run_mask_decoder(image_embeddings, sparse, dense)
    assert logits.shape[-2:] == (64, 64)
    for stride in (3, 32, 0, True, 2.0):
        with pytest.raises(ValueError, match="patch_stride must be one of"):
            SyntheticTinyRecipe(sam2_patch_stride=stride)


def test_the_recipe_sets_the_language_models_heads():
    processor = build_recipe_processor(SyntheticTinyRecipe(**SMOKE))
    tokenizer = PerceptioDepthTokenizer(SyntheticTinyRecipe(**SMOKE).depth_tokenizer_config())
    default = build_recipe_model(SyntheticTinyRecipe(**SMOKE), processor, tokenizer).config.text_config
    assert default.num_attention_heads == default.hidden_size // 48
    model = build_recipe_model(SyntheticTinyRecipe(**SMOKE, text_num_attention_heads=8), processor, tokenizer)
    text = model.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads) == (8, 8)
    assert model.model.language_model.layers[0].self_attn.head_dim == text.hidden_size // 8
    for heads in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="text_num_attention_heads"):
            SyntheticTinyRecipe(text_hidden_size=192, text_num_attention_heads=heads)


@pytest.mark.parametrize("curriculum", [((0, 10),), ((7, 10),), ((1, 0),), ((1,),), (5,), ((1.5, 10),)])
def test_reading_curriculum_phases_are_validated(curriculum):
    with pytest.raises(ValueError, match="reading_curriculum"):
        SyntheticTinyRecipe(reading_curriculum=curriculum)


@pytest.mark.parametrize(
    ("phase", "message"),
    [
        ((1, 10, "vqa_colour"), "non-empty tuple of task names"),
        ((1, 10, ()), "non-empty tuple of task names"),
        ((1, 10, ("referring",)), "its tasks must be reading_tasks"),
        ((1, 10, ("vqa_colour",), 4), "optionally with a tuple of tasks"),
    ],
)
def test_a_phase_naming_tasks_is_validated(phase, message):
    with pytest.raises(ValueError, match=message):
        SyntheticTinyRecipe(reading_curriculum=(phase,))
    restricted = SyntheticTinyRecipe(reading_curriculum=[[1, 5, ["vqa_colour"]], [2, 5]]).reading_curriculum
    assert restricted == ((1, 5, ("vqa_colour",)), (2, 5))


def test_a_phase_naming_tasks_trains_on_those_questions_alone(tmp_path):
    curriculum = ((1, 2, ("vqa_colour",)), (1, 1))
    recipe, train, processor, model = _stage_inputs(tmp_path, reading_curriculum=curriculum, reading_steps=1)
    log = train_recipe_reading_stage(recipe, model, processor, train, tmp_path, "full")
    tasks = [{name.removeprefix("loss_lm/") for name in entry if name.startswith("loss_lm/")} for entry in log]
    assert [entry["objects_per_scene"] for entry in log] == [1, 1, 1, 0]
    assert tasks[:2] == [{"vqa_colour"}, {"vqa_colour"}]
    assert len(set().union(*tasks[2:])) > 1, "the unrestricted phases mix the reading tasks"
    assert (tmp_path / "reading-1-objects-vqa_colour").is_dir()


def test_reading_curriculum_needs_scenes_and_reading_tasks():
    with pytest.raises(ValueError, match="reading_curriculum_scenes"):
        SyntheticTinyRecipe(reading_curriculum_scenes=0)
    with pytest.raises(ValueError, match="reading_tasks"):
        SyntheticTinyRecipe(reading_steps=0, reading_tasks=())
    assert SyntheticTinyRecipe(reading_curriculum=[[1, 5]]).reading_curriculum == ((1, 5),)


def test_reading_curriculum_phases_render_scenes_of_their_object_count(tmp_path):
    recipe = SyntheticTinyRecipe(**SMOKE)
    rows = reading_curriculum_split(recipe, 2, tmp_path)
    assert len(rows) == recipe.reading_curriculum_scenes and set(rows["task"]) <= set(recipe.reading_tasks)
    assert not any(rows["use_depth_block"]) and not any("depth" in prompt for prompt in rows["prompt"])
    assert all(len(render_scene(seed, recipe.image_size, num_objects=2).objects) == 2 for seed in rows["scene_seed"])


def test_a_phase_naming_tasks_renders_all_its_questions_for_them(tmp_path):
    recipe = SyntheticTinyRecipe(**SMOKE)
    rows = reading_curriculum_split(recipe, 3, tmp_path, ("vqa_count",))
    assert len(rows) == recipe.reading_curriculum_scenes and set(rows["task"]) == {"vqa_count"}
    assert all(len(render_scene(seed, recipe.image_size, num_objects=3).objects) == 3 for seed in rows["scene_seed"])


def test_the_curriculum_asks_about_absent_attributes_as_often_as_the_recipe_says(tmp_path):
    def zero_counts(share):
        recipe = SyntheticTinyRecipe(
            **{**SMOKE, "reading_curriculum_scenes": 60, "reading_count_random_query_share": share}
        )
        rows = reading_curriculum_split(recipe, 1, tmp_path / str(share))
        return sum(task == "vqa_count" and answer == "0" for task, answer in zip(rows["task"], rows["answer"]))

    assert zero_counts(0.0) == 0 and zero_counts(1.0) >= 5
    with pytest.raises(ValueError, match="reading_count_random_query_share"):
        SyntheticTinyRecipe(reading_count_random_query_share=1.5)


def test_the_scenes_do_not_depend_on_how_many_processes_render_them(tmp_path):
    rows = {
        processes: reading_curriculum_split(
            SyntheticTinyRecipe(**{**SMOKE, "render_processes": processes}), 2, tmp_path / str(processes)
        )
        for processes in (1, 2)
    }
    assert rows[1]["scene_seed"] == rows[2]["scene_seed"] and rows[1]["prompt"] == rows[2]["prompt"]
    assert SyntheticTinyRecipe().num_render_processes == os.cpu_count()


def test_the_prompt_loss_trains_toward_the_grounding_prompts_only_when_weighted(tmp_path):
    dataset = build_synthetic_dataset(
        16, 1, 1, image_size=32, seed=0, tasks={"referring": 1.0}, cache_dir=str(tmp_path / "cache")
    )
    prompts = AttributePromptEmbedding(tiny_sam2_config().mask_decoder_config.hidden_size)
    off = SyntheticTinyRecipe(**SMOKE)
    assert off.seg_prompt_loss_weight == 0.0, "the embedded checkpoint's recipe trains without it"
    processor = build_recipe_processor(off)
    tokenizer = PerceptioDepthTokenizer(off.depth_tokenizer_config())
    log = train_recipe_model(
        off,
        build_recipe_model(off, processor, tokenizer),
        processor,
        dataset["train"],
        tmp_path / "a",
        prompt_embedding=prompts,
    )
    assert all(entry["loss_seg_prompt"] == 0 for entry in log)
    weighted = SyntheticTinyRecipe(**SMOKE, seg_prompt_loss_weight=0.3)
    model = build_recipe_model(weighted, processor, tokenizer)
    log = train_recipe_model(weighted, model, processor, dataset["train"], tmp_path / "b", prompt_embedding=prompts)
    assert model.config.seg_prompt_loss_weight == 0.3 and any(entry["loss_seg_prompt"] > 0 for entry in log)
    # Without attribute heads the prompt targets still come from the phrases' attributes.
    headless = SyntheticTinyRecipe(**SMOKE, seg_attribute_loss_weight=0.0, seg_prompt_loss_weight=0.3)
    model = build_recipe_model(headless, processor, tokenizer)
    log = train_recipe_model(headless, model, processor, dataset["train"], tmp_path / "c", prompt_embedding=prompts)
    assert model.seg_attribute_heads is None and any(entry["loss_seg_prompt"] > 0 for entry in log)
    with pytest.raises(ValueError, match="seg_prompt_loss_weight"):
        SyntheticTinyRecipe(seg_prompt_loss_weight=-1.0)


def test_vision_marked_share_marks_points_in_the_vision_stages_scenes():
    recipe = SyntheticTinyRecipe(**SMOKE, vision_marked_share=1.0)
    train, evaluation = render_recipe_vision_scenes(recipe, build_recipe_processor(recipe), 6, 16)
    assert all((scenes.patch_markers >= 0).any(1).float().mean() > 0.5 for scenes in (train, evaluation))
    plain, _ = render_recipe_vision_scenes(SyntheticTinyRecipe(**SMOKE), build_recipe_processor(recipe), 6, 16)
    assert (plain.patch_markers < 0).all() and torch.equal(plain.patch_objects, train.patch_objects)


def test_the_recipe_fits_position_probes_into_its_projector_when_asked(tmp_path):
    recipe, _, processor, model = _stage_inputs(tmp_path, projector_position_probes=True)
    result = fit_recipe_projector(recipe, model, processor)
    assert result.row is not None and result.column is not None


def test_the_recipe_pretrains_its_tower_on_where_each_patch_is_when_asked(tmp_path):
    recipe, _, processor, model = _stage_inputs(tmp_path, vision_position_probes=True)
    result = pretrain_recipe_vision_tower(recipe, model, processor)
    assert result.final.row is not None and result.final.column is not None
    recipe, _, processor, model = _stage_inputs(tmp_path)
    assert pretrain_recipe_vision_tower(recipe, model, processor).final.column is None


def test_question_before_image_gives_a_processor_that_asks_first_and_trains():
    recipe = SyntheticTinyRecipe(**SMOKE, question_before_image=True)
    processor = build_recipe_processor(recipe)
    prompt = processor.format_prompt("What colour is the cube?")
    assert prompt.index("What colour") < prompt.index("<image>")
    assert build_recipe_processor(SyntheticTinyRecipe(**SMOKE)).text_before_images, "the embedded checkpoint's order"
    assert not build_recipe_processor(SyntheticTinyRecipe(**SMOKE, question_before_image=False)).text_before_images
    model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
    image = np.zeros((recipe.image_size, recipe.image_size, 3), dtype=np.uint8)
    example = processor.build_training_example("What colour is the cube?", "Red", images=[image])
    output = model(
        input_ids=example["input_ids"][None], pixel_values=example["pixel_values"], labels=example["labels"][None]
    )
    assert torch.isfinite(output.loss)
