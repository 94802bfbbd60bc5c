"""Generation with Perceptio: [SEG] state capture, predict (masks, depth, sizes), batching, beams, streaming, errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, TextIteratorStreamer

from perceptio.models.perceptio.generation_perceptio import PerceptioSpatialGrammarLogitsProcessor
from perceptio.tiny_models import build_tiny_perceptio


pytestmark = pytest.mark.usefixtures("single_torch_thread")


class ForceScript(LogitsProcessor):
    """Forces generated token t of sample s to scripts[s][t] while the script lasts; free greedy text afterwards.

    Random tiny models never write spatial tokens on their own, so tests script them. Rows are samples × copies
    (beams, num_return_sequences), consecutive as transformers expands them.
    """

    def __init__(self, prompt_length: int, scripts: list[list[int]], copies: int = 1):
        self.prompt_length, self.scripts, self.copies = prompt_length, scripts, copies

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = scores.clone()
        for row in range(input_ids.shape[0]):
            script = self.scripts[row // self.copies]
            if step < len(script):
                forced[row] = float("-inf")
                forced[row, script[step]] = 0.0
        return forced


def spatial_script(model, processor, num_seg: int, depth: bool, answer: str = "The cube.", eos: bool = True):
    config = model.config
    script = [config.seg_token_id] * num_seg
    if depth:
        codes = [(3 * index + 1) % config.num_depth_codes for index in range(config.num_depth_tokens)]
        script += [config.depth_start_token_id, *(config.depth_code_token_offset + c for c in codes)]
        script += [config.depth_end_token_id]
    script += processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    return script + [processor.tokenizer.eos_token_id] * eos


def images(sizes):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for size in sizes]


def predict(model, processor, image_list, prompts, scripts, copies=1, **kwargs):
    inputs = processor(images=image_list, text=[processor.format_prompt(p) for p in prompts])
    force = ForceScript(inputs["input_ids"].shape[1], scripts, copies)
    kwargs.setdefault("max_new_tokens", max(map(len, scripts)) + 2)
    return model.predict_from_inputs(
        inputs,
        processor=processor,
        original_sizes=processor.image_sizes(image_list),
        logits_processor=[force],
        **kwargs,
    )


def test_predict_returns_one_mask_per_seg_and_depth_at_the_original_size(tiny_pair):
    model, processor = tiny_pair
    image_list = images([(48, 72), (64, 40)])
    scripts = [spatial_script(model, processor, 3, True), spatial_script(model, processor, 1, False)]
    first, second = predict(model, processor, image_list, ["Segment the cubes.", "Where?"], scripts)
    assert len(first.masks) == len(first.mask_scores) == 3 and len(second.masks) == 1
    assert all(mask.shape == (48, 72) and mask.dtype == np.bool_ for mask in first.masks)
    assert second.masks[0].shape == (64, 40)
    assert first.depth.shape == (48, 72) and first.depth.dtype == np.float32
    assert np.all(np.abs(first.depth) <= 1.0) and first.depth.std() > 0
    config = model.config
    assert first.depth_codes == [(3 * i + 1) % config.num_depth_codes for i in range(config.num_depth_tokens)]
    assert second.depth is None and second.depth_codes is None and not second.depth_truncated
    assert first.text.startswith("The cube.") and "[SEG]" not in first.text and "DEPTH" not in first.text
    assert first.token_ids[: len(scripts[0]) - 1] == scripts[0][:-1]


def test_depth_matches_the_depth_tokenizer_decode(tiny_pair):
    model, processor = tiny_pair
    (image,) = images([(32, 32)])
    (result,) = predict(model, processor, [image], ["Depth?"], [spatial_script(model, processor, 0, True)])
    expected = model.depth_tokenizer.decode(torch.tensor([result.depth_codes]))[0]  # 32x32 is the tokenizer's size
    np.testing.assert_allclose(result.depth, expected.numpy(), atol=1e-6)


def test_masks_match_the_teacher_forced_forward(tiny_pair):
    model, processor = tiny_pair
    (image,) = images([(48, 72)])
    script = spatial_script(model, processor, 2, True)
    (result,) = predict(model, processor, [image], ["Segment."], [script], mask_threshold=0.0)
    inputs = processor(images=[image], text=[processor.format_prompt("Segment.")])
    sequence = torch.cat([inputs["input_ids"], torch.tensor([result.token_ids])], dim=1)
    with torch.no_grad():
        forced = model(
            input_ids=sequence, pixel_values=inputs["pixel_values"], sam_pixel_values=inputs["sam_pixel_values"]
        )
    np.testing.assert_allclose(result.mask_scores, forced.pred_mask_scores[0].numpy(), atol=1e-4)
    logits = torch.nn.functional.interpolate(forced.pred_masks[0][:, None], size=(48, 72), mode="bilinear")[:, 0]
    agreement = np.mean([np.mean(m == (l > 0).numpy()) for m, l in zip(result.masks, logits)])
    assert agreement > 0.995


def test_captured_seg_states_equal_teacher_forced_ones(tiny_pair):
    model, processor = tiny_pair
    image_list = images([(48, 72), (30, 60)])
    config = model.config
    text = processor.tokenizer("a b", add_special_tokens=False)["input_ids"]
    scripts = [[config.seg_token_id, *text, config.seg_token_id, *text], [*text, config.seg_token_id, *text, *text]]
    inputs = processor(images=image_list, text=[processor.format_prompt(p) for p in ("Segment.", "Find it")])
    prompt_length = inputs["input_ids"].shape[1]
    generation_inputs = {k: v for k, v in inputs.items() if k != "sam_pixel_values"}
    forward_calls = []
    handle = model.register_forward_pre_hook(lambda module, args: forward_calls.append(1))
    try:
        output = model.generate(
            **generation_inputs,
            logits_processor=[ForceScript(prompt_length, scripts)],
            max_new_tokens=len(scripts[0]) + 1,
            return_dict_in_generate=True,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    finally:
        handle.remove()
    # One forward per new token: the states came from the hooks, not from an extra teacher-forced pass.
    assert len(forward_calls) == output.sequences.shape[1] - prompt_length
    attention_mask = torch.cat(
        [inputs["attention_mask"], torch.ones(2, output.sequences.shape[1] - prompt_length, dtype=torch.long)], dim=1
    )
    with torch.no_grad():
        hidden = model.model(
            input_ids=output.sequences, attention_mask=attention_mask, pixel_values=inputs["pixel_values"]
        ).last_hidden_state
    for row in range(2):
        positions = (output.sequences[row] == config.seg_token_id).nonzero(as_tuple=True)[0]
        positions = positions[positions >= prompt_length]
        assert output.seg_hidden_states[row].shape == (2 - row, config.text_config.hidden_size)
        torch.testing.assert_close(output.seg_hidden_states[row], hidden[row, positions], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_seg_cut_off_as_the_last_token_gets_no_state_and_no_mask(tiny_pair, num_beams, monkeypatch):
    # The last generated token is never fed back, so the model never computes a state there (Sa2VA has none either).
    model, processor = tiny_pair
    if num_beams == 1:  # the hooks saw every state there is: no second forward pass
        monkeypatch.setattr(model, "teacher_forced_seg_states", lambda *args: pytest.fail("extra forward pass"))
    config = model.config
    text = processor.tokenizer("a", add_special_tokens=False)["input_ids"]
    script = [config.seg_token_id, *text, config.seg_token_id]
    inputs = processor(images=images([(48, 72)]), text=[processor.format_prompt("Segment.")])
    generation_inputs = {k: v for k, v in inputs.items() if k != "sam_pixel_values"}
    output = model.generate(
        **generation_inputs,
        logits_processor=[ForceScript(inputs["input_ids"].shape[1], [script], copies=num_beams)],
        max_new_tokens=len(script),
        num_beams=num_beams,
        return_dict_in_generate=True,
    )
    assert output.sequences[0, -1] == config.seg_token_id
    with torch.no_grad():
        hidden = model.model(
            input_ids=output.sequences[:, :-1], pixel_values=generation_inputs["pixel_values"]
        ).last_hidden_state
    # Only the first [SEG], read when the model wrote the next token, has a state: its own, not a stale one.
    assert output.seg_hidden_states[0].shape[0] == 1
    first_seg = inputs["input_ids"].shape[1]
    torch.testing.assert_close(output.seg_hidden_states[0][0], hidden[0, first_seg], atol=1e-4, rtol=1e-4)
    (result,) = predict(
        model,
        processor,
        images([(48, 72)]),
        ["Segment."],
        [script],
        copies=num_beams,
        num_beams=num_beams,
        max_new_tokens=len(script),
    )
    assert result.token_ids == script and result.seg_truncated and len(result.masks) == 1
    (finished,) = predict(model, processor, images([(48, 72)]), ["Segment."], [script + [text[0]]])
    assert not finished.seg_truncated and len(finished.masks) == 2


def test_predict_stops_at_the_checkpoints_generation_config_eos_ids(tiny_pair, monkeypatch):
    # A converted InternLM2 Sa2VA checkpoint stops at <|im_end|>, which its generation_config.json lists.
    model, processor = tiny_pair
    stop, *words = processor.tokenizer("stop here now", add_special_tokens=False)["input_ids"]
    script = [*words, stop, *words]
    eos = processor.tokenizer.eos_token_id
    monkeypatch.setattr(model.generation_config, "eos_token_id", [eos, stop])
    assert model.stop_token_ids(processor.tokenizer) == [eos, stop]
    (result,) = predict(model, processor, images([(48, 72)]), ["Say it."], [script], max_new_tokens=len(script))
    # Generation stops at the stop word, and the answer ends before it.
    assert result.token_ids == words
    # An explicit eos_token_id still wins.
    (result,) = predict(
        model, processor, images([(48, 72)]), ["Say it."], [script], max_new_tokens=len(script), eos_token_id=eos
    )
    assert result.token_ids == script


def test_batched_equals_sequential_with_mixed_sizes_and_left_padding(tiny_pair):
    model, processor = tiny_pair
    image_list = images([(48, 72), (64, 64), (40, 100)])
    prompts = ["Segment both cubes and tell me which is nearer.", "Depth?", "What colour is the ball on the left?"]
    scripts = [
        spatial_script(model, processor, 2, True, eos=False),
        spatial_script(model, processor, 0, True, eos=False),
        spatial_script(model, processor, 1, False, eos=False),
    ]
    batched = predict(model, processor, image_list, prompts, scripts, max_new_tokens=30)
    inputs = processor(images=image_list, text=[processor.format_prompt(p) for p in prompts])
    assert (inputs["attention_mask"] == 0).any(), "the batch must actually be left-padded"
    for index in range(3):
        (alone,) = predict(
            model,
            processor,
            image_list[index : index + 1],
            prompts[index : index + 1],
            scripts[index : index + 1],
            max_new_tokens=30,
        )
        together = batched[index]
        assert together.token_ids == alone.token_ids and together.text == alone.text
        assert together.depth_codes == alone.depth_codes
        assert len(together.masks) == len(alone.masks)
        np.testing.assert_allclose(together.mask_scores, alone.mask_scores, atol=1e-4)
        for mask_batched, mask_alone in zip(together.masks, alone.masks):
            assert np.mean(mask_batched == mask_alone) > 0.995
        if alone.depth is not None:
            np.testing.assert_allclose(together.depth, alone.depth, atol=1e-5)


def test_beam_search_and_sampling_give_masks_for_every_seg(tiny_pair):
    model, processor = tiny_pair
    image_list = images([(48, 72)])
    script = spatial_script(model, processor, 2, True)
    (beam,) = predict(
        model, processor, image_list, ["Segment."], [script], copies=3, num_beams=3, num_return_sequences=1
    )
    assert len(beam.masks) == 2 and beam.depth is not None
    sampled = predict(
        model, processor, image_list, ["Segment."], [script], copies=2, do_sample=True, num_return_sequences=2
    )
    assert len(sampled) == 2 and all(len(result.masks) == 2 for result in sampled)


def test_depth_block_cut_short_gives_none_and_a_flag(tiny_pair):
    model, processor = tiny_pair
    script = spatial_script(model, processor, 1, True)
    (result,) = predict(model, processor, images([(48, 72)]), ["Depth?"], [script], max_new_tokens=6)
    assert result.depth is None and result.depth_codes is None and result.depth_truncated
    assert len(result.masks) == 1


def test_predict_with_images_and_prompts(tiny_pair, rgb_image):
    model, processor = tiny_pair
    results = model.predict(
        [rgb_image, rgb_image[:20]], ["What is this?", "And this?"], processor=processor, max_new_tokens=4
    )
    assert len(results) == 2 and all(isinstance(result.text, str) for result in results)


def test_streaming_with_text_iterator_streamer(tiny_pair):
    model, processor = tiny_pair
    inputs = processor(text=[processor.format_prompt("Say something.", num_images=0)])
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(
            ids=model.generate(**inputs, streamer=streamer, max_new_tokens=8, do_sample=False)
        )
    )
    thread.start()
    pieces = list(streamer)
    thread.join()
    expected = processor.tokenizer.decode(result["ids"][0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "".join(pieces) == expected and len(pieces) >= 1


def test_mismatched_images_and_prompts_raise(tiny_pair, rgb_image):
    model, processor = tiny_pair
    with pytest.raises(ValueError, match="1 image.*2 prompt"):
        model.predict([rgb_image], ["a", "b"], processor=processor)
    with pytest.raises(ValueError, match="prompts must be"):
        model.predict([rgb_image], 3, processor=processor)


def test_predict_without_processor_raises(tiny_pair, rgb_image):
    model, _ = tiny_pair
    with pytest.raises(ValueError, match="processor"):
        model.predict([rgb_image], ["a"])


def test_seg_without_sam_input_raises_with_the_grammar_off(tiny_pair):
    model, processor = tiny_pair
    inputs = processor(text=[processor.format_prompt("Segment.", num_images=0)])
    script = spatial_script(model, processor, 1, False)
    with pytest.raises(ValueError, match="sam_pixel_values"):
        model.predict_from_inputs(
            inputs,
            processor=processor,
            logits_processor=[ForceScript(inputs["input_ids"].shape[1], [script])],
            max_new_tokens=len(script),
            spatial_grammar=False,
        )


def seg_and_depth_bias(config) -> list:
    """A `sequence_bias` under which the model wants to write `[SEG]` (once) and then a depth block."""
    seg, start = config.seg_token_id, config.depth_start_token_id
    return [[[seg], 100.0], [[seg, seg], -200.0], [[start], 50.0]]


def test_text_only_requests_come_back_as_text_when_the_model_wants_to_segment(tiny_pair):
    model, processor = tiny_pair
    config = model.config
    prompts = ["Segment the red cube.", "Estimate the depth of the scene."]
    inputs = processor(text=[processor.format_prompt(prompt, num_images=0) for prompt in prompts])
    for generate_kwargs in ({}, {"num_beams": 2}):
        results = model.predict_from_inputs(
            inputs,
            processor=processor,
            max_new_tokens=config.num_depth_tokens + 4,
            sequence_bias=seg_and_depth_bias(config),
            **generate_kwargs,
        )
        assert len(results) == 2
        for result in results:
            assert result.masks == [] and result.depth is None and not result.depth_truncated
            assert config.seg_token_id not in result.token_ids and config.depth_start_token_id not in result.token_ids


def test_in_a_mixed_batch_only_the_prompt_with_an_image_segments(tiny_pair, rgb_image):
    model, processor = tiny_pair
    config = model.config
    inputs = processor(
        images=[[rgb_image], []],
        text=[processor.format_prompt("Segment the cube."), processor.format_prompt("Say hi.", num_images=0)],
    )
    generation_inputs = {key: value for key, value in inputs.items() if key != "sam_pixel_values"}
    for generate_kwargs in ({}, {"num_beams": 2}):
        output = model.generate(
            **generation_inputs,
            max_new_tokens=config.num_depth_tokens + 4,
            sequence_bias=seg_and_depth_bias(config),
            pad_token_id=processor.tokenizer.pad_token_id,
            **generate_kwargs,
        )
        with_image, without_image = output[:, inputs["input_ids"].shape[1] :].tolist()
        assert with_image[0] == config.seg_token_id and config.depth_start_token_id in with_image
        assert config.seg_token_id not in without_image and config.depth_start_token_id not in without_image


def test_depth_on_a_checkpoint_without_depth_tokenizer():
    model, processor = build_tiny_perceptio(seed=0, with_depth_tokenizer=False)
    script = spatial_script(model, processor, 0, True)
    # With the grammar on, a segmentation-only checkpoint cannot open a depth block at all.
    scores = PerceptioSpatialGrammarLogitsProcessor.from_config(model.config, 0)(
        torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, model.config.text_config.vocab_size)
    )
    assert scores[0, model.config.depth_start_token_id] == float("-inf")
    with pytest.raises(ValueError, match="no depth tokenizer"):
        predict(model, processor, images([(48, 72)]), ["Depth?"], [script], spatial_grammar=False)
