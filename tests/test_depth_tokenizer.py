"""Behaviour of the VQ-VAE depth tokenizer: shapes, EMA codebook, straight-through gradients, soft decoding,
dead-code revival, save/load and input validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel

from perceptio.evaluation.depth_metrics import normalised_inverse_depth
from perceptio.models.perceptio.configuration_perceptio_depth_tokenizer import PerceptioDepthTokenizerConfig
from perceptio.models.perceptio.modeling_perceptio_depth_tokenizer import (
    PerceptioDepthNormalization,
    PerceptioDepthTokenizer,
)


def tiny_config(**overrides) -> PerceptioDepthTokenizerConfig:
    values = dict(image_size=32, hidden_channels=[4, 8], num_residual_blocks=1, codebook_dim=8, num_codes=16)
    values.update(overrides)
    return PerceptioDepthTokenizerConfig(**values)


def tiny_tokenizer(seed: int = 0, **overrides) -> PerceptioDepthTokenizer:
    torch.manual_seed(seed)
    return PerceptioDepthTokenizer(tiny_config(**overrides))


def random_depth(batch: int = 2, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, height, width, generator=generator)


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_default_config_has_ten_by_ten_grid_of_128_codes():
    config = PerceptioDepthTokenizerConfig()
    assert (config.image_size, config.grid_size, config.num_tokens, config.num_codes) == (320, 10, 100, 128)


@pytest.mark.parametrize(
    ("image_size", "hidden_channels", "input_size"),
    [(32, [4, 8], (32, 32)), (48, [4, 8, 8], (50, 70)), (16, [4], (9, 8))],
)
def test_shapes_for_non_default_grids(image_size, hidden_channels, input_size):
    tokenizer = tiny_tokenizer(image_size=image_size, hidden_channels=hidden_channels)
    grid = image_size // 2 ** len(hidden_channels)
    depth = random_depth(3, *input_size)

    codes = tokenizer.encode(depth)
    assert codes.shape == (3, grid * grid) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < tokenizer.config.num_codes
    assert tokenizer.decode(codes).shape == (3, image_size, image_size)
    logits = torch.randn(3, grid * grid, tokenizer.config.num_codes)
    assert tokenizer.decode_soft(logits).shape == (3, image_size, image_size)
    assert tokenizer.codebook.shape == (tokenizer.config.num_codes, tokenizer.config.codebook_dim)


def test_channel_dimension_is_optional():
    tokenizer = tiny_tokenizer()
    depth = random_depth()
    assert torch.equal(tokenizer.encode(depth), tokenizer.encode(depth.unsqueeze(1)))


def test_training_forward_moves_codebook_by_ema_and_eval_forward_does_not():
    tokenizer = tiny_tokenizer(initialize_codebook_from_data=False)
    before = tokenizer.codebook.clone()
    tokenizer.eval()
    tokenizer(random_depth())
    assert torch.equal(tokenizer.codebook, before)

    tokenizer.train()
    output = tokenizer(random_depth())
    used = torch.unique(output.codes)
    assert not torch.allclose(tokenizer.codebook[used], before[used])
    assert not any(parameter is tokenizer.codebook for parameter in tokenizer.parameters())


def test_encode_decode_and_decode_soft_never_mutate_state_even_in_training_mode():
    tokenizer = tiny_tokenizer()
    tokenizer.train()
    before = state_copy(tokenizer)
    codes = tokenizer.encode(random_depth())
    tokenizer.decode(codes)
    tokenizer.decode_soft(torch.randn(2, tokenizer.config.num_tokens, tokenizer.config.num_codes))
    after = tokenizer.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_straight_through_gradient_reaches_encoder():
    tokenizer = tiny_tokenizer(commitment_cost=0.0)
    tokenizer.train()
    output = tokenizer(random_depth())
    output.loss.backward()
    first_convolution = tokenizer.encoder.downsample[0].weight
    assert first_convolution.grad is not None and first_convolution.grad.abs().sum() > 0
    assert output.reconstruction_loss > 0 and output.commitment_loss >= 0


def test_decode_soft_with_sharp_one_hot_logits_equals_decode():
    tokenizer = tiny_tokenizer()
    codes = tokenizer.encode(random_depth())
    one_hot = torch.nn.functional.one_hot(codes, tokenizer.config.num_codes).float()
    hard = tokenizer.decode(codes)
    errors = [(tokenizer.decode_soft(one_hot * 10.0, tau=tau) - hard).abs().max().item() for tau in (1.0, 0.1, 0.01)]
    assert errors[0] > errors[-1]
    assert errors[-1] < 1e-5


def test_gradients_flow_through_decode_soft_to_logits():
    tokenizer = tiny_tokenizer()
    logits = torch.randn(2, tokenizer.config.num_tokens, tokenizer.config.num_codes, requires_grad=True)
    target = random_depth() * 2 - 1
    (tokenizer.decode_soft(logits, tau=0.5) - target).abs().mean().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_dead_code_revival_reseeds_a_collapsed_codebook():
    tokenizer = tiny_tokenizer(initialize_codebook_from_data=False, dead_code_threshold_steps=2)
    tokenizer.train()
    with torch.no_grad():
        # Every code but 0 is far from any encoder output, so all latents collapse onto code 0.
        tokenizer.quantizer.codebook[1:] = 1e3
        tokenizer.quantizer.embedding_sum[1:] = 1e3
    first = tokenizer(random_depth(seed=1))
    assert torch.unique(first.codes).tolist() == [0]
    assert int(first.dead_code_count) == 0

    second = tokenizer(random_depth(seed=2))
    assert int(second.dead_code_count) == tokenizer.config.num_codes - 1
    assert tokenizer.codebook[1:].abs().max() < 1e2

    third = tokenizer(random_depth(seed=3))
    assert torch.unique(third.codes).numel() > 1
    assert third.perplexity > first.perplexity


def test_codebook_statistics_histogram_perplexity_and_usage():
    tokenizer = tiny_tokenizer()
    codes = torch.tensor([[0, 0, 1, 1]])
    statistics = tokenizer.codebook_statistics(codes)
    assert statistics.histogram.tolist()[:3] == [2, 2, 0] and int(statistics.histogram.sum()) == 4
    assert statistics.perplexity == pytest.approx(2.0)
    assert statistics.usage_fraction == pytest.approx(2 / tokenizer.config.num_codes)


def test_save_and_load_are_bitwise_identical_including_ema_statistics(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.train()
    optimizer = torch.optim.SGD(tokenizer.parameters(), lr=0.1)
    for seed in range(2):
        tokenizer(random_depth(seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tokenizer.eval()
    tokenizer.save_pretrained(tmp_path)
    loaded = PerceptioDepthTokenizer.from_pretrained(tmp_path)

    saved, restored = tokenizer.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[name], restored[name]) for name in saved)
    depth = random_depth(seed=5)
    assert torch.equal(tokenizer.encode(depth), loaded.encode(depth))
    codes = tokenizer.encode(depth)
    assert torch.equal(tokenizer.decode(codes), loaded.decode(codes))


class HostModel(PreTrainedModel):
    """Stands in for the main Perceptio model, which embeds the tokenizer as a submodule."""

    config_class = PerceptioDepthTokenizerConfig

    def __init__(self, config):
        super().__init__(config)
        self.depth_tokenizer = PerceptioDepthTokenizer(config)
        self.head = torch.nn.Linear(4, 4)
        self.post_init()


def test_embedded_tokenizer_statistics_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    host = HostModel(tiny_config())
    host.depth_tokenizer.train()
    host.depth_tokenizer(random_depth())
    host.save_pretrained(tmp_path)
    loaded = HostModel.from_pretrained(tmp_path)
    for name, tensor in host.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert bool(loaded.depth_tokenizer.quantizer.initialized)


@pytest.mark.parametrize(
    ("depth", "message"),
    [
        (torch.rand(2, 3, 32, 32), "channel"),
        (torch.rand(2, 5, 5), "at least"),
        (torch.rand(32, 32), "shape"),
        (torch.tensor([[[float("nan")] * 32] * 32]), "NaN"),
        (torch.full((1, 32, 32), float("inf")), "NaN or infinite"),
    ],
)
def test_bad_depth_raises_value_error(depth, message):
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match=message):
        tokenizer.encode(depth)
    with pytest.raises(ValueError, match=message):
        tokenizer(depth)


def test_bad_codes_and_logits_raise_value_error():
    tokenizer = tiny_tokenizer()
    num_tokens, num_codes = tokenizer.config.num_tokens, tokenizer.config.num_codes
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        tokenizer.decode(torch.full((1, num_tokens), num_codes))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        tokenizer.decode(torch.full((1, num_tokens), -1))
    with pytest.raises(ValueError, match="shape"):
        tokenizer.decode(torch.zeros(1, num_tokens + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        tokenizer.decode(torch.zeros(1, num_tokens))
    with pytest.raises(ValueError, match="code_logits"):
        tokenizer.decode_soft(torch.zeros(1, num_tokens, num_codes + 1))
    with pytest.raises(ValueError, match="tau"):
        tokenizer.decode_soft(torch.zeros(1, num_tokens, num_codes), tau=0.0)


def test_constant_map_normalises_to_zero_and_back():
    tokenizer = tiny_tokenizer()
    depth = torch.full((2, 40, 40), 3.5)
    normalized, stats = tokenizer.normalize(depth)
    assert torch.equal(normalized, torch.zeros(2, 32, 32))
    assert torch.allclose(tokenizer.denormalize(normalized, stats), depth)
    assert tokenizer.encode(depth).shape == (2, tokenizer.config.num_tokens)


def test_evaluation_ground_truth_is_normalised_as_the_tokenizer_normalises():
    tokenizer = tiny_tokenizer()
    side = tokenizer.config.image_size
    depth = torch.rand(2, side, side, generator=torch.Generator().manual_seed(0)) * 4 + 0.5
    depth[1] = 2.0 + 1e-7 * torch.rand(side, side)  # constant up to rounding: 0 in both
    normalized, _ = tokenizer.normalize(depth)
    for map_, expected in zip(depth, normalized):
        torch.testing.assert_close(torch.from_numpy(normalised_inverse_depth(map_.numpy())).float(), expected)


@settings(max_examples=30, deadline=None)
@given(
    height=st.integers(4, 40),
    width=st.integers(4, 40),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-1e3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_normalize_maps_to_unit_range_and_denormalize_inverts_it(height, width, scale, offset, seed):
    tokenizer = PerceptioDepthTokenizer(tiny_config(image_size=16, hidden_channels=[4, 4]))
    depth = torch.rand(1, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    depth = (depth * scale + offset).float()
    normalized, stats = tokenizer.normalize(depth)
    assert normalized.shape == (1, 16, 16)
    assert normalized.min() >= -1 and normalized.max() <= 1
    if normalized.max() > normalized.min():
        assert normalized.min() == -1 and normalized.max() == 1
    at_model_size = tokenizer.denormalize(
        normalized, PerceptioDepthNormalization(stats.minimum, stats.maximum, (16, 16))
    )
    assert tokenizer.denormalize(normalized, stats).shape == depth.shape
    renormalized, _ = tokenizer.normalize(at_model_size)
    assert torch.allclose(renormalized, normalized, atol=1e-3)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_decode_soft_rejects_non_finite_logits_outside_training(value):
    tokenizer = tiny_tokenizer().eval()
    logits = torch.zeros(1, tokenizer.config.num_tokens, tokenizer.config.num_codes)
    logits[0, 0, 0] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        tokenizer.decode_soft(logits)
    # Training skips the check (a host-device sync per step): the non-finite value reaches the output instead, so
    # the loss built on it is non-finite and the trainer names it.
    assert torch.isnan(tokenizer.train().decode_soft(logits)).any()
