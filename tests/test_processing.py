"""PerceptioProcessor: image modes and sizes, prompts, spatial tokens, targets and labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from perceptio import PerceptioProcessor
from perceptio.models.perceptio.image_processing_perceptio import to_rgb_array
from perceptio.models.perceptio.processing_perceptio import IGNORE_INDEX
from perceptio.models.perceptio.spatial_vocabulary_perceptio import (
    PerceptioSpatialVocabulary,
    depth_code_tokens,
    strip_spatial_tokens,
)


PIL_MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I", "F"]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _pil_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    return base.convert(mode)


@st.composite
def user_images(draw):
    width = draw(st.integers(1, 300))
    height = draw(st.integers(1, 300))
    kind = draw(st.sampled_from(["pil", "numpy_uint8", "numpy_float", "numpy_gray", "tensor"]))
    seed = draw(st.integers(0, 10))
    rng = np.random.default_rng(seed)
    if kind == "pil":
        return _pil_image(draw(st.sampled_from(PIL_MODES)), width, height, seed)
    if kind == "numpy_uint8":
        channels = draw(st.sampled_from([1, 3, 4]))
        return rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    if kind == "numpy_float":
        return rng.random((height, width, 3)).astype(np.float32)
    if kind == "numpy_gray":
        return rng.integers(0, 256, size=(height, width), dtype=np.uint8)
    return torch.rand(draw(st.sampled_from([1, 3, 4])), height, width)


prompts = st.text(min_size=1, max_size=40).filter(lambda text: text.strip() and "<image>" not in text)


@SETTINGS
@given(image=user_images(), prompt=prompts, max_num_tiles=st.integers(1, 3))
def test_valid_inputs_give_consistent_shapes_and_token_counts(tiny_processor, image, prompt, max_num_tiles):
    inputs = tiny_processor(images=[image], text=[prompt], max_num_tiles=max_num_tiles)
    num_tiles = inputs["pixel_values"].shape[0]
    assert 1 <= num_tiles <= max_num_tiles + (1 if max_num_tiles > 1 else 0)
    assert inputs["pixel_values"].shape[1:] == (3, 64, 64)
    assert inputs["sam_pixel_values"].shape == (1, 3, 128, 128)
    image_context_id = tiny_processor.spatial_vocabulary.image_context
    assert int((inputs["input_ids"] == image_context_id).sum()) == num_tiles * tiny_processor.image_seq_length
    assert torch.isfinite(inputs["pixel_values"]).all()
    assert inputs["attention_mask"].shape == inputs["input_ids"].shape


@SETTINGS
@given(
    bad=st.one_of(
        st.integers(),
        st.text(),
        st.just(np.zeros((0, 5, 3), dtype=np.uint8)),
        st.just(np.zeros((4, 4, 2), dtype=np.uint8)),
        st.just(np.zeros((4, 4, 3), dtype=np.int64)),
        st.just(np.full((4, 4, 3), 2.0, dtype=np.float32)),
        st.just(np.full((4, 4, 3), np.nan, dtype=np.float32)),
        st.just(torch.zeros(2, 4, 4)),
        st.just(Image.new("RGB", (0, 0))),
        st.lists(st.integers(), max_size=2),
    )
)
def test_invalid_images_raise_value_error(tiny_processor, bad):
    with pytest.raises(ValueError):
        tiny_processor(images=[bad], text=["<image>\nWhat is this?"])


@pytest.mark.parametrize(
    ("images", "text", "message"),
    [
        (None, "<image>\nhi", "no images"),
        ("IMG", "<image><image>\nhi", "placeholder"),
        ("IMG", "", "empty"),
        ("IMG", "   ", "empty"),
        ("IMG", 3, "string"),
        ("IMG", [], "empty list"),
        ("IMG", ["fine", None], "Prompt 1"),
    ],
)
def test_invalid_prompts_raise_value_error(tiny_processor, rgb_image, images, text, message):
    images = rgb_image if images == "IMG" else images
    with pytest.raises(ValueError, match=message):
        tiny_processor(images=images, text=text)


def test_images_are_assigned_to_placeholders_in_order(tiny_processor, rgb_image):
    small = np.zeros((8, 8, 3), dtype=np.uint8)
    inputs = tiny_processor(images=[rgb_image, small], text=["<image> and <image>: compare"], max_num_tiles=1)
    context = tiny_processor.spatial_vocabulary.image_context
    assert int((inputs["input_ids"] == context).sum()) == 2 * tiny_processor.image_seq_length


def test_left_and_right_padding(tiny_processor):
    left = tiny_processor(text=["short", "a much longer prompt than the other"], padding_side="left")
    right = tiny_processor(text=["short", "a much longer prompt than the other"], padding_side="right")
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0
    with pytest.raises(ValueError, match="padding_side"):
        tiny_processor(text="x", padding_side="middle")


CALL_ARGUMENTS = {
    "images",
    "text",
    "videos",
    "audio",
    "padding",
    "padding_side",
    "max_length",
    "pad_to_multiple_of",
    "truncation",
    "add_special_tokens",
    "return_attention_mask",
    "max_num_tiles",
    "max_patches",
    "return_tensors",
}


@SETTINGS
@given(
    texts=st.lists(prompts, min_size=1, max_size=3),
    padding=st.sampled_from([True, "longest", "max_length"]),
    extra_length=st.integers(0, 5),
    pad_to_multiple_of=st.one_of(st.none(), st.integers(1, 8)),
    padding_side=st.sampled_from(["left", "right"]),
    tile_argument=st.sampled_from(["max_num_tiles", "max_patches"]),
    tiles=st.integers(1, 3),
    add_special_tokens=st.booleans(),
    return_tensors=st.sampled_from(["pt", "np"]),
)
def test_transformers_call_arguments_have_their_effect(
    tiny_processor,
    texts,
    padding,
    extra_length,
    pad_to_multiple_of,
    padding_side,
    tile_argument,
    tiles,
    add_special_tokens,
    return_tensors,
):
    rng = np.random.default_rng(len(texts))
    images = [rng.integers(0, 256, size=(20 + 9 * index, 30, 3), dtype=np.uint8) for index in range(len(texts))]
    alone = [
        tiny_processor(images=[image], text=[prompt], max_num_tiles=tiles, add_special_tokens=add_special_tokens)
        for image, prompt in zip(images, texts)
    ]
    lengths = [inputs["input_ids"].shape[1] for inputs in alone]
    max_length = max(lengths) + extra_length if padding == "max_length" else None
    arguments = {
        "padding": padding,
        "max_length": max_length,
        "pad_to_multiple_of": pad_to_multiple_of,
        "padding_side": padding_side,
        tile_argument: tiles,
        "add_special_tokens": add_special_tokens,
    }
    inputs = tiny_processor(images=images, text=texts, return_tensors=return_tensors, **arguments)
    assert all(isinstance(value, np.ndarray if return_tensors == "np" else torch.Tensor) for value in inputs.values())
    input_ids, attention_mask = torch.as_tensor(inputs["input_ids"]), torch.as_tensor(inputs["attention_mask"])
    target = max_length or max(lengths)
    if pad_to_multiple_of:
        target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    assert input_ids.shape == (len(texts), target)
    for row, (single, length) in enumerate(zip(alone, lengths)):
        kept = attention_mask[row].bool()
        assert int(kept.sum()) == length and torch.equal(input_ids[row][kept], single["input_ids"][0])
        assert kept[-1 if padding_side == "left" else 0]  # the padding is on the requested side
    tiles_alone = torch.cat([single["pixel_values"] for single in alone])
    assert torch.equal(torch.as_tensor(inputs["pixel_values"]), tiles_alone)
    without_mask = tiny_processor(images=images, text=texts, return_attention_mask=False, **arguments)
    assert "attention_mask" not in without_mask and torch.equal(without_mask["input_ids"], input_ids)


@SETTINGS
@given(name=st.from_regex(r"[a-z][a-z_]{0,20}", fullmatch=True).filter(lambda name: name not in CALL_ARGUMENTS))
def test_unknown_call_arguments_raise_naming_them_and_what_is_accepted(tiny_processor, name):
    message = rf"Unexpected processor argument\(s\) \['{name}'\]; accepted: images, text, videos"
    with pytest.raises(ValueError, match=message):
        tiny_processor(text=["Hi"], **{name: 1})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_num_tiles": 2, "max_patches": 2}, "not both"),
        ({"truncation": True}, "truncation must be off"),
        ({"truncation": "longest_first"}, "truncation must be off"),
        ({"videos": ["clip.mp4"]}, "videos must be None"),
        ({"audio": [0.0]}, "audio must be None"),
        ({"return_tensors": "tf"}, "return_tensors must be one of"),
        ({"padding": "middle"}, "padding must be one of"),
        ({"padding": 1}, "padding must be one of"),
        ({"padding": "max_length"}, "needs max_length"),
        ({"max_length": 10}, "max_length applies with padding='max_length' only"),
        ({"padding": "max_length", "max_length": 2}, "more than max_length 2"),
        ({"padding": False}, "do not stack"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be a positive integer"),
    ],
)
def test_bad_call_arguments_raise_value_error(tiny_processor, arguments, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(text=["short", "a much longer prompt than the other"], **arguments)


def test_apply_chat_template_with_tokenize_gives_the_processor_inputs(tiny_processor, rgb_image):
    # transformers' apply_chat_template(tokenize=True) calls the processor with videos=None and audio=None.
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.fromarray(rgb_image)},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    inputs = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = tiny_processor(images=[rgb_image], text=[tiny_processor.format_prompt("What is this?")])
    assert set(inputs) == set(expected)
    assert all(torch.equal(inputs[key], expected[key]) for key in expected)


def test_pil_modes_convert_to_rgb():
    for mode in PIL_MODES:
        array = to_rgb_array(_pil_image(mode, 5, 3, 0))
        assert array.shape == (3, 5, 3) and array.dtype == np.uint8
    transparent = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert (to_rgb_array(transparent) == 255).all()


def test_spatial_tokens_have_contiguous_ids_and_survive_save_load(tiny_processor, tmp_path):
    ids = tiny_processor.spatial_vocabulary
    vocab = tiny_processor.tokenizer.get_vocab()
    codes = [vocab[token] for token in depth_code_tokens(tiny_processor.num_depth_codes)]
    assert codes == list(range(ids.depth_code_offset, ids.depth_code_offset + tiny_processor.num_depth_codes))
    tiny_processor.save_pretrained(tmp_path)
    loaded = PerceptioProcessor.from_pretrained(tmp_path)
    assert loaded.spatial_vocabulary == ids
    assert loaded.image_processor.to_dict() == tiny_processor.image_processor.to_dict()
    sample = tiny_processor(text="[SEG]<DEPTH_START><DEPTH_3><DEPTH_END> done")["input_ids"]
    assert torch.equal(loaded(text="[SEG]<DEPTH_START><DEPTH_3><DEPTH_END> done")["input_ids"], sample)
    assert sample[0, :4].tolist() == [ids.seg, ids.depth_start, ids.depth_code_id(3), ids.depth_end]


@SETTINGS
@given(
    num_seg=st.integers(0, 4),
    codes=st.one_of(st.none(), st.lists(st.integers(0, 31), min_size=16, max_size=16)),
    answer=st.text(max_size=30).filter(lambda text: "[SEG]" not in text and "<DEPTH" not in text and "<|" not in text),
)
def test_targets_tokenize_in_order_and_labels_cover_only_them(tiny_processor, num_seg, codes, answer):
    assume(num_seg or codes or answer)
    target = tiny_processor.format_target(num_seg, codes, answer)
    example = tiny_processor.build_training_example("Describe.", target)
    labels, input_ids = example["labels"], example["input_ids"]
    supervised = input_ids[labels != IGNORE_INDEX].tolist()
    ids = tiny_processor.spatial_vocabulary
    expected_prefix = [ids.seg] * num_seg
    if codes is not None:
        expected_prefix += [ids.depth_start] + [ids.depth_code_id(code) for code in codes] + [ids.depth_end]
    assert supervised[: len(expected_prefix)] == expected_prefix
    assert supervised[-1] == tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (labels[: len(labels) - len(supervised)] == IGNORE_INDEX).all()
    assert strip_spatial_tokens(tiny_processor.tokenizer.decode(supervised[:-1])) == answer.strip()


def test_target_format_rejects_bad_input():
    # N not fixed: any non-empty block of codes in [0, K).
    vocabulary = PerceptioSpatialVocabulary(0, 1, 2, depth_code_offset=3, num_depth_codes=4, num_depth_tokens=None)
    with pytest.raises(ValueError, match="num_seg"):
        vocabulary.format_target(-1, None, "a")
    with pytest.raises(ValueError, match="\\[0, 4\\)"):
        vocabulary.format_target(0, [1, 4], "a")
    with pytest.raises(ValueError, match="exactly 3 codes"):
        vocabulary.with_num_depth_tokens(3).format_target(0, [1, 2], "a")
    with pytest.raises(ValueError, match="plain text"):
        vocabulary.format_target(0, None, "a [SEG]")


def test_text_before_images_puts_the_question_first_and_survives_save_load(tiny_processor, rgb_image, tmp_path):
    tiny_processor.save_pretrained(tmp_path / "image-first")
    question_first = PerceptioProcessor.from_pretrained(tmp_path / "image-first", text_before_images=True)
    question_first.save_pretrained(tmp_path / "question-first")
    reloaded = PerceptioProcessor.from_pretrained(tmp_path / "question-first")
    assert reloaded.text_before_images and not tiny_processor.text_before_images
    prompt = reloaded.format_prompt("What shape is the red object?")
    assert prompt.index("What shape") < prompt.index("<image>")
    assert tiny_processor.format_prompt("x").index("<image>") < tiny_processor.format_prompt("x").index("x")
    assert reloaded.format_prompt("no image", num_images=0) == tiny_processor.format_prompt("no image", num_images=0)

    context = reloaded.spatial_vocabulary.image_context
    for processor, question_first_expected in ((tiny_processor, False), (reloaded, True)):
        example = processor.build_training_example("What shape is the red object?", "Cube", images=[rgb_image])
        ids = example["input_ids"].tolist()
        before_image = processor.tokenizer.decode(ids[: ids.index(context)])
        assert ("red object" in before_image) == question_first_expected
        assert (example["labels"] != IGNORE_INDEX).sum() == len(
            processor.tokenizer("Cube<|im_end|>", add_special_tokens=False)["input_ids"]
        )
    with pytest.raises(ValueError, match="text_before_images"):
        PerceptioProcessor.from_pretrained(tmp_path / "image-first", text_before_images="yes")


def test_a_question_first_processor_puts_a_chat_turns_text_before_its_images(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path / "image-first")
    question_first = PerceptioProcessor.from_pretrained(tmp_path / "image-first", text_before_images=True)
    image_first_turn = [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]
    conversation = [{"role": "user", "content": image_first_turn}]
    chat = question_first.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert chat == question_first.format_prompt("What shape is it?")
    assert conversation[0]["content"] == image_first_turn, "the caller's conversation is not changed"
    batch = question_first.apply_chat_template(
        [conversation, conversation], add_generation_prompt=True, tokenize=False
    )
    assert batch == [chat, chat]
    plain = [{"role": "user", "content": "no image here"}]
    assert question_first.apply_chat_template(plain, tokenize=False) == tiny_processor.apply_chat_template(
        plain, tokenize=False
    )
    kept = tiny_processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert kept == tiny_processor.format_prompt("What shape is it?"), "an image-first processor keeps the order"
