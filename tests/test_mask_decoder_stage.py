"""The mask-decoder stage trains on `[SEG]` states computed once: the same gradients as the full forward."""

from __future__ import annotations

import pytest
import torch

from perceptio import PerceptioDepthTokenizer
from perceptio.data.synthetic_dataset import build_synthetic_dataset
from perceptio.trainers.collator_perceptio import PerceptioDataCollator
from perceptio.trainers.data_mixture import add_depth_code_column
from perceptio.trainers.mask_decoder_stage import (
    MaskDecoderStageSettings,
    SegStateRows,
    batch_indices,
    collect_seg_states,
    train_mask_decoder_on_seg_states,
)
from perceptio.trainers.synthetic_recipe import (
    ablate,
    build_recipe_model,
    build_recipe_processor,
    referring_rows_with_masks,
)
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe


TINY = dict(num_threads=1, render_processes=1, batch_size=4)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A recipe model frozen as the stage freezes it, its collator and referring rows with depth blocks."""
    recipe = SyntheticTinyRecipe(**TINY)
    cache = tmp_path_factory.mktemp("scenes")
    rows = build_synthetic_dataset(
        6, 0, 0, image_size=recipe.image_size, seed=1, tasks={"referring": 1.0}, cache_dir=str(cache)
    )["train"]
    processor = build_recipe_processor(recipe)
    torch.manual_seed(0)
    model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
    model.requires_grad_(False)
    model.text_hidden_fcs.requires_grad_(True)
    model.grounding_encoder.mask_decoder.requires_grad_(True)
    rows = add_depth_code_column(referring_rows_with_masks(rows), model.depth_tokenizer)
    return model, PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer), rows


def trained_gradients(model) -> dict[str, torch.Tensor | None]:
    """Each trainable weight's gradient (None where the loss does not reach it), then clears them."""
    gradients = {
        name: None if parameter.grad is None else parameter.grad.clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    model.zero_grad(set_to_none=True)
    return gradients


def test_the_states_computed_once_give_the_full_forwards_gradients(stage):
    model, collator, rows = stage
    assert len(rows) >= 4 and any(rows["use_depth_block"][:4]), "the [SEG] states come before a depth block"
    model.train()
    batch = collator([rows[index] for index in range(4)])
    model(**batch).loss.backward()
    full = trained_gradients(model)

    data = collect_seg_states(model, collator, rows, batch_size=3)
    assert len(data) == len(rows) and [states.shape[0] for states in data.seg_states] == [
        masks.shape[0] for masks in data.gt_masks
    ]
    masks = model.predict_masks(data.seg_states[:4], torch.stack(data.sam_pixel_values[:4]))
    terms = model.predicted_mask_losses(masks, data.gt_masks[:4])
    (
        model.config.mask_loss_weight * terms["loss_mask"] + model.config.mask_iou_loss_weight * terms["loss_mask_iou"]
    ).backward()
    from_states = trained_gradients(model)

    assert full.keys() == from_states.keys()
    reached = {name for name, gradient in full.items() if gradient is not None}
    assert reached == {name for name, gradient in from_states.items() if gradient is not None}
    assert any(name.startswith("text_hidden_fcs.") for name in reached)
    assert any(full[name].abs().sum() > 0 for name in reached)
    for name in reached:
        torch.testing.assert_close(from_states[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_stage_trains_only_the_weights_that_require_gradients(stage):
    model, collator, rows = stage
    data = collect_seg_states(model, collator, rows, batch_size=4)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    settings = MaskDecoderStageSettings(
        steps=3, learning_rate=1e-3, batch_size=2, warmup_steps=1, logging_steps=2, seed=0
    )
    log = train_mask_decoder_on_seg_states(model, data, settings)
    assert [entry["step"] for entry in log] == [2, 3]
    weights = model.config.mask_loss_weight, model.config.mask_iou_loss_weight
    for entry in log:
        assert entry["loss_mask"] > 0 and entry["loss_mask_iou"] > 0
        assert entry["loss"] == pytest.approx(weights[0] * entry["loss_mask"] + weights[1] * entry["loss_mask_iou"])
    assert log[0]["learning_rate"] == pytest.approx(1e-3) and log[1]["learning_rate"] < 1e-3, "cosine after warmup"
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(
        name.startswith(("text_hidden_fcs.", "grounding_encoder.mask_decoder.")) for name in changed
    )
    model.load_state_dict(before)


def test_rows_without_a_seg_are_refused(stage):
    model, collator, rows = stage
    with pytest.raises(ValueError, match="has no \\[SEG\\] token"):
        collect_seg_states(model, collator, ablate(rows, "no-seg"), batch_size=4)


def test_every_row_is_drawn_once_per_pass_in_a_new_order():
    batches = batch_indices(7, 3, torch.Generator().manual_seed(0))
    first = [next(batches) for _ in range(3)]
    second = [next(batches) for _ in range(3)]
    assert [len(batch) for batch in first] == [3, 3, 1]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(7))
    assert sum(first, []) != sum(second, [])


@pytest.mark.parametrize(
    ("field", "value"), [("steps", 0), ("batch_size", -1), ("logging_steps", 1.5), ("learning_rate", 0.0)]
)
def test_settings_are_validated(field, value):
    settings = dict(steps=2, learning_rate=1e-3, batch_size=2, warmup_steps=0, logging_steps=1, seed=0)
    with pytest.raises(ValueError, match=field):
        MaskDecoderStageSettings(**{**settings, field: value})


def test_an_empty_stage_is_refused(stage):
    model, _, _ = stage
    settings = MaskDecoderStageSettings(
        steps=1, learning_rate=1e-3, batch_size=1, warmup_steps=0, logging_steps=1, seed=0
    )
    with pytest.raises(ValueError, match="no rows"):
        train_mask_decoder_on_seg_states(model, SegStateRows([], [], []), settings)


def test_rows_without_an_image_are_refused_naming_them(stage):
    model, collator, rows = stage
    imageless = rows.select(range(3)).map(lambda row: {"image": None})
    with pytest.raises(ValueError, match="Rows 0 to 2 have no image"):
        collect_seg_states(model, collator, imageless, batch_size=4)
