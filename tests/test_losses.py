"""Perceptio's losses against values worked out by hand on small logits."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from perceptio.models.perceptio.loss_perceptio import (
    depth_code_logits,
    depth_code_targets,
    depth_count_loss,
    depth_marker_loss,
    depth_token_loss,
    gather_block_steps,
    segmentation_loss,
)
from perceptio.models.perceptio.spatial_vocabulary_perceptio import PerceptioSpatialVocabulary


# Vocabulary of 12: text 0..3, codes 4..6 (K = 3), [SEG] = 9, <DEPTH_START> = 10, <DEPTH_END> = 11; N = 2 codes per block.
IDS = PerceptioSpatialVocabulary(
    seg=9, depth_start=10, depth_end=11, depth_code_offset=4, num_depth_codes=3, num_depth_tokens=2
)
VOCAB = 12
# Labels: text, <DEPTH_START> at 2, codes 0 and 2 at 3 and 4, <DEPTH_END> at 5, text.
LABELS = torch.tensor([[-100, 1, 10, 4, 6, 11, 2]])


def zero_logits() -> torch.Tensor:
    return torch.zeros(1, LABELS.shape[1], VOCAB)


def block_steps(logits: torch.Tensor, labels: torch.Tensor = LABELS, ids: PerceptioSpatialVocabulary = IDS):
    """The blocks of `labels` and the logits at their N + 2 steps."""
    blocks = ids.find_depth_blocks(labels)
    return blocks, gather_block_steps(logits, blocks, ids.num_depth_tokens)


def test_find_depth_blocks_locates_the_block():
    blocks = IDS.find_depth_blocks(LABELS)
    assert blocks.samples.tolist() == [0]
    assert blocks.starts.tolist() == [2]
    assert blocks.ends.tolist() == [5]


@pytest.mark.parametrize(
    "row, message",
    [
        ([10, 4, 5, 11, 10, 4, 5, 11], "2 depth blocks"),
        ([1, 10, 4, 5, 2], "no <DEPTH_END>"),
        ([1, 10, 4, 2, 11], "non-code tokens"),
        ([1, 10, 4, 11], "has 1 codes but exactly 2"),
        ([1, 2, 11], "<DEPTH_END> without <DEPTH_START>"),
    ],
)
def test_find_depth_blocks_rejects_malformed_blocks_naming_the_sample(row, message):
    valid = [1, 10, 4, 5, 11]
    length = max(len(valid), len(row))
    labels = torch.tensor([valid + [-100] * (length - len(valid)), row + [-100] * (length - len(row))])
    with pytest.raises(ValueError, match=f"Sample 1.*{message}|Sample 1 has {message}"):
        IDS.find_depth_blocks(labels)


def test_loss_count_is_zero_when_code_mass_over_span_is_exactly_n():
    # Code logits ln 6 against 9 zero logits: mass 3·6 / (3·6 + 9) = 2/3 at each of the N + 1 = 3 span steps, sum 2 = N.
    logits = zero_logits()
    logits[0, 2:5, 4:7] = math.log(6.0)
    _, step_logits = block_steps(logits)
    assert depth_count_loss(step_logits, IDS).item() == pytest.approx(0.0, abs=1e-7)


def test_loss_count_penalises_too_little_code_mass():
    # All-zero logits: mass 3/12 per step, 0.75 over the span; ((0.75 − 2) / 2)² = 0.390625.
    _, step_logits = block_steps(zero_logits())
    assert depth_count_loss(step_logits, IDS).item() == pytest.approx(0.390625, rel=1e-6)


def test_loss_token_is_cross_entropy_over_the_code_slice_only():
    logits = zero_logits()
    logits[0, 2:4, 0] = 100.0  # a dominant text logit must not matter for the restricted softmax
    logits[0, 2, 4] = math.log(2.0)  # step predicting code 0: p = 2 / (2 + 1 + 1) = 1/2
    blocks, step_logits = block_steps(logits)
    code_logits = depth_code_logits(step_logits, IDS)
    loss = depth_token_loss(code_logits, depth_code_targets(LABELS, blocks, IDS))
    # −ln(1/2) and −ln(1/3) (uniform over K = 3 at the step predicting code 2), averaged.
    assert loss.item() == pytest.approx((math.log(2.0) + math.log(3.0)) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(logits[0, 2:4, 4:7], torch.tensor([0, 2])).item(), rel=1e-6)


def test_depth_code_logits_is_the_k_slice_at_code_steps():
    logits = torch.randn(1, LABELS.shape[1], VOCAB)
    blocks, step_logits = block_steps(logits)
    code_logits = depth_code_logits(step_logits, IDS)
    assert code_logits.shape == (1, 2, 3)
    assert depth_code_targets(LABELS, blocks, IDS).tolist() == [[0, 2]]
    assert torch.equal(code_logits[0], logits[0, 2:4, 4:7])


def test_loss_marker_is_full_vocabulary_cross_entropy_at_the_boundaries():
    logits = zero_logits()
    logits[0, 4, 11] = math.log(11.0)  # step predicting <DEPTH_END>: p = 11 / (11 + 11) = 1/2
    _, step_logits = block_steps(logits)
    # <DEPTH_START> at uniform logits: −ln(1/12); <DEPTH_END>: −ln(1/2).
    assert depth_marker_loss(step_logits, IDS).item() == pytest.approx((math.log(12.0) + math.log(2.0)) / 2, rel=1e-6)


def _model_depth_losses(model, logits, labels, depth_maps=None):
    blocks, step_logits = block_steps(logits, labels, model.config.spatial_vocabulary)
    return model.depth_losses_of_step_logits(step_logits, blocks, labels, depth_maps)


def _tiny_block_labels(model, codes: torch.Tensor) -> torch.Tensor:
    config = model.config
    row = [
        -100,
        5,
        config.depth_start_token_id,
        *(codes + config.depth_code_token_offset).tolist(),
        config.depth_end_token_id,
        6,
    ]
    return torch.tensor([row])


def test_loss_depth_recon_reaches_code_logits_and_not_the_frozen_decoder(tiny_pair):
    model = tiny_pair[0]
    config = model.config
    codes = torch.arange(config.num_depth_tokens) % config.num_depth_codes
    labels = _tiny_block_labels(model, codes)
    logits = torch.randn(1, labels.shape[1], config.text_config.vocab_size, requires_grad=True)
    depth = torch.rand(24, 24) + 0.5
    loss = _model_depth_losses(model, logits, labels, [depth])["loss_depth_recon"]
    loss.backward()
    code_steps = slice(2, 2 + config.num_depth_tokens)
    code_ids = slice(config.depth_code_token_offset, config.depth_code_token_offset + config.num_depth_codes)
    assert logits.grad[0, code_steps, code_ids].abs().sum() > 0
    assert all(parameter.grad is None for parameter in model.depth_tokenizer.parameters())
    assert not any(parameter.requires_grad for parameter in model.depth_tokenizer.parameters())


def test_loss_depth_recon_is_l1_to_decoded_ground_truth_codes(tiny_pair):
    model = tiny_pair[0]
    config = model.config
    codes = (torch.arange(config.num_depth_tokens) * 7) % config.num_depth_codes
    labels = _tiny_block_labels(model, codes)
    code_ids = slice(config.depth_code_token_offset, config.depth_code_token_offset + config.num_depth_codes)
    with torch.no_grad():
        target = model.depth_tokenizer.decode(codes[None])
        # Near one-hot code logits on the target codes: the soft merge equals the hard decode, so L1 = 0.
        confident = torch.zeros(1, labels.shape[1], config.text_config.vocab_size)
        confident[0, 1 + torch.arange(1, config.num_depth_tokens + 1), code_ids.start + codes] = 60.0
        assert _model_depth_losses(model, confident, labels)["loss_depth_recon"].item() == pytest.approx(0.0, abs=1e-4)
        # Uniform code logits: every grid cell is the codebook mean, L1 against the decoded targets.
        uniform = torch.zeros(1, labels.shape[1], config.text_config.vocab_size)
        mixed = model.depth_tokenizer.decode_soft(torch.zeros(1, config.num_depth_tokens, config.num_depth_codes))
        expected = (mixed - target).abs().mean()
        assert _model_depth_losses(model, uniform, labels)["loss_depth_recon"].item() == pytest.approx(
            expected.item(), rel=1e-5
        )


def test_depth_losses_are_zero_without_a_depth_block(tiny_pair):
    model = tiny_pair[0]
    labels = torch.tensor([[-100, 5, 6, 7]])
    hidden_states = torch.randn(1, 4, model.config.text_config.hidden_size)
    losses = model.depth_token_losses(hidden_states, labels)
    assert all(value.item() == 0.0 for value in losses.values())


def test_depth_terms_from_hidden_states_equal_those_from_full_logits(tiny_pair):
    model = tiny_pair[0]
    config = model.config
    labels = _tiny_block_labels(model, torch.arange(config.num_depth_tokens) % config.num_depth_codes)
    hidden_states = torch.randn(1, labels.shape[1], config.text_config.hidden_size)
    with torch.no_grad():
        from_hidden = model.depth_token_losses(hidden_states, labels)
        from_logits = _model_depth_losses(model, model.lm_head(hidden_states), labels)
    for name, value in from_hidden.items():
        assert value.item() == pytest.approx(from_logits[name].item(), rel=1e-5), name


def test_segmentation_loss_supervises_each_masks_best_candidate_only():
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1.0
    perfect = (target * 2 - 1) * 20.0
    wrong = -perfect
    candidates = torch.stack([wrong, perfect, wrong], dim=1)
    perfect_alone = segmentation_loss(perfect[:, None], target, 2.0, 0.5, 1.0)
    assert segmentation_loss(candidates, target, 2.0, 0.5, 1.0) == pytest.approx(perfect_alone.item())
    assert perfect_alone < 1e-6
    uncertain = torch.stack([wrong, perfect / 20.0, wrong], dim=1).requires_grad_(True)
    segmentation_loss(uncertain, target, 2.0, 0.5, 1.0).backward()
    assert uncertain.grad[:, 1].abs().sum() > 0 and uncertain.grad[:, [0, 2]].abs().sum() == 0


def test_segmentation_loss_averages_the_best_candidates_over_masks():
    targets = torch.zeros(2, 4, 4)
    targets[0, 0] = 1.0
    targets[1, :, 0] = 1.0
    candidates = torch.randn(2, 3, 4, 4)
    per_candidate = [
        [segmentation_loss(candidates[m, c][None, None], targets[m][None], 1.0, 1.0, 1.0).item() for c in range(3)]
        for m in range(2)
    ]
    expected = sum(min(row) for row in per_candidate) / 2
    assert segmentation_loss(candidates, targets, 1.0, 1.0, 1.0).item() == pytest.approx(expected, rel=1e-5)


def test_segment_averaged_lm_loss_weighs_a_depth_block_as_one_answer():
    from perceptio.models.perceptio.loss_perceptio import segment_averaged_lm_loss

    ids = PerceptioSpatialVocabulary(
        seg=9, depth_start=10, depth_end=11, depth_code_offset=12, num_depth_codes=4, num_depth_tokens=3
    )
    logits = torch.randn(2, 8, 20)
    # Sample 0: a depth block (start, 3 codes, end) then one answer token; sample 1: three answer tokens.
    labels = torch.tensor([[-100, -100, 10, 12, 13, 14, 11, 5], [-100, -100, -100, 5, 6, 7, -100, -100]])
    token_losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100
    )
    segments = [token_losses[0, 1:6].mean(), token_losses[0, 6:7].mean(), token_losses[1, 2:5].mean()]
    assert torch.allclose(segment_averaged_lm_loss(logits, labels, ids), torch.stack(segments).mean())
    # Without depth ids each sample is one segment.
    per_sample = [token_losses[0, 1:7].mean(), token_losses[1, 2:5].mean()]
    assert torch.allclose(segment_averaged_lm_loss(logits, labels, None), torch.stack(per_sample).mean())


def test_lm_loss_reduction_is_validated():
    from perceptio import PerceptioConfig

    with pytest.raises(ValueError, match="lm_loss_reduction"):
        PerceptioConfig(lm_loss_reduction="mean")


def reference_depth_blocks(
    rows: list[list[int]], ids: PerceptioSpatialVocabulary
) -> tuple[list[int], list[int], list[int]] | str:
    """`find_depth_blocks` as a plain walk over the rows: the blocks' samples, starts and ends, or the start of the
    error message for the first malformed sample."""
    samples, starts, ends = [], [], []
    for sample, row in enumerate(rows):
        block_starts = [position for position, token in enumerate(row) if token == ids.depth_start]
        if len(block_starts) > 1:
            return f"Sample {sample} has {len(block_starts)} depth blocks"
        if not block_starts:
            if ids.depth_end in row:
                return f"Sample {sample} has <DEPTH_END> without <DEPTH_START>"
            continue
        start = block_starts[0]
        if ids.depth_end not in row[start:]:
            return f"Sample {sample}: its depth block has no <DEPTH_END>"
        end = row.index(ids.depth_end, start)
        inside = row[start + 1 : end]
        offset, num_codes = ids.depth_code_offset, ids.num_depth_codes
        non_codes = [token for token in inside if not offset <= token < offset + num_codes]
        if non_codes:
            return f"Sample {sample}: its depth block holds non-code tokens {non_codes[:5]}"
        if len(inside) != ids.num_depth_tokens:
            return f"Sample {sample}: its depth block has {len(inside)} codes but"
        samples.append(sample)
        starts.append(start)
        ends.append(end)
    return samples, starts, ends


# Text, ignored labels, the codes, 7 (just past the codes) and, now and then, a stray marker.
TEXT = st.lists(st.sampled_from([-100, -100, 0, 1, 2, 3, 4, 5, 6, 7, 10, 11]), max_size=3)
WELL_FORMED_BLOCK = st.lists(st.integers(4, 6), min_size=2, max_size=2).map(lambda codes: [10, *codes, 11])
# Up to 9 tokens between the markers, often more than 5 non-codes, so the error's list of the first 5 is tested too.
NEAR_BLOCK = st.lists(st.sampled_from([4, 5, 6, -100, 2, 7, 7, 10, 11]), max_size=9).map(
    lambda inside: [10, *inside, 11]
)
LABEL_ROW = st.tuples(TEXT, st.just([]) | WELL_FORMED_BLOCK | WELL_FORMED_BLOCK | NEAR_BLOCK, TEXT).map(
    lambda parts: sum(parts, [])
)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(LABEL_ROW, min_size=1, max_size=3))
def test_find_depth_blocks_matches_a_plain_walk_over_the_labels(rows):
    length = max(len(row) for row in rows)
    rows = [row + [-100] * (length - len(row)) for row in rows]
    labels = torch.tensor(rows, dtype=torch.long)
    expected = reference_depth_blocks(rows, IDS)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match="^" + re.escape(expected)):
            IDS.find_depth_blocks(labels)
        return
    blocks = IDS.find_depth_blocks(labels)
    for found, wanted in zip((blocks.samples, blocks.starts, blocks.ends), expected):
        assert found.dtype == torch.long and found.shape == (len(wanted),) and found.tolist() == wanted
