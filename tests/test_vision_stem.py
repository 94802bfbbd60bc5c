"""The vision tower's optional convolutional stem: configuration checks, the tower it builds, and Hub loading."""

from __future__ import annotations

import copy

import pytest
import torch
from test_export import run_isolated_script

from perceptio.hub_cards.export_perceptio import export_pretrained
from perceptio.models.perceptio import PerceptioConfig, PerceptioForConditionalGeneration
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe


def with_stem(model: PerceptioForConditionalGeneration, channels: list[int]) -> PerceptioForConditionalGeneration:
    """A model of `model`'s config whose vision tower has a convolutional stem of `channels` (seed 0)."""
    config = copy.deepcopy(model.config)
    config.vision_stem_channels = channels
    torch.manual_seed(0)
    return type(model)(config).eval()


def tower_tokens(model: PerceptioForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]


@pytest.mark.parametrize(
    ("channels", "message"),
    [([16, 16], "makes 8-pixel patches"), ([], "makes 2-pixel patches"), ([16, 0], "positive widths"), ("16", "list")],
)
def test_a_stem_that_does_not_fit_the_patch_size_is_rejected(tiny_pair, channels, message):
    fields = tiny_pair[0].config.to_dict()
    fields["vision_stem_channels"] = channels
    with pytest.raises(ValueError, match="vision_stem_channels") as error:
        PerceptioConfig(**fields)
    assert message in str(error.value)


def test_a_stem_keeps_the_token_grid_and_lets_a_pixel_reach_neighbouring_patches(tiny_pair):
    plain = tiny_pair[0].eval()
    stemmed = with_stem(plain, [16])
    patch = plain.config.vision_config.patch_size[0]
    image = torch.randn(1, 3, *plain.config.vision_config.image_size)
    assert tower_tokens(stemmed, image).shape == tower_tokens(plain, image).shape
    # The tower's two layers mix every token, so compare what reaches the tokens before attention: the embeddings.
    nudged = image.clone()
    nudged[0, :, 0, patch - 1] += 1.0  # the last pixel column of the first patch
    for model, changed_patches in ((plain, 1), (stemmed, 2)):
        patch_embeddings = model.model.vision_tower.embeddings.patch_embeddings
        with torch.no_grad():
            change = (patch_embeddings(nudged) - patch_embeddings(image)).abs().sum(-1)[0]
        assert int((change > 0).sum()) == changed_patches


def test_the_stem_starts_at_pytorchs_fan_in_scale(tiny_pair):
    stem = with_stem(tiny_pair[0], [16]).model.vision_tower.embeddings.patch_embeddings.stem
    first = stem[0].weight
    fan_in = first.shape[1] * first.shape[2] * first.shape[3]
    # kaiming_uniform(a=√5) draws from ±1/√fan_in (std 1/√(3·fan_in)); the tower's own init would give 0.02.
    assert first.abs().max() <= fan_in**-0.5
    assert first.std() > 0.5 * (3 * fan_in) ** -0.5 > 0.02


def test_a_model_with_a_stem_round_trips_and_loads_without_the_package(tiny_pair, rgb_image, tmp_path):
    model, processor = tiny_pair
    stemmed = with_stem(model, [16])
    folder = export_pretrained(stemmed, processor, tmp_path / "export")
    reloaded = PerceptioForConditionalGeneration.from_pretrained(folder).eval()
    assert reloaded.config.vision_stem_channels == [16]
    request = {"image": rgb_image, "prompt": processor.format_prompt("Where is the red cube?") + "[SEG]"}
    remote = run_isolated_script("isolated_hub_load.py", folder, request, tmp_path)
    inputs = processor(images=[request["image"]], text=[request["prompt"]])
    with torch.no_grad():
        local = reloaded(**inputs)
        built = stemmed(**inputs)
    assert torch.equal(local.logits, remote["logits"])
    assert torch.equal(built.logits, remote["logits"])


def test_the_recipe_rejects_a_stem_that_does_not_make_its_patch_size():
    with pytest.raises(ValueError, match="vision_stem_channels"):
        SyntheticTinyRecipe(vision_patch_size=8, vision_stem_channels=[32])
