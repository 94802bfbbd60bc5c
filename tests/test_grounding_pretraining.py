"""SAM2's point-prompt pretraining on rendered scenes (the synthetic recipe's stand-in for a released SAM2)."""

from __future__ import annotations

import pytest
import torch

from perceptio.trainers.grounding_pretraining import (
    point_prompt_candidates,
    point_prompt_iou,
    pretrain_grounding_encoder,
    render_instance_scenes,
    sample_point_prompts,
)


@pytest.fixture(scope="module")
def scenes(tiny_pair):
    image_processor = tiny_pair[1].image_processor
    return (
        render_instance_scenes(24, image_processor, seed=0, stream="train"),
        render_instance_scenes(8, image_processor, seed=0, stream="eval"),
    )


def test_rendered_scenes_are_sam2_inputs_with_exact_instance_masks(scenes, tiny_pair):
    train, _ = scenes
    size = tiny_pair[1].image_processor.sam_image_size
    assert train.sam_pixel_values.shape == (24, 3, size, size)
    for masks in train.instance_masks:
        assert masks.dtype == torch.bool and masks.shape[1:] == (size, size)
        assert (masks.sum(0) <= 1).all(), "instance masks overlap"


def test_train_and_eval_streams_are_disjoint_and_reproducible(scenes, tiny_pair):
    train, evaluation = scenes
    again = render_instance_scenes(8, tiny_pair[1].image_processor, seed=0, stream="eval")
    assert torch.equal(again.sam_pixel_values, evaluation.sam_pixel_values)
    assert not torch.equal(train.sam_pixel_values[:8], evaluation.sam_pixel_values)


def test_point_prompts_lie_inside_the_mask_they_ask_for(scenes):
    train, _ = scenes
    points, targets = sample_point_prompts(train, list(range(len(train))), torch.Generator().manual_seed(0))
    for (x, y), target in zip(points.long().tolist(), targets):
        assert target[y, x]


def test_pretraining_trains_sam2_only_and_raises_point_prompt_iou(scenes, tiny_model):
    train, evaluation = scenes
    text_before = {name: value.clone() for name, value in tiny_model.model.named_parameters()}
    result = pretrain_grounding_encoder(tiny_model, train, evaluation, steps=40, batch_size=8, learning_rate=3e-3,
                                        logging_steps=10)
    assert [entry["step"] for entry in result.log] == [10, 20, 30, 40]
    assert result.point_prompt_iou > result.initial_point_prompt_iou + 0.05
    assert result.point_prompt_iou == pytest.approx(point_prompt_iou(tiny_model, evaluation, seed=0))
    assert all(torch.equal(value, text_before[name]) for name, value in tiny_model.model.named_parameters())


def test_candidates_have_one_row_per_point(scenes, tiny_pair):
    train, _ = scenes
    points, _ = sample_point_prompts(train, [0, 1, 2], torch.Generator().manual_seed(1))
    logits, scores = point_prompt_candidates(tiny_pair[0], train.sam_pixel_values[:3], points)
    assert logits.shape[:2] == scores.shape == (3, tiny_pair[0].grounding_encoder.mask_decoder.num_multimask_outputs)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"steps": 0}, "steps"), ({"batch_size": -1}, "batch_size"), ({"learning_rate": 0.0}, "learning_rate")],
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
