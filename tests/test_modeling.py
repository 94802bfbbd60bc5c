"""PerceptioForConditionalGeneration: forward/backward, the [SEG] → SAM2 path, bad input, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText

from perceptio.models.perceptio.loss_perceptio import LOSS_TERMS


def _segmentation_example(processor, image, num_seg=2, with_depth=True):
    codes = list(range(16)) if with_depth else None
    target = processor.format_target(num_seg, codes, "Here they are.")
    return processor.build_training_example("Segment the cubes.", target, images=image)


def _forward(model, example, masks, **kwargs):
    return model(
        input_ids=example["input_ids"][None],
        pixel_values=example["pixel_values"],
        sam_pixel_values=example["sam_pixel_values"],
        labels=example["labels"][None],
        gt_masks=masks,
        **kwargs,
    )


def test_forward_backward_reports_every_component(tiny_attribute_model, tiny_processor, rgb_image):
    model = tiny_attribute_model.train()
    example = _segmentation_example(tiny_processor, rgb_image)
    masks = [torch.from_numpy(np.random.default_rng(1).random((2, 48, 72)) > 0.5)]
    width = model.config.sam2_config.mask_decoder_config.hidden_size
    prompt_targets = [torch.stack([torch.ones(width), torch.full((width,), float("nan"))])]
    output = _forward(
        model,
        example,
        masks,
        seg_attributes=[torch.tensor([[1, 2], [3, -100]])],
        seg_prompt_targets=prompt_targets,
    )
    for name in ("loss", *LOSS_TERMS):
        value = getattr(output, name)
        assert value is not None and torch.isfinite(value) and value > 0, name
    config = model.config
    weights = (
        1.0,
        config.mask_loss_weight,
        config.mask_iou_loss_weight,
        config.seg_attribute_loss_weight,
        config.seg_prompt_loss_weight,
        config.depth_marker_loss_weight,
        config.depth_token_loss_weight,
        config.depth_count_loss_weight,
        config.depth_recon_loss_weight,
    )
    names = (
        "loss_lm",
        "loss_mask",
        "loss_mask_iou",
        "loss_seg_attribute",
        "loss_seg_prompt",
        "loss_marker",
        "loss_token",
        "loss_count",
        "loss_depth_recon",
    )
    assert tuple(LOSS_TERMS) == names
    expected = sum(weight * getattr(output, name) for weight, name in zip(weights, names))
    assert torch.allclose(output.loss, expected)
    assert [tuple(m.shape) for m in output.pred_masks] == [(2, 32, 32)]
    output.loss.backward()
    assert model.text_hidden_fcs[0].weight.grad.abs().sum() > 0
    assert all(head.weight.grad.abs().sum() > 0 for head in model.seg_attribute_heads)
    decoder = model.grounding_encoder.mask_decoder
    assert decoder.conv_s0.weight.grad.abs().sum() > 0
    assert decoder.iou_prediction_head.proj_out.weight.grad.abs().sum() > 0, "the IoU head learns from the IoU loss"


def test_seg_attribute_loss_is_the_heads_cross_entropy_on_the_seg_states(
    tiny_attribute_model, tiny_processor, rgb_image
):
    example = _segmentation_example(tiny_processor, rgb_image, with_depth=False)
    captured = []
    tiny_attribute_model.text_hidden_fcs.register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0])
    )
    labels = torch.tensor([[0, -100], [3, 1]])
    output = _forward(tiny_attribute_model, example, [torch.ones(2, 8, 8)], seg_attributes=[labels])
    states = captured[0]
    first, second = (head(states) for head in tiny_attribute_model.seg_attribute_heads)
    expected = (
        torch.nn.functional.cross_entropy(first, labels[:, 0])
        + torch.nn.functional.cross_entropy(second[1:], labels[1:, 1])
    ) / 2
    assert torch.allclose(output.loss_seg_attribute, expected)
    output.loss_seg_attribute.backward()
    embedding_grad = tiny_attribute_model.get_input_embeddings().weight.grad
    assert embedding_grad is not None and embedding_grad.abs().sum() > 0, "the term trains the language model"


def test_seg_attribute_loss_is_zero_without_labels_but_reaches_every_head(
    tiny_attribute_model, tiny_processor, rgb_image
):
    example = _segmentation_example(tiny_processor, rgb_image, with_depth=False)
    unlabelled = [torch.full((2, 2), -100)]
    output = _forward(tiny_attribute_model, example, [torch.ones(2, 8, 8)], seg_attributes=unlabelled)
    assert output.loss_seg_attribute == 0
    output.loss.backward()
    assert all(head.weight.grad is not None for head in tiny_attribute_model.seg_attribute_heads)
    assert _forward(tiny_attribute_model, example, [torch.ones(2, 8, 8)]).loss_seg_attribute == 0


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([torch.tensor([[0, 0]])], "Sample 0 has 2 \\[SEG\\] token\\(s\\) but seg_attributes of shape \\(1, 2\\)"),
        ([torch.tensor([[0, 0], [4, 0]])], "class ids below \\[4, 3\\]"),
        ([torch.tensor([[0, -1], [0, 0]])], "class ids below"),
        ([torch.zeros(2, 2), torch.zeros(2, 2)], "2 entries for a batch of 1"),
    ],
)
def test_bad_seg_attributes_are_rejected(tiny_attribute_model, tiny_processor, rgb_image, labels, message):
    example = _segmentation_example(tiny_processor, rgb_image, with_depth=False)
    with pytest.raises(ValueError, match=message):
        _forward(tiny_attribute_model, example, [torch.ones(2, 8, 8)], seg_attributes=labels)


def test_seg_attributes_need_the_heads(tiny_model, tiny_processor, rgb_image):
    example = _segmentation_example(tiny_processor, rgb_image, with_depth=False)
    with pytest.raises(ValueError, match="no seg_attribute_heads; set config.seg_attribute_classes"):
        _forward(tiny_model, example, [torch.ones(2, 8, 8)], seg_attributes=[torch.zeros(2, 2, dtype=torch.long)])


def test_seg_attribute_heads_save_and_reload(tiny_attribute_model, tmp_path):
    tiny_attribute_model.save_pretrained(tmp_path)
    reloaded = type(tiny_attribute_model).from_pretrained(tmp_path)
    assert reloaded.config.seg_attribute_classes == [4, 3]
    for original, loaded in zip(tiny_attribute_model.seg_attribute_heads, reloaded.seg_attribute_heads):
        assert torch.equal(original.weight, loaded.weight)


def test_mask_loss_alone_reaches_llm_embeddings(tiny_model, tiny_processor, rgb_image):
    example = _segmentation_example(tiny_processor, rgb_image, with_depth=False)
    masks = [torch.ones(2, 10, 10)]
    output = _forward(tiny_model, example, masks)
    output.loss_mask.backward()
    embedding_grad = tiny_model.get_input_embeddings().weight.grad
    assert embedding_grad is not None and embedding_grad.abs().sum() > 0


def test_batch_without_seg_keeps_mask_path_in_graph(tiny_model, tiny_processor, rgb_image):
    example = tiny_processor.build_training_example("What colour?", "Red.", images=rgb_image)
    output = _forward(tiny_model, example, [torch.zeros(0, 4, 4)])
    assert output.loss_mask == 0
    output.loss.backward()
    decoder_grad = tiny_model.grounding_encoder.mask_decoder.iou_token.weight.grad
    assert decoder_grad is not None and torch.all(decoder_grad == 0)


def test_only_images_with_a_seg_are_encoded_and_their_masks_are_unchanged(tiny_model, tiny_processor, rgb_image):
    tiny_model.eval()
    states = torch.randn(2, tiny_model.config.text_config.hidden_size)
    other_image = tiny_processor(images=255 - rgb_image, text="<image>")["sam_pixel_values"]
    own_image = tiny_processor(images=rgb_image, text="<image>")["sam_pixel_values"]
    encoded_batch_sizes = []
    tiny_model.grounding_encoder.vision_encoder.register_forward_hook(
        lambda module, inputs, output: encoded_batch_sizes.append(inputs[0].shape[0])
    )
    with torch.no_grad():
        alone = tiny_model.predict_masks([states], own_image)
        mixed = tiny_model.predict_masks(
            [states[:0], states, states[:0]], torch.cat([other_image, own_image, own_image])
        )
    assert encoded_batch_sizes == [1, 1]
    torch.testing.assert_close(mixed.mask_logits[1], alone.mask_logits[0])
    assert [logits.shape[0] for logits in mixed.mask_logits] == [0, 2, 0]
    assert mixed.mask_logits[0].shape[-2:] == alone.mask_logits[0].shape[-2:]
    with torch.no_grad():
        unprompted = tiny_model.predict_masks([states[:0]], own_image)
    assert (
        encoded_batch_sizes == [1, 1] and unprompted.candidate_logits[0].shape[-2:] == alone.mask_logits[0].shape[-2:]
    )


def test_more_seg_tokens_than_masks_names_the_sample(tiny_model, tiny_processor, rgb_image):
    example = _segmentation_example(tiny_processor, rgb_image, num_seg=2)
    with pytest.raises(ValueError, match="Sample 0 has 2 \\[SEG\\] token\\(s\\) but 1 ground-truth mask"):
        _forward(tiny_model, example, [torch.ones(1, 8, 8)])


def test_seg_without_sam_pixel_values_is_rejected(tiny_model, tiny_processor, rgb_image):
    example = _segmentation_example(tiny_processor, rgb_image)
    with pytest.raises(ValueError, match="Samples \\[0\\] have \\[SEG\\] tokens but no sam_pixel_values"):
        tiny_model(
            input_ids=example["input_ids"][None], pixel_values=example["pixel_values"], labels=example["labels"][None]
        )


def test_image_token_mismatch_names_the_sample(tiny_model, tiny_processor, rgb_image):
    example = _segmentation_example(tiny_processor, rgb_image)
    input_ids = example["input_ids"][None].clone()
    first_image_token = (input_ids[0] == tiny_model.config.image_token_id).nonzero()[0, 0]
    input_ids[0, first_image_token] = tiny_processor.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="samples \\[0\\]"):
        tiny_model(input_ids=input_ids, pixel_values=example["pixel_values"])


def test_segmentation_only_checkpoint_rejects_depth_features():
    from perceptio.tiny_models import build_tiny_perceptio

    model, _ = build_tiny_perceptio(with_depth_tokenizer=False)
    assert model.depth_tokenizer is None
    with pytest.raises(ValueError, match="no depth tokenizer"):
        model.require_depth_tokenizer()


def test_save_and_load_give_bitwise_equal_logits_and_masks(tiny_pair, tiny_processor, rgb_image, tmp_path):
    model = tiny_pair[0]
    example = _segmentation_example(tiny_processor, rgb_image)
    inputs = {
        "input_ids": example["input_ids"][None],
        "pixel_values": example["pixel_values"],
        "sam_pixel_values": example["sam_pixel_values"],
    }
    with torch.no_grad():
        before = model(**inputs)
    model.save_pretrained(tmp_path)
    for auto_class in (AutoModel, AutoModelForImageTextToText):
        loaded = auto_class.from_pretrained(tmp_path).eval()
        assert type(loaded).__name__ == "PerceptioForConditionalGeneration"
        with torch.no_grad():
            after = loaded(**inputs)
        assert torch.equal(before.logits, after.logits)
        assert torch.equal(before.pred_masks[0], after.pred_masks[0])
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))


def test_new_token_rows_start_at_the_mean(tiny_model):
    embeddings = tiny_model.get_input_embeddings().weight
    new_ids = [3, 7]
    keep = torch.ones(embeddings.shape[0], dtype=torch.bool)
    keep[new_ids] = False
    expected = embeddings.detach()[keep].mean(0)
    tiny_model.initialize_new_token_embeddings(new_ids)
    assert torch.allclose(embeddings[3], expected) and torch.allclose(embeddings[7], expected)
    assert torch.allclose(
        tiny_model.get_output_embeddings().weight[3], tiny_model.get_output_embeddings().weight[keep].mean(0)
    )


def test_a_fresh_sam2_locates_point_prompts_with_the_images_fourier_basis(tiny_pair, tmp_path):
    """Point and image positions are only comparable under one Gaussian matrix, as in released SAM2 weights."""
    model = tiny_pair[0]
    sam = model.grounding_encoder
    image_basis = sam.shared_image_embedding.positional_embedding
    assert torch.equal(sam.prompt_encoder.shared_embedding.positional_embedding, image_basis)
    point = torch.tensor([[[[40.0, 88.0]]]])
    size = sam.prompt_encoder.input_image_size
    encoded_point = sam.prompt_encoder.shared_embedding(point + 0.5, (size, size))[0, 0, 0]
    image_encoding = sam.get_image_wide_positional_embeddings()[0]
    similarity = torch.einsum("c,chw->hw", encoded_point, image_encoding)
    row, column = divmod(similarity.argmax().item(), similarity.shape[1])
    cell = size / similarity.shape[0]
    assert abs((row + 0.5) * cell - 88.5) <= cell and abs((column + 0.5) * cell - 40.5) <= cell
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).grounding_encoder
    assert torch.equal(reloaded.prompt_encoder.shared_embedding.positional_embedding, image_basis)


def test_single_mask_output_decodes_and_trains_one_candidate_per_seg(tiny_model, tiny_processor, rgb_image):
    tiny_model.config.sam2_multimask_output = False
    tiny_model.grounding_encoder.mask_decoder.dynamic_multimask_via_stability = False
    example = _segmentation_example(tiny_processor, rgb_image)
    output = _forward(tiny_model, example, [torch.ones(2, 48, 72)])
    assert torch.isfinite(output.loss_mask) and output.loss_mask > 0
    seg_hidden = [torch.randn(2, tiny_model.config.text_config.hidden_size)]
    masks = tiny_model.predict_masks(seg_hidden, example["sam_pixel_values"])
    assert masks.candidate_logits[0].shape[:2] == (2, 1) and masks.mask_logits[0].shape == (2, 32, 32)
    assert torch.equal(masks.mask_logits[0], masks.candidate_logits[0][:, 0])
