"""SAM2's attribute-prompt pretraining on rendered scenes (the synthetic recipe's stand-in for a released SAM2)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perceptio.data.seg_attributes import SEG_ATTRIBUTES
from perceptio.trainers.grounding_pretraining import (
    UNSPECIFIED_IDS,
    AttributePromptEmbedding,
    attribute_prompt_candidates,
    grounding_gate,
    pretrain_grounding_encoder,
    render_instance_scenes,
    sample_attribute_prompts,
    unique_phrase_ids,
)


@pytest.fixture(scope="module")
def scenes(tiny_pair):
    image_processor = tiny_pair[1].image_processor
    return (
        render_instance_scenes(24, image_processor, seed=0, stream="train"),
        render_instance_scenes(8, image_processor, seed=0, stream="eval"),
    )


def test_rendered_scenes_are_sam2_inputs_with_exact_instance_masks_and_attributes(scenes, tiny_pair):
    train, _ = scenes
    size = tiny_pair[1].image_processor.sam_image_size
    assert train.sam_pixel_values.shape == (24, 3, size, size)
    for masks, attributes in zip(train.instance_masks, train.object_attributes):
        assert masks.dtype == torch.bool and masks.shape[1:] == (size, size)
        assert (masks.sum(0) <= 1).all(), "instance masks overlap"
        assert attributes.shape == (masks.shape[0], 3)
        assert (attributes >= 0).all() and (attributes < UNSPECIFIED_IDS).all()


def test_train_and_eval_streams_are_disjoint_and_reproducible(scenes, tiny_pair):
    train, evaluation = scenes
    again = render_instance_scenes(8, tiny_pair[1].image_processor, seed=0, stream="eval", processes=2)
    assert torch.equal(again.sam_pixel_values, evaluation.sam_pixel_values), "the same scenes from two processes"
    assert not torch.equal(train.sam_pixel_values[:8], evaluation.sam_pixel_values)


def _picks_out(attributes: torch.Tensor, visible: torch.Tensor, phrase: torch.Tensor) -> list[int]:
    named = phrase != UNSPECIFIED_IDS
    return [
        index
        for index in range(len(attributes))
        if visible[index] and (attributes[index][named] == phrase[named]).all()
    ]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(*(st.integers(0, len(names) - 1) for names in SEG_ATTRIBUTES.values())),
        min_size=1,
        max_size=6,
        unique=True,
    ),
    st.data(),
)
def test_a_sampled_phrase_names_its_object_and_no_other(objects, data):
    attributes = torch.tensor(objects)
    visible = torch.ones(len(objects), dtype=torch.bool)
    target = data.draw(st.integers(0, len(objects) - 1))
    phrase = unique_phrase_ids(
        attributes, visible, target, torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    )
    assert (phrase != UNSPECIFIED_IDS).any()
    assert _picks_out(attributes, visible, phrase) == [target]


def test_prompts_ask_for_distinct_objects_of_each_scene(scenes):
    train, _ = scenes
    indices = [index for index in range(len(train)) if len(train.promptable_objects(index)) >= 3][:4]
    attribute_ids, targets = sample_attribute_prompts(train, indices, 3, torch.Generator().manual_seed(0))
    assert attribute_ids.shape == (len(indices), 3, 3) and targets.shape[:2] == (len(indices), 3)
    for scene_targets in targets:
        assert not (scene_targets[0] & scene_targets[1]).any() and not (scene_targets[1] & scene_targets[2]).any()


def test_pretraining_trains_sam2_only_and_makes_masks_follow_the_prompt(scenes, tiny_model):
    train, evaluation = scenes
    text_before = {name: value.clone() for name, value in tiny_model.model.named_parameters()}
    result = pretrain_grounding_encoder(
        tiny_model,
        train,
        evaluation,
        steps=40,
        batch_size=8,
        learning_rate=3e-3,
        image_encoder_learning_rate=1e-3,
        logging_steps=10,
    )
    assert [entry["step"] for entry in result.log] == [10, 20, 30, 40]
    assert result.final.prompt_iou > result.initial.prompt_iou + 0.05
    assert 0.0 <= result.final.two_object_overlap <= 1.0 and result.final.image_embedding_norm > 0
    assert all(torch.equal(value, text_before[name]) for name, value in tiny_model.model.named_parameters())
    # The attribute prompts SAM2 was trained with come back, frozen: they reproduce the final gate.
    assert not any(parameter.requires_grad for parameter in result.prompt_embedding.parameters())
    assert grounding_gate(tiny_model, result.prompt_embedding, evaluation, seed=0) == result.final
    assert json.loads(json.dumps(result.summary()))["final"]["prompt_iou"] == pytest.approx(result.final.prompt_iou)


def test_pretraining_gates_as_many_training_scenes_as_are_held_out(scenes, tiny_pair):
    train, evaluation = scenes

    def pretrain(held_out):
        return pretrain_grounding_encoder(copy.deepcopy(tiny_pair[0]), train, held_out, steps=3, batch_size=4)

    # Held out on the first 8 training scenes, the two gates are of the same scenes.
    on_training = pretrain(train.first(8))
    assert on_training.training == on_training.final
    # Held out on other scenes, training goes the same way and the training gate is still of the first 8.
    held_out = pretrain(evaluation)
    assert held_out.training == on_training.final and held_out.final != held_out.training
    assert json.loads(json.dumps(held_out.summary()))["training"]["prompt_iou"] == pytest.approx(
        held_out.training.prompt_iou
    )
    assert len(train.first(8)) == 8 and len(train.first(1000)) == len(train)


def test_a_prompt_blind_decoder_fails_the_gate(scenes, tiny_pair):
    _, evaluation = scenes
    model = tiny_pair[0]
    prompts = AttributePromptEmbedding(model.grounding_encoder.config.mask_decoder_config.hidden_size)
    with torch.no_grad():
        for table in prompts.tables:
            table.weight.zero_()
    gate = grounding_gate(model, prompts, evaluation, seed=0)
    assert gate.two_object_overlap == pytest.approx(1.0)


def test_candidates_have_one_row_per_prompt(scenes, tiny_pair):
    train, _ = scenes
    model = tiny_pair[0]
    prompts = AttributePromptEmbedding(model.grounding_encoder.config.mask_decoder_config.hidden_size)
    attribute_ids, _ = sample_attribute_prompts(train, [0, 1, 2], 2, torch.Generator().manual_seed(1))
    logits, scores, _ = attribute_prompt_candidates(model, prompts, train.sam_pixel_values[:3], attribute_ids)
    assert logits.shape[:3] == scores.shape == (3, 2, model.grounding_encoder.mask_decoder.num_multimask_outputs)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": -1}, "batch_size"),
        ({"prompts_per_image": 0}, "prompts_per_image"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"image_encoder_learning_rate": -1.0}, "image_encoder_learning_rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"schedule": "linear"}, "schedule"),
    ],
)
def test_pretraining_settings_are_validated(scenes, tiny_model, arguments, message):
    train, evaluation = scenes
    with pytest.raises(ValueError, match=message):
        pretrain_grounding_encoder(tiny_model, train, evaluation, **{"steps": 1, **arguments})


def test_scene_rendering_settings_are_validated(tiny_pair):
    with pytest.raises(ValueError, match="num_scenes"):
        render_instance_scenes(0, tiny_pair[1].image_processor, seed=0)
    with pytest.raises(ValueError, match="stream"):
        render_instance_scenes(1, tiny_pair[1].image_processor, seed=0, stream="test")
