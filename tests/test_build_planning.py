"""Presets and the dry-run planner: counts from the meta device equal the instantiated model's."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights

from perceptio import PerceptioForConditionalGeneration
from perceptio.cli import main
from perceptio.hub_cards.planning import (
    BF16_BYTES,
    OPTIMIZER_BYTES_PER_TRAINABLE,
    PRESETS,
    build_on_meta,
    component_parameter_counts,
    get_preset,
    plan_build,
    sam2_1_hiera_large_config,
)
from perceptio.trainers.peft_presets import PerceptioLoraPreset, apply_perceptio_lora


def test_planner_counts_equal_the_instantiated_tiny_model(tiny_model):
    plan = plan_build(tiny_model.config)
    assert plan.total_parameters == sum(parameter.numel() for parameter in tiny_model.parameters())
    assert plan.component_parameters == component_parameter_counts(tiny_model)
    assert plan.component_parameters["grounding_encoder (SAM2)"] == sum(
        parameter.numel() for parameter in tiny_model.grounding_encoder.parameters()
    )
    trainable = sum(parameter.numel() for parameter in tiny_model.parameters() if parameter.requires_grad)
    assert plan.full_trainable_parameters == trainable
    assert plan.full_bytes == plan.inference_bytes + trainable * OPTIMIZER_BYTES_PER_TRAINABLE


def test_planned_inference_memory_is_what_a_bfloat16_load_holds(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = PerceptioForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    state = {id(tensor): tensor for tensor in loaded.state_dict(keep_vars=True).values()}
    held = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    assert loaded.depth_tokenizer.decoder.projection.weight.dtype == torch.float32
    assert plan_build(tiny_model.config).inference_bytes == held


@pytest.mark.parametrize("preset", [PerceptioLoraPreset(), PerceptioLoraPreset(r=8, projections=("q_proj", "v_proj"))])
def test_planner_lora_count_equals_the_real_peft_model(tiny_model, preset):
    plan = plan_build(tiny_model.config, preset)
    peft_model = apply_perceptio_lora(tiny_model, preset)
    trainable = sum(parameter.numel() for parameter in peft_model.parameters() if parameter.requires_grad)
    assert plan.lora_trainable_parameters == trainable
    assert plan.lora_bytes == plan.inference_bytes + trainable * (BF16_BYTES + OPTIMIZER_BYTES_PER_TRAINABLE)


def test_meta_model_holds_no_memory(tiny_model):
    model = build_on_meta(tiny_model.config)
    assert all(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dry_run_prints_every_component_and_the_memory(name, capsys):
    assert main(["build", "--preset", name, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for label in ("vision_tower", "language_model", "grounding_encoder (SAM2)", "text_hidden_fcs", "depth_tokenizer"):
        assert label in printed
    plan = plan_build(get_preset(name).config())
    assert f"{plan.total_parameters:,}" in printed
    assert "inference" in printed and "LoRA fine-tuning" in printed and "full fine-tuning" in printed
    # LoRA trains a small fraction; full fine-tuning trains all but the frozen depth tokenizer.
    assert plan.lora_trainable_parameters < plan.full_trainable_parameters / 10
    assert plan.inference_bytes < plan.lora_bytes < plan.full_bytes


def test_eight_b_preset_is_internvl3_8b_sized():
    plan = plan_build(get_preset("perceptio-8b").config())
    internvl = sum(
        plan.component_parameters[name]
        for name in ("vision_tower", "multi_modal_projector", "language_model", "lm_head")
    )
    # InternVL3-8B is published as 7.94B parameters; the spatial tokens add 131 rows to its embeddings and head.
    assert 7.9e9 < internvl < 8.0e9


def test_preset_sam2_config_matches_the_sam2_package_hiera_large():
    from perceptio.hub_cards.convert_sam2_original import build_original_sam2, sam2_config_from_original

    with init_empty_weights():  # parameters on meta: the shapes are all the config derivation reads
        original = build_original_sam2("configs/sam2.1/sam2.1_hiera_l.yaml")
    derived = sam2_config_from_original(original).to_dict()
    preset = sam2_1_hiera_large_config().to_dict()
    for section in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        derived_section = {key: value for key, value in derived[section].items() if key != "backbone_config"}
        preset_section = {key: value for key, value in preset[section].items() if key != "backbone_config"}
        assert derived_section == preset_section, section
    assert derived["vision_config"]["backbone_config"] == preset["vision_config"]["backbone_config"]


def test_dry_run_needs_a_known_preset(capsys):
    assert main(["build", "--dry-run"]) == 2
    assert "--preset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="perceptio-4b"):
        get_preset("perceptio-70b")
