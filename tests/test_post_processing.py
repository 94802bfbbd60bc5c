"""processor.parse_generation / post_process_generation: structure, sizes, flags, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perceptio.models.perceptio.post_processing_perceptio import PerceptioPrediction


N = 16
ANSWERS = st.text(alphabet="abcdefghij klmnop.,?", min_size=0, max_size=30).map(str.strip)


def ids_of(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_seg=st.integers(0, 4),
    codes=st.none() | st.lists(st.integers(0, 31), min_size=N, max_size=N),
    answer=ANSWERS,
    padding=st.integers(0, 3),
)
def test_parse_recovers_what_was_formatted(tiny_processor, num_seg, codes, answer, padding):
    target = tiny_processor.format_target(num_seg, codes, answer)
    eos, pad = tiny_processor.tokenizer.eos_token_id, tiny_processor.tokenizer.pad_token_id
    ids = ids_of(tiny_processor, target) + [eos] + [pad] * padding
    parsed = tiny_processor.parse_generation(torch.tensor(ids), num_depth_tokens=N)
    assert parsed.num_seg_tokens == num_seg
    assert parsed.depth_codes == codes
    assert not parsed.depth_truncated and not parsed.depth_malformed
    assert parsed.text == answer
    assert parsed.token_ids == ids[: ids.index(eos)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_seg=st.integers(0, 3), answer=ANSWERS, trailing=st.lists(st.integers(10, 60), max_size=5))
def test_reading_stops_at_the_first_stop_token_given(tiny_processor, num_seg, answer, trailing):
    """A checkpoint whose turn ends with another token than EOS (Sa2VA's `<|im_end|>`) passes its stop ids: the
    answer ends at the first of them, whatever follows (more text, EOS, padding)."""
    end_of_turn = tiny_processor.tokenizer.convert_tokens_to_ids("<img>")
    eos = tiny_processor.tokenizer.eos_token_id
    ids = ids_of(tiny_processor, tiny_processor.format_target(num_seg, None, answer)) + [end_of_turn]
    parsed = tiny_processor.parse_generation(ids + trailing + [eos], stop_token_ids=[eos, end_of_turn])
    assert parsed.token_ids == ids[:-1] and parsed.text == answer and parsed.num_seg_tokens == num_seg
    assert not parsed.seg_truncated
    (prediction,) = tiny_processor.post_process_generation([ids + trailing], stop_token_ids=[end_of_turn])
    assert prediction.token_ids == ids[:-1] and prediction.text == answer


def test_stop_token_ids_must_be_ids(tiny_processor):
    with pytest.raises(ValueError, match="stop_token_ids"):
        tiny_processor.parse_generation([1, 2], stop_token_ids=["</s>"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_seg=st.integers(0, 3), cut=st.integers(1, N + 1))
def test_a_block_cut_short_is_truncated(tiny_processor, num_seg, cut):
    target = tiny_processor.format_target(num_seg, list(range(N)), "x")
    ids = ids_of(tiny_processor, target)
    start = ids.index(tiny_processor.spatial_vocabulary.depth_start)
    parsed = tiny_processor.parse_generation(ids[: start + cut], num_depth_tokens=N)
    assert parsed.depth_truncated and not parsed.depth_malformed and parsed.depth_codes is None
    assert parsed.num_seg_tokens == num_seg


@pytest.mark.parametrize(
    "make",
    [
        lambda s: [s.depth_start, *[s.depth_code_offset] * (N - 1), s.depth_end],  # too few codes
        lambda s: [s.depth_code_offset, s.depth_start, *[s.depth_code_offset] * N, s.depth_end],  # stray code
        lambda s: [s.depth_end],  # end without start
        lambda s: [s.depth_start, *[s.depth_code_offset] * N, s.depth_end] * 2,  # two blocks
    ],
)
def test_malformed_blocks_are_flagged(tiny_processor, make):
    parsed = tiny_processor.parse_generation(make(tiny_processor.spatial_vocabulary), num_depth_tokens=N)
    assert parsed.depth_malformed and parsed.depth_codes is None and not parsed.depth_truncated


def test_post_process_resizes_masks_and_depth(tiny_processor):
    spatial = tiny_processor.spatial_vocabulary
    rows = [
        [spatial.seg, spatial.seg, spatial.depth_start, *[spatial.depth_code_offset + 2] * N, spatial.depth_end, 70],
        [spatial.seg, 71, 72, tiny_processor.tokenizer.eos_token_id] + [tiny_processor.tokenizer.pad_token_id] * 17,
    ]
    logits = [torch.randn(2, 32, 32), torch.randn(1, 32, 32)]
    logits[0][0] = 5.0  # all foreground
    logits[0][1] = -5.0  # all background
    scores = [torch.tensor([0.9, 0.1]), torch.tensor([0.5])]
    depth = torch.linspace(-1, 1, 32 * 32).view(32, 32)
    first, second = tiny_processor.post_process_generation(
        torch.tensor(rows),
        original_sizes=[(20, 50), (7, 9)],
        mask_logits=logits,
        mask_scores=scores,
        depth_maps=[depth, None],
        num_depth_tokens=N,
    )
    assert [m.shape for m in first.masks] == [(20, 50), (20, 50)] and second.masks[0].shape == (7, 9)
    assert first.masks[0].all() and not first.masks[1].any()
    assert first.mask_scores == pytest.approx([0.9, 0.1])
    assert first.depth.shape == (20, 50) and first.depth[0].mean() < first.depth[-1].mean()
    assert first.depth_codes == [2] * N and second.depth is None
    assert second.token_ids == [spatial.seg, 71, 72]
    summary = json.loads(json.dumps(first.to_json_dict()))
    assert summary["num_masks"] == 2 and summary["mask_areas"] == [1000, 0] and summary["depth_size"] == [20, 50]


def test_post_process_skips_the_prompt(tiny_processor):
    spatial = tiny_processor.spatial_vocabulary
    (result,) = tiny_processor.post_process_generation([[spatial.seg, 5, 6, 70]], prompt_length=3)
    assert result.token_ids == [70] and result.masks == []


def test_text_only_post_processing_needs_no_sizes(tiny_processor):
    (result,) = tiny_processor.post_process_generation([ids_of(tiny_processor, "hello there")])
    assert isinstance(result, PerceptioPrediction) and result.text == "hello there"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"mask_logits": [torch.zeros(2, 8, 8)], "mask_scores": [torch.zeros(2)], "original_sizes": [(4, 4)]},
            "1 \\[SEG\\] token.*2 mask",
        ),
        ({"mask_logits": [torch.zeros(1, 8, 8)], "mask_scores": [torch.zeros(1)]}, "original_sizes"),
        ({"mask_logits": [torch.zeros(1, 8, 8)]}, "together"),
        ({"original_sizes": [(4, 4), (5, 5)]}, "2 entries for 1"),
        ({"original_sizes": [(0, 4)]}, "positive"),
        ({"prompt_length": -1}, "prompt_length"),
        ({"mask_threshold": "0.5"}, "mask_threshold"),
        ({"num_depth_tokens": 0}, "num_depth_tokens"),
    ],
)
def test_bad_post_processing_arguments_raise(tiny_processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor.post_process_generation([[tiny_processor.spatial_vocabulary.seg, 70]], **kwargs)


def test_complete_depth_block_without_a_map_raises(tiny_processor):
    spatial = tiny_processor.spatial_vocabulary
    ids = [spatial.depth_start, *[spatial.depth_code_offset] * N, spatial.depth_end]
    with pytest.raises(ValueError, match="no depth map"):
        tiny_processor.post_process_generation([ids], original_sizes=[(4, 4)], num_depth_tokens=N)


@pytest.mark.parametrize("bad", [torch.zeros(2, 2, 2, dtype=torch.long), "abc", [[1.5, 2]], torch.zeros(3)])
def test_bad_generated_ids_raise(tiny_processor, bad):
    with pytest.raises(ValueError):
        tiny_processor.post_process_generation(bad)


def test_image_sizes_are_height_width(tiny_processor):
    assert tiny_processor.image_sizes([np.zeros((5, 7, 3), np.uint8), np.zeros((2, 3), np.uint8)]) == [(5, 7), (2, 3)]
