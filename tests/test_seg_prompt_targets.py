"""`loss_seg_prompt`: target SAM2 prompts for [SEG]s, from the grounding stage's attribute prompts, through the
collator, to a model whose [SEG] prompts learn to match them."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import with_attribute_heads
from test_trainer import make_sample

from perceptio.data.seg_attributes import SEG_ATTRIBUTE_COLUMN, add_seg_attribute_column, seg_attribute_classes
from perceptio.models.perceptio.loss_perceptio import seg_prompt_loss
from perceptio.trainers.collator_perceptio import PerceptioDataCollator
from perceptio.trainers.grounding_pretraining import AttributePromptEmbedding
from perceptio.trainers.seg_prompt_targets import PROMPT_TARGET_KINDS, SEG_PROMPT_COLUMN, add_seg_prompt_column
from perceptio.trainers.synthetic_recipe import add_seg_targets
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe


def prompt_width(model) -> int:
    return model.config.sam2_config.mask_decoder_config.hidden_size


def test_the_loss_is_normalised_by_the_targets_and_skips_rows_without_one():
    targets = torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0], [math.nan] * 3])
    prompts = torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0], [9.0, 9.0, 9.0]], requires_grad=True)
    assert seg_prompt_loss(prompts, targets).item() == pytest.approx(0.0)
    assert seg_prompt_loss(torch.zeros(3, 3), targets).item() == pytest.approx(1.0)
    off = prompts.detach().clone()
    off[0] += torch.tensor([3.0, 0.0, 0.0])
    assert seg_prompt_loss(off, targets).item() == pytest.approx(9.0 / 34.0)
    untargeted = seg_prompt_loss(prompts, torch.full((3, 3), math.nan))
    untargeted.backward()
    assert untargeted.item() == 0.0 and prompts.grad is not None and not prompts.grad.any()


def test_targets_are_the_attribute_prompts_of_phrases_that_name_their_object_alone(labelled_rows):
    prompts = AttributePromptEmbedding(8)
    rows = add_seg_prompt_column(labelled_rows, prompts)
    kinds = set()
    for row in rows:
        if not row["masks"]:
            assert row[SEG_PROMPT_COLUMN] == []
            continue
        targets = torch.tensor(row[SEG_PROMPT_COLUMN])
        assert targets.shape == (len(row["masks"]), 8)
        kind = json.loads(row["meta"])["kind"]
        kinds.add(kind in PROMPT_TARGET_KINDS)
        if kind in PROMPT_TARGET_KINDS:
            expected = prompts(torch.tensor(row[SEG_ATTRIBUTE_COLUMN])).detach()
            torch.testing.assert_close(targets, expected)
        else:
            assert targets.isnan().all()
    assert kinds == {True, False}


def test_recipe_rows_give_the_heads_their_target_and_the_prompts_the_named_attributes(tiny_pair, labelled_rows):
    """With the "referred" target the heads learn each object's own attributes and ranks, while the prompt targets
    stay the grounding stage's prompts of what the phrase names."""
    rows = labelled_rows.remove_columns(SEG_ATTRIBUTE_COLUMN)
    prompts = AttributePromptEmbedding(8)
    recipe = SyntheticTinyRecipe(seg_attribute_target="referred", seg_prompt_loss_weight=1.0)
    model = with_attribute_heads(tiny_pair[0], seg_attribute_classes("referred"))
    targets = add_seg_targets(recipe, model, rows, prompts)
    assert targets[SEG_ATTRIBUTE_COLUMN] == add_seg_attribute_column(rows, "referred")[SEG_ATTRIBUTE_COLUMN]
    named = add_seg_prompt_column(add_seg_attribute_column(rows, "named"), prompts)
    for with_targets, expected in zip(targets[SEG_PROMPT_COLUMN], named[SEG_PROMPT_COLUMN]):
        torch.testing.assert_close(torch.tensor(with_targets), torch.tensor(expected), equal_nan=True)
    without_heads = add_seg_targets(recipe, tiny_pair[0], rows, prompts)
    assert SEG_ATTRIBUTE_COLUMN not in without_heads.column_names and SEG_PROMPT_COLUMN in without_heads.column_names


def test_targets_need_the_attribute_labels(labelled_rows):
    with pytest.raises(ValueError, match="add_seg_attribute_column"):
        add_seg_prompt_column(labelled_rows.remove_columns(SEG_ATTRIBUTE_COLUMN), AttributePromptEmbedding(8))


def test_the_collator_passes_targets_and_fills_samples_without_them(tiny_pair):
    model, processor = tiny_pair
    collator = PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer, max_num_tiles=1)
    targeted = {**make_sample(0, 2, False), SEG_PROMPT_COLUMN: [[0.5, -1.0], [math.nan, math.nan]]}
    batch = collator([targeted, make_sample(1, 1, False), make_sample(2, 0, False)])
    first, second, third = batch[SEG_PROMPT_COLUMN]
    torch.testing.assert_close(first, torch.tensor([[0.5, -1.0], [math.nan, math.nan]]), equal_nan=True)
    assert second.shape == (1, 2) and second.isnan().all() and third.shape == (0, 2)
    assert SEG_PROMPT_COLUMN not in collator([make_sample(1, 1, False)])
    with pytest.raises(ValueError, match=r"sample 0 .*one row of prompt values per mask \(2\), got shape \(1, 2\)"):
        collator([{**make_sample(0, 2, False), SEG_PROMPT_COLUMN: [[0.5, -1.0]]}])
    with pytest.raises(ValueError, match="seg_prompt_targets rows have different lengths"):
        collator([targeted, {**make_sample(1, 1, False), SEG_PROMPT_COLUMN: [[1.0, 2.0, 3.0]]}])


def test_the_model_weights_the_term_and_checks_the_targets_shape(tiny_pair):
    model, processor = copy.deepcopy(tiny_pair[0]), tiny_pair[1]
    collator = PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer, max_num_tiles=1)
    batch = collator([make_sample(0, 2, False), make_sample(1, 0, False)])
    width = prompt_width(model)
    targets = [torch.randn(2, width), torch.zeros(0, width)]
    model.config.seg_prompt_loss_weight = 0.0
    without = model(**batch, seg_prompt_targets=targets)
    model.config.seg_prompt_loss_weight = 2.0
    weighted = model(**batch, seg_prompt_targets=targets)
    assert weighted.loss_dict["loss_seg_prompt"] > 0
    assert weighted.loss.item() == pytest.approx(
        without.loss.item() + 2.0 * weighted.loss_dict["loss_seg_prompt"].item(), rel=1e-5
    )
    assert model(**batch).loss_dict["loss_seg_prompt"].item() == 0.0
    with pytest.raises(ValueError, match=f"Sample 0 has 2 \\[SEG\\] token\\(s\\) .*of {width} values"):
        model(**batch, seg_prompt_targets=[torch.randn(2, width + 1), torch.zeros(0, width)])
    with pytest.raises(ValueError, match="seg_prompt_targets has 1 entries for a batch of 2"):
        model(**batch, seg_prompt_targets=targets[:1])


def test_the_term_teaches_the_seg_prompts_their_phrases_attribute_prompts(
    tiny_pair, labelled_rows, single_torch_thread
):
    """Overfit one batch of real referring rows on the prompt term alone: the language model and `text_hidden_fcs`
    learn to write, at each [SEG] of a phrase that names its object alone, that phrase's attribute prompt."""
    model, processor = copy.deepcopy(tiny_pair[0]), tiny_pair[1]
    torch.manual_seed(0)
    rows = add_seg_prompt_column(labelled_rows, AttributePromptEmbedding(prompt_width(model)))
    rows = rows.remove_columns(SEG_ATTRIBUTE_COLUMN)
    targeted = [
        index
        for index, row in enumerate(rows)
        if row["masks"] and json.loads(row["meta"])["kind"] in PROMPT_TARGET_KINDS
    ][:8]
    collator = PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer, max_num_tiles=1)
    batch = collator([{**rows[index], "use_depth_block": False} for index in targeted])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(90):
        loss = model(**batch).loss_dict["loss_seg_prompt"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.5 and losses[-1] < 0.05
