"""PerceptioSpatialVocabulary: validation, tokenizers, the format's round trip, and segmentation-only vocabularies end
to end (processor, collator, one training step, generation with masks)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_trainer import make_sample, training_args  # noqa: E402  (the shared tiny samples and TrainingArguments)
from transformers import LogitsProcessor

from perceptio.models.perceptio.generation_perceptio import PerceptioSpatialGrammarLogitsProcessor
from perceptio.models.perceptio.loss_perceptio import (
    LOSS_TERMS,
    next_token_losses,
    per_sample_losses,
    segment_averaged_lm_loss,
)
from perceptio.models.perceptio.spatial_vocabulary_perceptio import (
    PerceptioSpatialVocabulary,
    spatial_tokens,
    strip_spatial_tokens,
)
from perceptio.tiny_models import build_tiny_perceptio, train_tiny_tokenizer
from perceptio.trainers.collator_perceptio import PerceptioDataCollator
from perceptio.trainers.trainer_perceptio import PerceptioTrainer


pytestmark = pytest.mark.usefixtures("single_torch_thread")

# Text 0..2, [SEG] 3, <DEPTH_START> 4, <DEPTH_END> 5, codes 10..12 (K = 3), N = 2.
FIELDS = dict(seg=3, depth_start=4, depth_end=5, depth_code_offset=10, num_depth_codes=3, num_depth_tokens=2)
VOCABULARY = PerceptioSpatialVocabulary(**FIELDS)
ANSWERS = st.text(alphabet="abcdefghij klmnop.,?", max_size=30).map(str.strip)
DEPTH_NAMES = ("loss_marker", "loss_token", "loss_count", "loss_depth_recon")


@pytest.fixture(scope="module")
def segmentation_pair():
    """A tiny segmentation-only Perceptio (`[SEG]`, no depth tokens, no depth tokenizer) and its processor."""
    return build_tiny_perceptio(seed=0, num_depth_codes=0)


# ---- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"seg": -1}, r"seg \(the id of \[SEG\]\) must be a non-negative integer, got -1"),
        ({"seg": None}, r"seg \(the id of \[SEG\]\) must be a non-negative integer, got None"),
        ({"image_context": True}, r"image_context .* must be a non-negative integer, got True"),
        ({"num_depth_codes": -1}, r"num_depth_codes must be a positive integer \(or 0 for a segmentation-only"),
        ({"num_depth_tokens": 0}, r"num_depth_tokens must be a positive integer when there are depth codes"),
        ({"num_depth_tokens": 2.0}, r"num_depth_tokens must be a positive integer .* got 2\.0"),
        ({"depth_end": 3}, r"\[SEG\] and <DEPTH_END> share the id 3; the spatial token ids must be distinct"),
        ({"image_context": 11}, r"<IMG_CONTEXT> \(id 11\) falls inside the depth code ids \[10, 13\)"),
        ({"depth_start": None}, r"needs .*; missing: \['depth_start'\]. A segmentation-only vocabulary"),
    ],
)
def test_invalid_fields_raise_saying_what_is_wrong_and_what_is_accepted(overrides, message):
    with pytest.raises(ValueError, match=message):
        PerceptioSpatialVocabulary(**{**FIELDS, **overrides})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_depth_tokens": 4}, r"num_depth_codes is 0 .* but num_depth_tokens is 4; set num_depth_tokens=0"),
        ({"num_depth_tokens": None}, r"num_depth_codes is 0 .* but num_depth_tokens is None"),
        (
            {"depth_end": 5},
            r"segmentation-only vocabulary \(num_depth_codes=0\) has no depth tokens, .*\['depth_end'\]",
        ),
    ],
)
def test_a_segmentation_only_vocabulary_has_no_depth_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        PerceptioSpatialVocabulary(seg=3, **fields)


def test_a_segmentation_only_vocabulary_reads_and_writes_no_depth():
    vocabulary = PerceptioSpatialVocabulary(seg=3, image_context=7)
    assert not vocabulary.has_depth_block and vocabulary.spatial_token_ids == [3]
    ids = torch.tensor([[3, 3, 0, 4, 5, 10]])
    assert not vocabulary.is_depth_block_token(ids).any()
    assert len(vocabulary.find_depth_blocks(ids)) == 0
    assert vocabulary.read_depth_block([3, 4, 10, 5]) == (None, False, False)
    assert vocabulary.format_target(2, None, "Here.") == "[SEG][SEG]Here."
    with pytest.raises(ValueError, match="segmentation-only"):
        vocabulary.format_target(1, [0], "Here.")


def test_the_block_length_is_fixed_once():
    open_length = PerceptioSpatialVocabulary(**{**FIELDS, "num_depth_tokens": None})
    assert open_length.with_num_depth_tokens(2) == VOCABULARY
    assert VOCABULARY.with_num_depth_tokens(None) is VOCABULARY and VOCABULARY.with_num_depth_tokens(2) is VOCABULARY
    with pytest.raises(ValueError, match=r"num_depth_tokens \(3\) differs from this vocabulary's N \(2\)"):
        VOCABULARY.with_num_depth_tokens(3)
    with pytest.raises(ValueError, match="needs N"):
        open_length.find_depth_blocks(torch.tensor([[4, 10, 5]]))
    # Without N a block of any non-empty length reads as complete.
    assert open_length.read_depth_block([4, 10, 11, 12, 5]) == ([0, 1, 2], False, False)


# ---- tokenizers and configs ----------------------------------------------------------------------------------------


def test_add_to_tokenizer_adds_seg_and_image_tokens_only_without_depth():
    tokenizer = train_tiny_tokenizer()
    before = len(tokenizer)
    vocabulary = PerceptioSpatialVocabulary.add_to_tokenizer(tokenizer, num_depth_codes=0)
    assert len(tokenizer) == before + 4 == before + len(spatial_tokens(0))
    assert not any("DEPTH" in token for token in tokenizer.get_vocab())
    assert vocabulary == PerceptioSpatialVocabulary(
        seg=tokenizer.convert_tokens_to_ids("[SEG]"), image_context=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    )
    # Tokens already present keep their ids; asking for depth codes later adds them after.
    with_depth = PerceptioSpatialVocabulary.add_to_tokenizer(tokenizer, num_depth_codes=4, num_depth_tokens=2)
    assert with_depth.seg == vocabulary.seg and with_depth.depth_code_ids == range(before + 6, before + 10)


def test_from_tokenizer_names_missing_and_scattered_tokens():
    tokenizer = train_tiny_tokenizer()
    with pytest.raises(ValueError, match=r"lacks 4 spatial tokens .*add_to_tokenizer"):
        PerceptioSpatialVocabulary.from_tokenizer(tokenizer, 0)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<DEPTH_1>", "x", "<DEPTH_0>"]})
    with pytest.raises(ValueError, match="contiguous ids"):
        PerceptioSpatialVocabulary.add_to_tokenizer(tokenizer, 2)


def test_processor_and_config_hold_the_same_vocabulary(tiny_pair, segmentation_pair):
    for model, processor in (tiny_pair, segmentation_pair):
        vocabulary = processor.spatial_vocabulary
        assert vocabulary == model.config.spatial_vocabulary == PerceptioSpatialVocabulary.from_config(model.config)
        assert model.config.to_dict() | vocabulary.config_fields() == model.config.to_dict()
    assert not segmentation_pair[0].config.spatial_vocabulary.has_depth_block


# ---- the format's round trip ---------------------------------------------------------------------------------------


@st.composite
def targets(draw, vocabulary: PerceptioSpatialVocabulary):
    """(num_seg, codes or None, answer) for `vocabulary`; codes only where it has a depth block."""
    codes = st.none()
    if vocabulary.has_depth_block:
        size = vocabulary.num_depth_tokens
        codes |= st.lists(st.integers(0, vocabulary.num_depth_codes - 1), min_size=size, max_size=size)
    return draw(st.integers(0, 4)), draw(codes), draw(ANSWERS)


@pytest.mark.parametrize("kind", ["depth", "segmentation_only"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_formatted_target_is_well_formed_and_reads_back(tiny_pair, segmentation_pair, kind, data):
    processor = tiny_pair[1] if kind == "depth" else segmentation_pair[1]
    vocabulary = processor.spatial_vocabulary
    num_seg, codes, answer = data.draw(targets(vocabulary))
    target = vocabulary.format_target(num_seg, codes, answer)
    ids = processor.tokenizer(target, add_special_tokens=False)["input_ids"]
    block_end = num_seg + (0 if codes is None else vocabulary.num_depth_tokens + 2)
    assert ids[:num_seg] == [vocabulary.seg] * num_seg
    assert ids[num_seg:block_end] == ([] if codes is None else vocabulary.depth_block(codes))
    assert not vocabulary.is_depth_block_token(torch.tensor(ids[block_end:])).any()
    # The label check finds exactly this block, and the generation reader reads its codes back.
    blocks = vocabulary.find_depth_blocks(torch.tensor([ids]))
    assert blocks.starts.tolist() == ([] if codes is None else [num_seg])
    assert blocks.ends.tolist() == ([] if codes is None else [block_end - 1])
    assert vocabulary.read_depth_block(ids) == (codes, False, False)
    assert strip_spatial_tokens(processor.tokenizer.decode(ids)) == answer
    # The generation grammar allows every token of the target, in order, and ends outside a block.
    table = vocabulary.forbidden_next_tokens(len(processor.tokenizer))
    for position, token in enumerate(ids):
        state = vocabulary.grammar_states(torch.tensor([ids[:position]]), max_depth_blocks=1)
        assert not table[state, token].item(), (position, token)
    assert vocabulary.grammar_states(torch.tensor([ids]), max_depth_blocks=1).item() < 4


def reference_read(ids: list[int], vocabulary: PerceptioSpatialVocabulary) -> tuple[list[int] | None, bool, bool]:
    """`read_depth_block` as a plain walk over the ids (the post-processing's reader before the vocabulary)."""
    codes_range, num_tokens = vocabulary.depth_code_ids, vocabulary.num_depth_tokens
    starts = [position for position, token in enumerate(ids) if token == vocabulary.depth_start]
    ends = [position for position, token in enumerate(ids) if token == vocabulary.depth_end]
    code_positions = [position for position, token in enumerate(ids) if token in codes_range]
    if not starts:
        return None, False, bool(ends or code_positions)
    start = starts[0]
    if not ends or ends[-1] < start:
        inside = ids[start + 1 :]
        stray = len(starts) > 1 or bool(ends) or any(token not in codes_range for token in inside)
        stray = stray or any(position < start for position in code_positions)
        stray = stray or (num_tokens is not None and len(inside) > num_tokens)
        return None, not stray, stray
    end = next(position for position in ends if position > start)
    inside = ids[start + 1 : end]
    wrong = len(starts) > 1 or len(ends) > 1 or len(code_positions) != len(inside)
    wrong = wrong or any(token not in codes_range for token in inside)
    wrong = wrong or not inside or (num_tokens is not None and len(inside) != num_tokens)
    return (None, False, True) if wrong else ([token - codes_range.start for token in inside], False, False)


TOKENS = st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 10, 11, 12]), max_size=4)
NEAR_BLOCK = st.lists(st.sampled_from([10, 11, 12, 10, 11, 0, 3, 4, 5]), max_size=4).map(lambda inside: [4, *inside])
SEQUENCES = st.tuples(TOKENS, st.just([]) | NEAR_BLOCK | NEAR_BLOCK.map(lambda block: [*block, 5]), TOKENS).map(
    lambda parts: sum(parts, [])
)


@settings(max_examples=400, deadline=None)
@given(ids=SEQUENCES, fixed_length=st.booleans())
def test_reading_a_generated_block_matches_a_plain_walk(ids, fixed_length):
    vocabulary = VOCABULARY if fixed_length else PerceptioSpatialVocabulary(**{**FIELDS, "num_depth_tokens": None})
    assert vocabulary.read_depth_block(ids) == reference_read(ids, vocabulary)


# ---- segmentation-only end to end ----------------------------------------------------------------------------------


def test_segmentation_only_grammar_allows_seg_with_an_image_and_text_only_without(segmentation_pair):
    model, processor = segmentation_pair
    vocabulary = model.config.spatial_vocabulary
    grammar = PerceptioSpatialGrammarLogitsProcessor.from_config(
        model.config, prompt_length=0, prompts_with_images=[True, False]
    )
    assert grammar.max_depth_blocks == 0
    generated = torch.tensor([[vocabulary.seg, 7], [7, 8]])
    scores = grammar(generated, torch.zeros(2, len(processor.tokenizer)))
    assert torch.isfinite(scores[0]).all()  # no depth tokens to forbid: [SEG]s and text
    assert (~torch.isfinite(scores[1])).nonzero().flatten().tolist() == [vocabulary.seg]


def test_segmentation_only_collator_writes_seg_targets_and_refuses_depth_blocks(segmentation_pair):
    processor = segmentation_pair[1]
    collator = PerceptioDataCollator(processor, max_num_tiles=1)
    batch = collator([make_sample(0, 2, False), make_sample(1, 0, False, image=False)])
    supervised = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert (
        supervised[:3] == [processor.spatial_vocabulary.seg] * 2 + [supervised[2]] and supervised[2] != supervised[0]
    )
    assert [masks.shape[0] for masks in batch["gt_masks"]] == [2, 0] and batch["depth_maps"] == [None, None]
    with pytest.raises(ValueError, match="sample 0 .*asks for a depth block, but .* segmentation-only"):
        collator([make_sample(0, 1, True)])


def test_segmentation_only_model_trains_a_step_without_depth_terms(segmentation_pair, tmp_path):
    model, processor = copy.deepcopy(segmentation_pair[0]), segmentation_pair[1]
    assert model.depth_tokenizer is None
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer = PerceptioTrainer(
        model=model,
        args=training_args(tmp_path, per_device_train_batch_size=2),
        train_dataset=Dataset.from_list([make_sample(0, 1, False), make_sample(1, 2, False)]),
        data_collator=PerceptioDataCollator(processor, max_num_tiles=1),
    )
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(np.isfinite(logged[name]) for name in LOSS_TERMS)
    assert logged["loss_lm"] > 0 and logged["loss_mask"] > 0
    assert all(logged[name] == 0.0 for name in DEPTH_NAMES)
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert any(name.startswith("text_hidden_fcs") for name in changed)
    assert any(name.startswith("grounding_encoder.mask_decoder") for name in changed)


def test_segment_averaged_lm_loss_of_a_segmentation_only_vocabulary_is_per_sample(segmentation_pair):
    logits, labels = torch.randn(2, 6, 50), torch.tensor([[-100, 3, 4, 5, -100, -100], [-100, -100, 6, 7, 8, 9]])
    vocabulary = segmentation_pair[0].config.spatial_vocabulary
    assert torch.equal(
        segment_averaged_lm_loss(logits, labels, vocabulary), segment_averaged_lm_loss(logits, labels, None)
    )
    # Nothing is a depth block's, so each sample's answer loss is its whole loss.
    per_sample = per_sample_losses(*next_token_losses(logits, labels), labels, vocabulary)
    assert per_sample.answer_tokens.tolist() == per_sample.lm_tokens.tolist() == [3, 4]
    assert torch.equal(per_sample.answer, per_sample.lm)


class ForceTokens(LogitsProcessor):
    """Forces the generated tokens to `script` while it lasts (a random tiny model never writes `[SEG]` itself)."""

    def __init__(self, prompt_length: int, script: list[int]):
        self.prompt_length, self.script = prompt_length, script

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        if step >= len(self.script):
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[step]] = 0.0
        return forced


def test_segmentation_only_model_generates_masks_and_text(segmentation_pair, rgb_image):
    model, processor = segmentation_pair
    tokenizer = processor.tokenizer
    seg = processor.spatial_vocabulary.seg
    script = [seg, seg, *tokenizer("The cube.", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    inputs = processor(images=[rgb_image], text=[processor.format_prompt("Segment the cubes.")])
    prompt_length = inputs["input_ids"].shape[1]
    output = model.generate(
        **{key: value for key, value in inputs.items() if key != "sam_pixel_values"},
        logits_processor=[ForceTokens(prompt_length, script)],
        max_new_tokens=len(script) + 2,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generated = output.sequences[:, prompt_length:]
    assert generated[0].tolist() == script
    assert output.seg_hidden_states[0].shape == (2, model.config.text_config.hidden_size)
    with torch.no_grad():
        masks = model.predict_masks(output.seg_hidden_states, inputs["sam_pixel_values"])
    (prediction,) = processor.post_process_generation(
        generated,
        original_sizes=processor.image_sizes([rgb_image]),
        mask_logits=masks.mask_logits,
        mask_scores=masks.mask_scores,
        num_depth_tokens=model.config.num_depth_tokens,
    )
    assert prediction.text == "The cube."
    assert len(prediction.masks) == len(prediction.mask_scores) == 2
    assert all(mask.shape == rgb_image.shape[:2] and mask.dtype == np.bool_ for mask in prediction.masks)
    assert prediction.depth is None and prediction.depth_codes is None
    assert not prediction.depth_truncated and not prediction.depth_malformed
    # predict, which passes the model's N (0) to the processor, gives the same answer.
    (predicted,) = model.predict_from_inputs(
        inputs,
        processor=processor,
        original_sizes=processor.image_sizes([rgb_image]),
        logits_processor=[ForceTokens(prompt_length, script)],
        max_new_tokens=len(script) + 2,
    )
    assert predicted.text == prediction.text and predicted.token_ids == prediction.token_ids
    assert all(np.array_equal(a, b) for a, b in zip(predicted.masks, prediction.masks))
