"""The spatial grammar LogitsProcessor: a reference check on random prefixes, and generation under random logits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessor

from perceptio.models.perceptio.generation_perceptio import PerceptioSpatialGrammarLogitsProcessor
from perceptio.models.perceptio.spatial_vocabulary_perceptio import PerceptioSpatialVocabulary


SEG, START, END, OFFSET, K, N, VOCAB = 3, 4, 5, 10, 6, 3, 20
CODES = range(OFFSET, OFFSET + K)
TEXT_TOKENS = [0, 1, 2, 6, 7, 8, 9, 16, 17, 18, 19]
VOCABULARY_FIELDS = dict(
    seg=SEG, depth_start=START, depth_end=END, depth_code_offset=OFFSET, num_depth_codes=K, num_depth_tokens=N
)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def grammar(prompt_length: int = 0, max_depth_blocks: int = 1, prompts_with_images=None):
    return PerceptioSpatialGrammarLogitsProcessor(
        PerceptioSpatialVocabulary(**VOCABULARY_FIELDS), prompt_length, max_depth_blocks, prompts_with_images
    )


def allowed_next(
    generated: list[int],
    seg: int,
    start: int,
    end: int,
    codes: range,
    n: int,
    max_blocks: int = 1,
    has_image: bool = True,
):
    """Reference: the set of tokens the grammar allows after `generated` ("text" = any non-spatial token too)."""
    blocks, in_block, count = 0, False, 0
    for token in generated:
        if token == start:
            blocks, in_block, count = blocks + 1, True, 0
        elif token in codes:
            count += 1
        elif token == end:
            in_block = False
    if in_block:
        return {end} if count == n else set(codes)
    if not has_image:
        return {"text"}
    spatial = {start} if blocks < max_blocks else set()
    if blocks == 0:
        spatial.add(seg)
    return spatial | {"text"}


def obeys_grammar(
    generated: list[int],
    seg: int,
    start: int,
    end: int,
    codes: range,
    n: int,
    max_blocks: int = 1,
    has_image: bool = True,
):
    for index, token in enumerate(generated):
        allowed = allowed_next(generated[:index], seg, start, end, codes, n, max_blocks, has_image)
        is_spatial = token in (seg, start, end) or token in codes
        if (token not in allowed) if is_spatial else ("text" not in allowed):
            return False
    return True


@st.composite
def grammatical_prefixes(draw, has_image: bool = True):
    """Random sequences built by walking the grammar (so every state, including a full block, is reached)."""
    generated = []
    for _ in range(draw(st.integers(0, 14))):
        allowed = allowed_next(generated, SEG, START, END, CODES, N, has_image=has_image)
        choices = sorted(token for token in allowed if token != "text")
        if "text" in allowed:
            choices += TEXT_TOKENS
        generated.append(draw(st.sampled_from(choices)))
    return generated


@settings(max_examples=150, deadline=None)
@given(
    st.data(),
    st.one_of(st.none(), st.lists(st.booleans(), min_size=1, max_size=3)),
    st.integers(1, 2),
    st.integers(0, 3),
)
def test_allowed_tokens_match_the_reference_for_every_row(data, prompts_with_images, copies, prompt_length):
    # Rows are prompts x copies (beams), consecutive; None means every prompt has an image.
    flags = prompts_with_images if prompts_with_images is not None else [True] * data.draw(st.integers(1, 3))
    row_images = [flag for flag in flags for _ in range(copies)]
    rows = [data.draw(grammatical_prefixes(has_image)) for has_image in row_images]
    length = max(map(len, rows))
    prompt = torch.full((len(rows), prompt_length), SEG)  # spatial tokens in the prompt must not count
    # Rows of one batch have equal length: shorter ones start with neutral text tokens, which change no state.
    padded = torch.tensor([[7] * (length - len(row)) + row for row in rows], dtype=torch.long)
    input_ids = torch.cat([prompt, padded], dim=1)
    scores = grammar(prompt_length, prompts_with_images=prompts_with_images)(input_ids, torch.zeros(len(rows), VOCAB))
    for row_index, (row, has_image) in enumerate(zip(rows, row_images)):
        generated = [7] * (length - len(row)) + row
        expected = allowed_next(generated, SEG, START, END, CODES, N, has_image=has_image)
        allowed = {token for token in range(VOCAB) if scores[row_index, token] > float("-inf")}
        spatial_expected = {token for token in expected if token != "text"}
        spatial_allowed = {token for token in allowed if token in (SEG, START, END) or OFFSET <= token < OFFSET + K}
        assert spatial_allowed == spatial_expected
        assert ("text" in expected) == bool(allowed - spatial_allowed)
        assert ("text" in expected) == (allowed - spatial_allowed == set(TEXT_TOKENS))


def test_several_depth_blocks_when_allowed():
    codes = list(range(OFFSET, OFFSET + N))
    one_block = [START, *codes, END]
    scores = grammar(max_depth_blocks=2)(torch.tensor([one_block]), torch.zeros(1, VOCAB))
    assert scores[0, START] == 0 and scores[0, SEG] == float("-inf")
    scores = grammar(max_depth_blocks=1)(torch.tensor([one_block]), torch.zeros(1, VOCAB))
    assert scores[0, START] == float("-inf")


def test_zero_depth_blocks_forbids_the_block():
    scores = grammar(max_depth_blocks=0)(torch.tensor([[SEG]]), torch.zeros(1, VOCAB))
    assert scores[0, START] == float("-inf") and scores[0, SEG] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_depth_tokens": 0}, "num_depth_tokens"),
        ({"num_depth_tokens": None}, "needs N"),
        ({"prompt_length": -1}, "prompt_length"),
        ({"max_depth_blocks": -1}, "max_depth_blocks"),
        ({"seg": START}, "distinct"),
        ({"depth_end": OFFSET + 1}, "outside the code ids"),
    ],
)
def test_bad_grammar_arguments_raise(kwargs, message):
    vocabulary_fields = {**VOCABULARY_FIELDS, **{k: v for k, v in kwargs.items() if k in VOCABULARY_FIELDS}}
    grammar_arguments = {"prompt_length": 0, **{k: v for k, v in kwargs.items() if k not in VOCABULARY_FIELDS}}
    with pytest.raises(ValueError, match=message):
        PerceptioSpatialGrammarLogitsProcessor(PerceptioSpatialVocabulary(**vocabulary_fields), **grammar_arguments)


def test_input_shorter_than_prompt_raises():
    with pytest.raises(ValueError, match="prompt_length"):
        grammar(prompt_length=5)(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, VOCAB))


def test_prompt_flags_must_be_bools_that_divide_the_rows():
    with pytest.raises(ValueError, match="prompts_with_images must be a non-empty 1-D"):
        grammar(prompts_with_images=[1, 0])
    with pytest.raises(ValueError, match="3 rows for 2 prompts"):
        grammar(prompts_with_images=[True, False])(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, VOCAB))


class RandomSpatialLogits(LogitsProcessor):
    """Replaces the model's logits with seeded noise that strongly favours the spatial tokens.

    The favour must beat the largest of several hundred text tokens' noise (about 3 standard deviations above their
    mean), or greedy decoding may write no depth block in a whole sequence.
    """

    def __init__(self, seed: int, spatial_ids: list[int], eos_token_id: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.spatial_ids = spatial_ids
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids, scores):
        noise = torch.randn(scores.shape, generator=self.generator) * 3
        noise[:, self.spatial_ids] += 12
        noise[:, self.eos_token_id] -= 4
        return noise


@pytest.mark.parametrize(
    "mode", [{"do_sample": False}, {"do_sample": True, "top_k": 0}, {"num_beams": 3, "do_sample": False}]
)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_generated_sequences_obey_the_grammar(tiny_pair, rgb_image, mode, seed):
    # Sampling draws from torch's global generator: seed it too, so each example replays exactly.
    torch.manual_seed(seed)
    model, processor = tiny_pair
    config = model.config
    codes = range(config.depth_code_token_offset, config.depth_code_token_offset + config.num_depth_codes)
    spatial = [config.seg_token_id, config.depth_start_token_id, config.depth_end_token_id, *codes]
    # The first two prompts have an image, the third none (it may write no spatial token at all).
    inputs = processor(images=[[rgb_image], [rgb_image], []], text=["a b", "c d e f", "g h"], max_num_tiles=1)
    output = model.generate(
        **inputs,
        logits_processor=[RandomSpatialLogits(seed, spatial, processor.tokenizer.eos_token_id)],
        max_new_tokens=config.num_depth_tokens + 8,
        pad_token_id=processor.tokenizer.pad_token_id,
        **mode,
    )
    *with_image, without_image = output[:, inputs["input_ids"].shape[1] :].tolist()
    ids = (config.seg_token_id, config.depth_start_token_id, config.depth_end_token_id, codes, config.num_depth_tokens)
    assert all(obeys_grammar(row, *ids) for row in with_image) and obeys_grammar(without_image, *ids, has_image=False)
    assert not set(spatial) & set(without_image)
    # The noise favours spatial tokens, so the grammar was actually exercised.
    assert any(token in codes for row in with_image for token in row)


def test_without_the_grammar_random_logits_break_it(tiny_pair):
    model, processor = tiny_pair
    config = model.config
    codes = range(config.depth_code_token_offset, config.depth_code_token_offset + config.num_depth_codes)
    spatial = [config.seg_token_id, config.depth_start_token_id, config.depth_end_token_id, *codes]
    inputs = processor(text=["a b"])
    output = model.generate(
        **inputs,
        logits_processor=[RandomSpatialLogits(0, spatial, processor.tokenizer.eos_token_id)],
        max_new_tokens=12,
        spatial_grammar=False,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    ids = (config.seg_token_id, config.depth_start_token_id, config.depth_end_token_id, codes, config.num_depth_tokens)
    assert not obeys_grammar(output[0, inputs["input_ids"].shape[1] :].tolist(), *ids)


def test_spatial_grammar_must_be_a_bool(tiny_pair):
    model, processor = tiny_pair
    with pytest.raises(ValueError, match="spatial_grammar"):
        model.generate(**processor(text=["a"]), spatial_grammar="yes", max_new_tokens=1)
