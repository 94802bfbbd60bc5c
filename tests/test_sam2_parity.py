"""SAM2 parity: Perceptio's grounding encoder built from an original SAM2 .pt vs the sam2 package's own SAM2Base.

Both read the same checkpoint; the same image and the same [SEG] prompt embeddings (appended to the sparse
embedding of an empty point, label -1, as Perceptio prompts SAM2) go through each. Tolerance: best-IoU mask logits
and IoU scores agree to 1e-5 absolute (float32), and the chosen mask is the same. Measured: at most 2.4e-7 on
logits of magnitude ~3.5, IoU scores identical (5 seeds).
"""

from __future__ import annotations

import pytest
import torch
from test_build import (  # noqa: E402  (shared tiny-checkpoint writers)
    TINY_SAM2_CONFIG_NAME,
    TINY_SAM2_OVERRIDES,
    write_tiny_internvl,
    write_tiny_original_sam2,
)

from perceptio import PerceptioForConditionalGeneration
from perceptio.hub_cards.build_perceptio import build_perceptio
from perceptio.hub_cards.convert_sam2_original import load_original_sam2


PARITY_ATOL = 1e-5
NUM_PROMPTS = 3


def sam2_package_masks(sam, image: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All multimask logits and IoU scores of the sam2 package's SAM2Base for one image and n prompt embeddings."""
    backbone = sam.forward_image(image)
    _, features, _, sizes = sam._prepare_backbone_features(backbone)
    # As SAM2ImagePredictor does for a single image: add the "no memory" embedding to the lowest-resolution level.
    features[-1] = features[-1] + sam.no_mem_embed
    levels = [feature.permute(1, 2, 0).reshape(1, -1, *size) for feature, size in zip(features, sizes)]
    count = prompts.shape[0]
    points = torch.zeros(count, 1, 2)
    labels = -torch.ones(count, 1, dtype=torch.int32)
    sparse, dense = sam.sam_prompt_encoder(points=(points, labels), boxes=None, masks=None)
    sparse = torch.cat([sparse, prompts[:, None]], dim=1)
    logits, scores, _, _ = sam.sam_mask_decoder(
        image_embeddings=levels[-1],
        image_pe=sam.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
        repeat_image=True,
        high_res_features=levels[:-1],
    )
    return logits, scores


@pytest.fixture(scope="module")
def checkpoint_and_model(tmp_path_factory):
    from perceptio import PerceptioDepthTokenizer
    from perceptio.tiny_models import tiny_depth_tokenizer_config

    root = tmp_path_factory.mktemp("parity")
    checkpoint = write_tiny_original_sam2(root / "sam2.pt", seed=3)
    write_tiny_internvl(root / "base")
    PerceptioDepthTokenizer(tiny_depth_tokenizer_config()).save_pretrained(root / "depth")
    build_perceptio(
        root / "base",
        checkpoint,
        root / "depth",
        root / "built",
        dtype="float32",
        num_depth_tokens=16,
        sam2_config_name=TINY_SAM2_CONFIG_NAME,
        sam2_overrides=TINY_SAM2_OVERRIDES,
    )
    return checkpoint, PerceptioForConditionalGeneration.from_pretrained(root / "built").eval()


def predict_best_masks(model, image: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """The best-IoU candidate of each prompt, as `predict_masks` keeps it."""
    candidates, scores = model.decode_masks(model.sam_image_embeddings(image), prompts)
    return candidates[torch.arange(prompts.shape[0]), scores.argmax(-1)]


@pytest.mark.parametrize("seed", [0, 1])
def test_grounding_encoder_masks_match_the_sam2_package(checkpoint_and_model, seed):
    checkpoint, model = checkpoint_and_model
    sam = load_original_sam2(checkpoint, TINY_SAM2_CONFIG_NAME, TINY_SAM2_OVERRIDES)
    generator = torch.Generator().manual_seed(seed)
    size = model.config.sam2_config.prompt_encoder_config.image_size
    image = torch.randn(1, 3, size, size, generator=generator)
    prompts = torch.randn(NUM_PROMPTS, model.config.sam2_config.mask_decoder_config.hidden_size, generator=generator)
    with torch.no_grad():
        candidates, candidate_scores = model.decode_masks(model.sam_image_embeddings(image), prompts)
        ours = predict_best_masks(model, image, prompts)
        reference, reference_scores = sam2_package_masks(sam, image, prompts)
    assert reference.abs().max() > 1.0, "masks too flat for the comparison to mean anything"
    torch.testing.assert_close(candidates, reference, atol=PARITY_ATOL, rtol=0)
    torch.testing.assert_close(candidate_scores, reference_scores, atol=PARITY_ATOL, rtol=0)
    rows = torch.arange(NUM_PROMPTS)
    chosen = reference_scores.argmax(-1)
    torch.testing.assert_close(ours, reference[rows, chosen], atol=PARITY_ATOL, rtol=0)
    assert torch.equal(ours > 0, reference[rows, chosen] > 0)


def test_a_wrongly_mapped_weight_breaks_parity(checkpoint_and_model):
    # The comparison is sensitive: perturbing one mask-decoder weight moves the masks far beyond the tolerance.
    checkpoint, model = checkpoint_and_model
    sam = load_original_sam2(checkpoint, TINY_SAM2_CONFIG_NAME, TINY_SAM2_OVERRIDES)
    with torch.no_grad():
        sam.sam_mask_decoder.output_hypernetworks_mlps[1].layers[0].weight.mul_(-1)
    size = model.config.sam2_config.prompt_encoder_config.image_size
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    prompts = torch.randn(NUM_PROMPTS, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = predict_best_masks(model, image, prompts)
        reference, scores = sam2_package_masks(sam, image, prompts)
    # No reference mask (of the three multimask outputs) of any prompt matches ours any more.
    distances = (ours[:, None] - reference).abs().amax(dim=(-2, -1))
    assert distances.min() > 100 * PARITY_ATOL
