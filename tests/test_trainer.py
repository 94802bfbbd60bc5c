"""PerceptioTrainer, its collator, the PEFT preset, the task mixture and `perceptio train`, on the tiny model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import with_attribute_heads
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import TrainingArguments

from perceptio.cli import main as cli_main
from perceptio.data.seg_attributes import seg_attribute_classes
from perceptio.data.synthetic_dataset import build_synthetic_dataset
from perceptio.models.perceptio.loss_perceptio import LOSS_TERMS, LossTerm
from perceptio.trainers.collator_perceptio import PerceptioDataCollator
from perceptio.trainers.data_mixture import (
    add_depth_code_column,
    mix_task_datasets,
    referring_to_samples,
    validate_task_weights,
)
from perceptio.trainers.peft_presets import (
    PerceptioLoraPreset,
    apply_perceptio_lora,
    load_perceptio_adapter,
    merge_perceptio_adapter,
    spatial_token_ids,
)
from perceptio.trainers.trainer_perceptio import NonFiniteLossError, PerceptioTrainer, module_learning_rate
from perceptio.trainers.training_config import DataArguments, parse_training_config
from perceptio.trainers.training_run import build_train_dataset


TINY_CONFIG = Path(__file__).parents[1] / "examples" / "configs" / "tiny-cpu.yaml"
IMAGE_SIDE = 32


def make_sample(seed: int, num_masks: int, depth_block: bool, image: bool = True, answer: str = "Here it is.") -> dict:
    rng = np.random.default_rng(seed)
    masks = []
    for index in range(num_masks):
        mask = np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
        mask[4 + index : 20 + index, 6:22] = 255
        masks.append(mask)
    return {
        "image": Image.fromarray(rng.integers(0, 256, size=(IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))
        if image
        else None,
        "prompt": f"Find object {seed}.",
        "answer": answer,
        "masks": masks,
        "depth": rng.uniform(1.0, 6.0, size=(IMAGE_SIDE, IMAGE_SIDE)).astype(np.float32),
        "use_depth_block": depth_block,
        "task": "referring" if num_masks else "vqa",
    }


@pytest.fixture()
def collator(tiny_pair):
    model, processor = tiny_pair
    return PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer, max_num_tiles=1)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=1,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


# ---- collator ------------------------------------------------------------------------------------------------------


def test_collator_builds_a_padded_batch_with_any_subset_of_targets(tiny_pair, collator):
    processor = tiny_pair[1]
    samples = [make_sample(0, 2, True), make_sample(1, 0, False, image=False), make_sample(2, 1, False)]
    batch = collator(samples)
    ids = processor.spatial_vocabulary
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["sam_pixel_values"].shape == (3, 3, 128, 128)
    assert batch["sam_pixel_values"][1].abs().sum() == 0  # image-less sample gets a zero SAM2 image
    assert batch["pixel_values"].shape[0] == 2  # one tile for each sample that has an image
    assert [masks.shape[0] for masks in batch["gt_masks"]] == [2, 0, 1]
    assert [(row == ids.seg).sum().item() for row in batch["input_ids"]] == [2, 0, 1]
    assert batch["depth_maps"][1] is None and batch["depth_maps"][2] is None
    # Metric depth becomes relative inverse depth 1/z (larger = nearer).
    assert torch.allclose(batch["depth_maps"][0], torch.from_numpy(1.0 / samples[0]["depth"]))
    assert (batch["labels"][0] == ids.depth_start).sum() == 1 and (batch["labels"][1] == ids.depth_start).sum() == 0


def test_collator_uses_cached_codes_and_they_match_the_tokenizer(tiny_pair, collator):
    model, processor = tiny_pair
    sample = make_sample(3, 0, True)
    codes = model.depth_tokenizer.encode(torch.from_numpy(1.0 / sample["depth"])[None])[0]
    labels = collator([sample])["labels"][0]
    in_block = labels[
        (labels >= processor.spatial_vocabulary.depth_code_offset)
        & (labels < processor.spatial_vocabulary.depth_code_offset + 32)
    ]
    assert torch.equal(in_block - processor.spatial_vocabulary.depth_code_offset, codes)
    cached = dict(sample, depth_codes=list(range(model.config.num_depth_tokens)))
    labels = collator([cached])["labels"][0]
    start = (labels == processor.spatial_vocabulary.depth_start).nonzero().item()
    block = labels[start + 1 : start + 1 + model.config.num_depth_tokens]
    assert (block - processor.spatial_vocabulary.depth_code_offset).tolist() == list(
        range(model.config.num_depth_tokens)
    )


def test_collator_rejects_wrong_code_count_naming_the_sample(tiny_pair, collator):
    bad = dict(make_sample(1, 0, True), depth_codes=[0] * (tiny_pair[0].config.num_depth_tokens - 1))
    with pytest.raises(ValueError, match=r"sample 1 .*15 codes but exactly 16"):
        collator([make_sample(0, 0, False), bad])


def test_collator_rejects_codes_outside_the_codebook_naming_the_sample(tiny_pair, collator):
    codes = [0] * (tiny_pair[0].config.num_depth_tokens - 1) + [32]
    with pytest.raises(ValueError, match=r"sample 0 .*\[0, 32\)"):
        collator([dict(make_sample(0, 0, True), depth_codes=codes)])


def test_collator_rejects_seg_count_different_from_mask_count(tiny_pair, collator):
    processor = tiny_pair[1]
    example = processor.build_training_example("Segment it.", processor.format_target(2, None, "Here."))
    example["gt_masks"] = torch.ones(1, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"sample 1 has 2 \[SEG\] token\(s\) but 1 mask"):
        collator([make_sample(0, 0, False), example])


def test_collator_rejects_a_depth_sample_without_depth(collator):
    sample = dict(make_sample(0, 0, True), depth=None)
    with pytest.raises(ValueError, match="sample 0 .*neither 'inverse_depth' nor metric 'depth'"):
        collator([sample])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.booleans()), min_size=1, max_size=3))
def test_collator_batch_matches_each_samples_targets(collator, tiny_pair, layout):
    seg = tiny_pair[1].spatial_vocabulary.seg
    samples = [make_sample(index, masks, depth, image) for index, (masks, depth, image) in enumerate(layout)]
    batch = collator(samples)
    assert len(batch["gt_masks"]) == len(batch["depth_maps"]) == batch["sam_pixel_values"].shape[0] == len(samples)
    for row, (masks, depth, image) in enumerate(layout):
        assert (batch["input_ids"][row] == seg).sum() == masks == batch["gt_masks"][row].shape[0]
        assert (batch["depth_maps"][row] is not None) == depth
        assert (batch["sam_pixel_values"][row].abs().sum() > 0) == image
    assert batch.get("pixel_values", torch.zeros(0)).shape[0] == sum(image for _, _, image in layout)


# ---- training ------------------------------------------------------------------------------------------------------


STEPS = 8


def test_a_few_steps_lower_every_loss_component_on_a_repeated_batch(tiny_attribute_model, collator):
    model = tiny_attribute_model
    target_prompt = torch.linspace(-1.0, 1.0, model.config.sam2_config.mask_decoder_config.hidden_size)
    batch = collator(
        [{**make_sample(0, 1, True), "seg_attributes": [[2, 1]], "seg_prompt_targets": [target_prompt.tolist()]}]
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    history = []
    for _ in range(STEPS):
        outputs = model(**batch)
        history.append({name: getattr(outputs, name).item() for name in LOSS_TERMS})
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
    # loss_mask_iou regresses on a moving target (the candidates' actual IoU), so it need not fall in a few steps.
    for name in (name for name in LOSS_TERMS if name != "loss_mask_iou"):
        assert history[-1][name] < history[0][name], (name, [step[name] for step in history])


def _one_sgd_step_delta(model, collator, tmp_path, **args) -> dict[str, torch.Tensor]:
    dataset = Dataset.from_list(
        [make_sample(0, 1, True, answer="Red cube."), make_sample(1, 1, True, answer="Blue cube.")]
    )
    before = {
        name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad
    }
    arguments = training_args(
        tmp_path, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant", **args
    )
    PerceptioTrainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator).train()
    return {name: parameter.detach() - before[name] for name, parameter in model.named_parameters() if name in before}


def test_gradient_accumulation_2x1_equals_batch_2(tiny_pair, collator, tmp_path):
    # Both samples have the same label count, one mask and one depth block, so the per-batch means coincide.
    accumulated = _one_sgd_step_delta(
        copy.deepcopy(tiny_pair[0]), collator, tmp_path / "ga", gradient_accumulation_steps=2
    )
    batched = _one_sgd_step_delta(
        copy.deepcopy(tiny_pair[0]), collator, tmp_path / "b2", per_device_train_batch_size=2
    )
    scale = max(delta.abs().max().item() for delta in batched.values())
    worst = max((accumulated[name] - batched[name]).abs().max().item() for name in batched)
    # Tolerance: float32 summation-order differences, 1e-4 of the largest gradient entry.
    assert scale > 0 and worst <= 1e-4 * scale, (worst, scale)


def test_trainer_logs_every_component_as_window_mean(tiny_model, collator, tmp_path):
    dataset = Dataset.from_list([make_sample(0, 1, True), make_sample(1, 0, False)])
    trainer = PerceptioTrainer(
        model=tiny_model,
        args=training_args(tmp_path, max_steps=1, logging_steps=1, gradient_accumulation_steps=2),
        train_dataset=dataset,
        data_collator=collator,
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 1 and all(math.isfinite(logged[0][name]) for name in LOSS_TERMS)
    # The total is the weighted sum of the component means (all weights are 1 in the tiny config).
    assert logged[0]["loss"] == pytest.approx(sum(logged[0][name] for name in LOSS_TERMS), rel=1e-4)


def test_a_term_added_to_the_registry_alone_is_summed_logged_and_configurable(
    tiny_model, collator, tmp_path, monkeypatch
):
    # A new mask term: its registry entry, its value from the mask stage and its config weight, nothing else.
    monkeypatch.setitem(LOSS_TERMS, "loss_mask_extra", LossTerm("mask_extra_loss_weight", "mask"))
    tiny_model.config.mask_extra_loss_weight = 0.25
    mask_losses = type(tiny_model).mask_losses
    monkeypatch.setattr(
        type(tiny_model),
        "mask_losses",
        lambda self, *args: {**mask_losses(self, *args), "loss_mask_extra": torch.tensor(2.0)},
    )
    batch = collator([make_sample(0, 1, True)])
    with torch.no_grad():
        outputs = tiny_model(**batch)
        tiny_model.config.mask_extra_loss_weight = 0.0
        without = tiny_model(**batch).loss
        tiny_model.config.mask_extra_loss_weight = 0.25
    assert outputs.loss_dict["loss_mask_extra"] == outputs.loss_mask_extra == 2.0
    torch.testing.assert_close(outputs.loss, without + 0.25 * 2.0)
    trainer = PerceptioTrainer(
        model=tiny_model,
        args=training_args(tmp_path, learning_rate=0.0),
        train_dataset=Dataset.from_list([make_sample(0, 1, True)]),
        data_collator=collator,
    )
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged["loss_mask_extra"] == pytest.approx(2.0)
    raw = {
        "training": {"output_dir": str(tmp_path)},
        "data": {"synthetic_num_train": 1},
        "loss": {"mask_extra_loss_weight": 0.5},
    }
    assert parse_training_config(raw).loss.overrides() == {"mask_extra_loss_weight": 0.5}


def test_non_finite_component_stops_training_naming_it(tiny_model, collator, tmp_path):
    with torch.no_grad():
        tiny_model.depth_tokenizer.decoder.projection.weight.fill_(float("nan"))
    trainer = PerceptioTrainer(
        model=tiny_model,
        args=training_args(tmp_path),
        train_dataset=Dataset.from_list([make_sample(0, 1, True)]),
        data_collator=collator,
    )
    with pytest.raises(NonFiniteLossError, match="loss_depth_recon=nan") as error:
        trainer.train()
    assert "loss_lm" not in str(error.value)


def test_a_module_learning_rate_scales_that_modules_steps_alone(tiny_model, collator, tmp_path):
    before = {name: parameter.detach().clone() for name, parameter in tiny_model.named_parameters()}
    trainer = PerceptioTrainer(
        model=tiny_model,
        args=training_args(tmp_path, lr_scheduler_type="constant"),
        train_dataset=Dataset.from_list([make_sample(0, 1, True)]),
        data_collator=collator,
        module_learning_rates={"model.vision_tower": 1e-5},
    )
    trainer.train()

    def largest_step(prefix: str) -> float:
        return max(
            (parameter.detach() - before[name]).abs().max().item()
            for name, parameter in tiny_model.named_parameters()
            if name.startswith(prefix)
        )

    # Adam's first step moves every weight with a gradient by about its learning rate.
    assert 0 < largest_step("model.vision_tower.") <= 1.5e-5
    assert largest_step("model.language_model.") > 5e-4
    rates = sorted({group["lr"] for group in trainer.optimizer.param_groups})
    assert rates == [1e-5, 1e-3]


@pytest.mark.parametrize(
    ("rates", "message"),
    [
        ({"model.vision_towr": 1e-4}, "names no module"),
        ({"model.vision_tower": 0.0}, "positive number"),
        ({"model.vision_tower": True}, "positive number"),
        (["model.vision_tower"], "map module paths"),
    ],
)
def test_module_learning_rates_are_validated(tiny_model, collator, tmp_path, rates, message):
    with pytest.raises(ValueError, match=message):
        PerceptioTrainer(
            model=tiny_model,
            args=training_args(tmp_path),
            train_dataset=Dataset.from_list([make_sample(0, 1, True)]),
            data_collator=collator,
            module_learning_rates=rates,
        )


def test_the_longest_matching_module_sets_the_rate_behind_any_wrapper_prefix():
    rates = {"model.vision_tower": 1e-4, "model.vision_tower.encoder.layers.1": 1e-5}
    assert module_learning_rate("model.vision_tower.embeddings.weight", rates, 1e-3) == 1e-4
    assert module_learning_rate("base_model.model.model.vision_tower.encoder.layers.1.w", rates, 1e-3) == 1e-5
    assert module_learning_rate("model.vision_towers.w", rates, 1e-3) == 1e-3
    assert module_learning_rate("model.language_model.w", rates, 1e-3) == 1e-3


# ---- PEFT ----------------------------------------------------------------------------------------------------------


def test_lora_preset_trains_the_right_parts_and_saves_loads_merges(tiny_pair, collator, tmp_path):
    base = copy.deepcopy(tiny_pair[0])
    peft_model = apply_perceptio_lora(copy.deepcopy(base), PerceptioLoraPreset(r=4, alpha=8))
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert any("language_model.layers.0.self_attn.q_proj.lora_A" in name for name in trainable)
    assert any("language_model.layers.0.mlp.down_proj.lora_B" in name for name in trainable)
    assert any("mask_decoder.modules_to_save" in name for name in trainable)
    assert any("text_hidden_fcs.modules_to_save" in name for name in trainable)
    assert not any(
        "vision_tower" in name or "vision_encoder" in name or "depth_tokenizer" in name for name in trainable
    )
    assert not any("lora" in name and "language_model" not in name for name in trainable)
    token_deltas = [parameter for name, parameter in peft_model.named_parameters() if "trainable_tokens_delta" in name]
    assert len(token_deltas) == 2 and all(delta.shape[0] == len(spatial_token_ids(base)) for delta in token_deltas)

    batch = collator([make_sample(0, 1, True)])
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.02 * torch.randn_like(parameter))
    peft_model.eval()
    with torch.no_grad():
        reference = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_perceptio_adapter(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, reference)
        merged = merge_perceptio_adapter(loaded).eval()
        assert type(merged) is type(base)
        assert torch.allclose(merged(**batch).logits, reference, atol=1e-4)
        assert not torch.allclose(base.eval()(**batch).logits, reference, atol=1e-2)


def test_lora_preset_trains_and_saves_the_seg_attribute_heads(tiny_attribute_model, tmp_path):
    base = copy.deepcopy(tiny_attribute_model)
    peft_model = apply_perceptio_lora(copy.deepcopy(base), PerceptioLoraPreset(r=4, alpha=8))
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert sum("seg_attribute_heads" in name and "modules_to_save" in name for name in trainable) == 4
    states = torch.randn(3, base.config.text_config.hidden_size)
    with torch.no_grad():
        for parameter in peft_model.base_model.model.seg_attribute_heads.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5)
        trained = [head(states) for head in peft_model.base_model.model.seg_attribute_heads]
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = merge_perceptio_adapter(load_perceptio_adapter(copy.deepcopy(base), tmp_path / "adapter"))
    with torch.no_grad():
        for head, expected, original in zip(merged.seg_attribute_heads, trained, base.seg_attribute_heads):
            assert torch.allclose(head(states), expected) and not torch.allclose(original(states), expected)


def test_lora_adapter_path_must_exist(tiny_pair, tmp_path):
    with pytest.raises(ValueError, match="not a saved adapter folder"):
        load_perceptio_adapter(copy.deepcopy(tiny_pair[0]), tmp_path)


# ---- data ----------------------------------------------------------------------------------------------------------


def test_mixture_follows_task_weights_and_caches_depth_codes(tiny_pair):
    model = tiny_pair[0]
    rows = [make_sample(index, 0, True, image=False) for index in range(2)]
    depth_data = add_depth_code_column(
        Dataset.from_list(rows).remove_columns(["image", "masks"]), model.depth_tokenizer
    )
    assert all(len(codes) == model.config.num_depth_tokens for codes in depth_data["depth_codes"])
    expected = model.depth_tokenizer.encode(torch.from_numpy(1.0 / rows[0]["depth"])[None])[0].tolist()
    assert depth_data[0]["depth_codes"] == expected
    task_a = Dataset.from_dict({"task": ["a"] * 200, "value": list(range(200))})
    task_b = Dataset.from_dict({"task": ["b"] * 200, "value": list(range(200))})
    mixed = mix_task_datasets({"a": task_a, "b": task_b}, {"a": 3.0, "b": 1.0}, stopping_strategy="first_exhausted")
    share_a = mixed["task"].count("a") / len(mixed)
    assert 0.65 < share_a < 0.85
    streamed = mix_task_datasets(
        {"a": task_a.to_iterable_dataset(), "b": task_b.to_iterable_dataset()}, {"a": 1, "b": 1}
    )
    assert {row["task"] for _, row in zip(range(20), streamed)} == {"a", "b"}
    with pytest.raises(ValueError, match=r"must weigh the tasks \['a'\]: \['b'\] are not among them and \['a'\] have"):
        mix_task_datasets({"a": task_a}, {"b": 1.0})


@pytest.mark.parametrize(
    ("weights", "options", "message"),
    [
        ({"a": -1.0}, {}, r"must be non-negative numbers, got \{'a': -1.0\}"),
        ({"a": True}, {}, "must be non-negative numbers"),
        ({"a": float("nan")}, {}, "must be non-negative numbers"),
        ({"a": "1"}, {}, "must be non-negative numbers"),
        ({"a": 0, "b": 0}, {}, "positive weight"),
        ({"a": 1.0}, {"tasks": ["a", "b"]}, r"\['b'\] have no weight"),
        ({"a": 1.0, "c": 1.0}, {"tasks": ["a"], "default": 1.0}, r"\['c'\] are not among them"),
        ({"a": 0.0}, {"tasks": ["a", "b"], "default": 0.0}, "positive weight"),
    ],
)
def test_task_weights_are_checked_by_one_function(weights, options, message):
    with pytest.raises(ValueError, match=message):
        validate_task_weights(weights, **options)


def test_task_weights_left_out_take_the_default_and_every_caller_checks_alike(tmp_path):
    assert validate_task_weights({"a": 2}, ["a", "b"], default=1.0) == {"a": 2.0, "b": 1.0}
    # The tasks of a YAML file are known only once its data is built: a lone zero weight is no error yet.
    assert validate_task_weights({"a": 0}, default=1.0) == {"a": 0.0}
    raw = {"training": {"output_dir": str(tmp_path)}, "data": {"synthetic_num_train": 1, "task_weights": {"a": True}}}
    with pytest.raises(ValueError, match="data.task_weights must be non-negative numbers"):
        parse_training_config(raw)


def test_referring_rows_become_samples_with_one_seg_per_mask(collator):
    mask = np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    mask[3:9, 3:9] = 1
    referring = Dataset.from_dict(
        {
            "image": [np.zeros((IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)],
            "expression": [["the red cube", "left cube"]],
            "mask": [mask],
        }
    )
    samples = referring_to_samples(referring, use_depth_block=False)
    assert len(samples) == 2 and "the red cube" in samples[0]["prompt"]
    batch = collator([samples[0]])
    assert batch["gt_masks"][0].shape == (1, IMAGE_SIDE, IMAGE_SIDE) and batch["gt_masks"][0].sum() == 36


# ---- the command ---------------------------------------------------------------------------------------------------


def _write_config(tmp_path: Path, name: str, **training) -> Path:
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["training"].update(output_dir=str(tmp_path / name), logging_steps=1, **training)
    config["data"]["cache_dir"] = str(tmp_path / "data_cache")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _losses(state_file: Path) -> dict[int, dict[str, float]]:
    history = json.loads(state_file.read_text())["log_history"]
    return {entry["step"]: entry for entry in history if "loss" in entry}


@pytest.mark.slow
def test_train_command_runs_and_resume_reproduces_the_loss_trajectory(tmp_path):
    full = _write_config(tmp_path, "full")
    assert cli_main(["train", "--config", str(full)]) == 0
    uninterrupted = _losses(tmp_path / "full" / "checkpoint-4" / "trainer_state.json")
    assert sorted(uninterrupted) == [1, 2, 3, 4]
    assert (tmp_path / "full" / "model.safetensors").is_file()

    resumed_config = _write_config(tmp_path, "resumed")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert cli_main(["train", "--config", str(resumed_config), "--resume", str(checkpoint)]) == 0
    resumed = _losses(tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json")
    for step in (3, 4):
        for name in ("loss", *LOSS_TERMS):
            assert resumed[step][name] == pytest.approx(uninterrupted[step][name], rel=1e-4, abs=1e-6), (step, name)


def test_train_command_smoke_one_step(tmp_path):
    config = _write_config(tmp_path, "smoke", max_steps=1, save_steps=1)
    assert cli_main(["train", "--config", str(config)]) == 0
    logged = _losses(tmp_path / "smoke" / "checkpoint-1" / "trainer_state.json")[1]
    assert all(math.isfinite(logged[name]) for name in LOSS_TERMS)


def test_train_command_rejects_unknown_config_keys(tmp_path, capsys):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["model"]["lora_rank"] = 8
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["train", "--config", str(path)]) == 2
    assert "unknown keys ['lora_rank']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "--recipe", "no-such-recipe"])
    assert cli_main(["train", "--recipe", "synthetic-tiny"]) == 2


def test_train_command_takes_module_learning_rates_and_rejects_an_unknown_module(tmp_path, capsys):
    config = yaml.safe_load(_write_config(tmp_path, "rates", max_steps=1, save_steps=1).read_text())
    config["model"].update(freeze_vision_tower=False, module_learning_rates={"model.vision_tower": 1e-9})
    path = tmp_path / "rates.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["train", "--config", str(path)]) == 0
    state = json.loads((tmp_path / "rates" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    config["model"]["module_learning_rates"] = {"model.vision_towr": 1e-4}
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["train", "--config", str(path)]) == 2
    assert "'model.vision_towr' names no module" in capsys.readouterr().err


def test_train_command_rejects_an_unknown_lm_loss_reduction(tmp_path, capsys):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["loss"]["lm_loss_reduction"] = "mean"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["train", "--config", str(path)]) == 2
    assert "lm_loss_reduction" in capsys.readouterr().err


@pytest.fixture()
def synthetic_attribute_model(tiny_pair):
    """The tiny model with `[SEG]` attribute heads for the synthetic scenes' attributes (colour, shape, size)."""
    return with_attribute_heads(tiny_pair[0], seg_attribute_classes())


def test_train_command_trains_the_attribute_heads_of_a_checkpoint_that_has_them(
    synthetic_attribute_model, tiny_pair, tmp_path
):
    synthetic_attribute_model.save_pretrained(tmp_path / "with-heads")
    tiny_pair[1].save_pretrained(tmp_path / "with-heads")
    config = yaml.safe_load(_write_config(tmp_path, "heads", max_steps=1, save_steps=1).read_text())
    config["model"]["model_name_or_path"] = str(tmp_path / "with-heads")
    config["data"]["task_weights"] = {"referring": 1.0, "relative_depth": 0.0}
    path = tmp_path / "heads-config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["train", "--config", str(path)]) == 0
    logged = _losses(tmp_path / "heads" / "checkpoint-1" / "trainer_state.json")[1]
    assert logged["loss_seg_attribute"] > 0.1, "the synthetic rows must carry the heads' labels"


def test_training_data_labels_synthetic_rows_and_leaves_other_datasets_unlabelled(synthetic_attribute_model, tmp_path):
    own = build_synthetic_dataset(6, 0, 0, image_size=32, seed=3, tasks=["referring"], cache_dir=str(tmp_path / "c"))
    own["train"].save_to_disk(str(tmp_path / "own-referring"))
    data = DataArguments(
        synthetic_num_train=6,
        synthetic_image_size=32,
        dataset_paths={"own_referring": str(tmp_path / "own-referring")},
        cache_dir=str(tmp_path / "cache"),
        cache_depth_codes=False,
    )
    rows = list(build_train_dataset(data, synthetic_attribute_model))
    labelled = [row for row in rows if row["seg_attributes"]]
    assert labelled and all(len(row["seg_attributes"]) == len(row["masks"]) for row in labelled)
    assert any(not row["seg_attributes"] and row["masks"] for row in rows), "the own dataset has no labels"


def test_training_data_refuses_attribute_heads_the_synthetic_labels_do_not_fit(tiny_attribute_model, tmp_path):
    data = DataArguments(synthetic_num_train=2, synthetic_image_size=32, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"heads have \[4, 3\] classes"):
        build_train_dataset(data, tiny_attribute_model)
