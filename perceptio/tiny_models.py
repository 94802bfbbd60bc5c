"""Tiny Perceptio models for tests, docs and CPU experiments — built locally, no network.

A tiny model has a real byte-level BPE tokenizer (trained with `tokenizers` on the text bundled in
`perceptio/assets/tiny_corpus.txt`), tiny InternVL / SAM2 / depth-tokenizer configurations,
and random weights. `num_depth_codes=0` gives a segmentation-only one (`[SEG]`, no depth tokens).

>>> from perceptio.tiny_models import build_tiny_perceptio
>>> model, processor = build_tiny_perceptio(seed=0)
>>> model.config.num_depth_tokens
16
"""

from __future__ import annotations

from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Sam2Config

from .models.perceptio.configuration_perceptio import PerceptioConfig
from .models.perceptio.configuration_perceptio_depth_tokenizer import PerceptioDepthTokenizerConfig
from .models.perceptio.image_processing_perceptio import PerceptioImageProcessor
from .models.perceptio.modeling_perceptio import PerceptioForConditionalGeneration
from .models.perceptio.processing_perceptio import PerceptioProcessor
from .models.perceptio.spatial_vocabulary_perceptio import PerceptioSpatialVocabulary


TINY_VOCAB_SIZE = 1024
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_NUM_DEPTH_CODES = 32
# N of the tiny depth tokenizer: its 32-pixel maps become a 4×4 code grid.
TINY_NUM_DEPTH_TOKENS = 16


def tiny_corpus() -> str:
    """The text the tiny tokenizer is trained on (ships with the package)."""
    return resources.files("perceptio.assets").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the bundled corpus (deterministic; about a second on one core)."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes + specials + merges), got {vocab_size}.")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tiny_corpus().splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )


def tiny_depth_tokenizer_config(num_codes: int = TINY_NUM_DEPTH_CODES) -> PerceptioDepthTokenizerConfig:
    """A 32×32 depth tokenizer with a 4×4 code grid (N = 16)."""
    return PerceptioDepthTokenizerConfig(
        image_size=32,
        hidden_channels=[8, 16, 16],
        num_residual_blocks=1,
        codebook_dim=16,
        num_codes=num_codes,
    )


TINY_SAM2_IMAGE_SIZE = 128
# Hiera halves its grid between each of its four stages, so the patch grid (128 / stride a side) must halve thrice.
TINY_SAM2_PATCH_STRIDES = (1, 2, 4, 8, 16)


def tiny_sam2_config(backbone_hidden_size: int = 12, hidden_size: int = 32, patch_stride: int = 4) -> Sam2Config:
    """The tiny SAM2: 128² input, ≈0.5M parameters with the default widths. Its Hiera stages are
    `backbone_hidden_size` channels wide, doubling at each of the four; `hidden_size` is the width of the feature
    pyramid, the prompt encoder and the mask decoder. Hiera's patch embedding steps `patch_stride` pixels (SAM2's 4 by
    default), so the image embedding the mask decoder reads is 128 / (4 × patch_stride) cells a side and its mask
    logits four times that: 8 and 32 by default, 16 and 64 at stride 2 (for about 2.3 times the compute)."""
    for name, value in (("backbone_hidden_size", backbone_hidden_size), ("hidden_size", hidden_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if hidden_size % 8:
        # The mask decoder's upscaling layers have an eighth of its width as channels.
        raise ValueError(f"hidden_size must be a multiple of 8, got {hidden_size}.")
    if type(patch_stride) is not int or patch_stride not in TINY_SAM2_PATCH_STRIDES:
        raise ValueError(f"patch_stride must be one of {TINY_SAM2_PATCH_STRIDES}, got {patch_stride!r}.")
    stage_widths = [backbone_hidden_size * 2**stage for stage in range(4)]
    # The feature pyramid keeps Hiera's three finest stages; the last of them is the image embedding.
    feature_sides = [TINY_SAM2_IMAGE_SIZE // (patch_stride * 2**stage) for stage in range(3)]
    return Sam2Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": backbone_hidden_size,
                "blocks_per_stage": [1, 2, 7, 2],
                "embed_dim_per_stage": stage_widths,
                "num_attention_heads_per_stage": [1, 2, 4, 8],
                "window_size_per_stage": [8, 4, 14, 7],
                "global_attention_blocks": [5, 7, 9],
                "image_size": [TINY_SAM2_IMAGE_SIZE, TINY_SAM2_IMAGE_SIZE],
                # SAM2's 7-pixel kernel at stride 4, scaled with the stride so patches overlap alike.
                "patch_kernel_size": [2 * patch_stride - 1] * 2,
                "patch_stride": [patch_stride] * 2,
                "patch_padding": [patch_stride - 1] * 2,
            },
            "backbone_channel_list": stage_widths[::-1],
            "backbone_feature_sizes": [[side, side] for side in feature_sides],
            "fpn_hidden_size": hidden_size,
        },
        prompt_encoder_config={
            "hidden_size": hidden_size,
            "image_size": TINY_SAM2_IMAGE_SIZE,
            "patch_size": TINY_SAM2_IMAGE_SIZE // feature_sides[-1],
            "mask_input_channels": hidden_size // 4,
        },
        mask_decoder_config={
            "hidden_size": hidden_size,
            "mlp_dim": 2 * hidden_size,
            "num_attention_heads": 4,
            "iou_head_hidden_dim": hidden_size,
        },
    )


def tiny_perceptio_config(
    vocab_size: int, vocabulary: PerceptioSpatialVocabulary, with_depth_tokenizer: bool = True
) -> PerceptioConfig:
    """The tiny InternVL (qwen2 text, hidden 128, 4 layers) + tiny SAM2 + tiny depth tokenizer (when the vocabulary
    has depth tokens and `with_depth_tokenizer`), with the spatial token ids of `vocabulary`."""
    if vocabulary.has_depth_block:
        # N is the tiny depth tokenizer's grid, with or without the tokenizer (a processor may leave it open).
        vocabulary = vocabulary.with_num_depth_tokens(TINY_NUM_DEPTH_TOKENS)
    use_depth_tokenizer = with_depth_tokenizer and vocabulary.has_depth_block
    depth_config = tiny_depth_tokenizer_config(vocabulary.num_depth_codes) if use_depth_tokenizer else None
    return PerceptioConfig(
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": 64,
            "patch_size": 4,
        },
        image_seq_length=64,
        tie_word_embeddings=False,
        sam2_config=tiny_sam2_config(),
        depth_tokenizer_config=depth_config,
        **vocabulary.config_fields(),
    )


def build_tiny_processor(
    num_depth_codes: int = TINY_NUM_DEPTH_CODES, max_num_tiles: int = 2, num_depth_tokens: int | None = None
) -> PerceptioProcessor:
    """A processor with the tiny tokenizer, 64-pixel tiles and a 128-pixel SAM2 input; `num_depth_codes=0` makes it
    segmentation-only."""
    image_processor = PerceptioImageProcessor(tile_size=64, max_num_tiles=max_num_tiles, sam_image_size=128)
    return PerceptioProcessor(
        image_processor=image_processor,
        tokenizer=train_tiny_tokenizer(),
        num_depth_codes=num_depth_codes,
        image_seq_length=64,
        num_depth_tokens=num_depth_tokens,
    )


def build_tiny_perceptio(
    seed: int = 0,
    with_depth_tokenizer: bool = True,
    max_num_tiles: int = 2,
    num_depth_codes: int = TINY_NUM_DEPTH_CODES,
) -> tuple[PerceptioForConditionalGeneration, PerceptioProcessor]:
    """A randomly initialised tiny Perceptio and its processor (a few MB; builds in about a second on CPU).

    `num_depth_codes=0` builds a segmentation-only one: `[SEG]` but no depth tokens and no depth tokenizer.
    """
    num_depth_tokens = TINY_NUM_DEPTH_TOKENS if num_depth_codes else 0
    processor = build_tiny_processor(num_depth_codes, max_num_tiles, num_depth_tokens)
    config = tiny_perceptio_config(len(processor.tokenizer), processor.spatial_vocabulary, with_depth_tokenizer)
    torch.manual_seed(seed)
    model = PerceptioForConditionalGeneration(config)
    model.eval()
    return model, processor
