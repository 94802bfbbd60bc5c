"""Starting the multimodal projector from token-cell probes of the vision tower."""

from __future__ import annotations

import copy

import pytest
import torch

from perceptio.trainers.projector_from_probes import (
    fit_projector_from_probes,
    probe_class_counts,
    token_cell_size,
    token_features,
    vision_patch_size,
)
from perceptio.trainers.vision_pretraining import (
    BACKGROUND,
    NUM_TALLY_CLASSES,
    TALLY_GROUPS,
    label_grid_side,
    render_patch_labelled_scenes,
)


@pytest.fixture(scope="module")
def cell_scenes(tiny_pair):
    model, processor = tiny_pair
    cell = token_cell_size(model)
    return (
        render_patch_labelled_scenes(48, processor.image_processor, cell, seed=0, stream="train"),
        render_patch_labelled_scenes(12, processor.image_processor, cell, seed=0, stream="eval"),
    )


@pytest.fixture(scope="module")
def fitted(tiny_pair, cell_scenes):
    """A copy of the tiny model with its projector started from probes, the original, and the fit's result."""
    model = copy.deepcopy(tiny_pair[0])
    result = fit_projector_from_probes(model, *cell_scenes, steps=60, batch_size=16, logging_steps=20)
    return model, tiny_pair[0], result


def test_cell_labels_line_up_with_the_image_tokens(tiny_pair, cell_scenes):
    model, processor = tiny_pair
    features = token_features(model, cell_scenes[1].pixel_values[:2])
    assert features.shape[1] == processor.image_seq_length == cell_scenes[1].patch_objects.shape[1]


@pytest.mark.parametrize("layer", [-1, -2])
def test_token_features_are_what_the_projector_reads(tiny_model, cell_scenes, layer):
    tiny_model.config.vision_feature_layer = layer
    pixel_values = cell_scenes[1].pixel_values[:2]
    with torch.no_grad():
        expected = tiny_model.model.get_image_features(pixel_values=pixel_values).pooler_output
        projected = tiny_model.model.multi_modal_projector(token_features(tiny_model, pixel_values))
    torch.testing.assert_close(projected, expected)


def test_image_tokens_become_a_fixed_vocabulary_of_the_probes_classes(fitted, cell_scenes):
    model, original, _ = fitted
    pixel_values = cell_scenes[1].pixel_values
    with torch.no_grad():
        before = original.model.get_image_features(pixel_values=pixel_values).pooler_output.flatten(0, 1)
        after = model.model.get_image_features(pixel_values=pixel_values).pooler_output.flatten(0, 1)
    num_classes = sum(probe_class_counts().values())
    # Every token is a weighting of one embedding per class, so the tokens span at most that many directions; the
    # projector they started from spreads them over all of its channels.
    assert torch.linalg.matrix_rank(after, rtol=1e-4) <= num_classes
    assert torch.linalg.matrix_rank(before, rtol=1e-4) > num_classes


def test_a_saved_checkpoint_reloads_with_the_same_image_tokens(fitted, cell_scenes, tmp_path):
    model = fitted[0]
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.config.projector_hidden_act == "sigmoid"
    pixel_values = cell_scenes[1].pixel_values[:3]
    with torch.no_grad():
        expected = model.model.get_image_features(pixel_values=pixel_values).pooler_output
        tokens = reloaded.model.get_image_features(pixel_values=pixel_values).pooler_output
    torch.testing.assert_close(tokens, expected)


def test_the_probes_learn_and_the_tower_is_unchanged(fitted):
    model, original, result = fitted
    assert [entry["step"] for entry in result.log] == [20, 40, 60]
    assert result.log[-1]["loss"] < result.log[0]["loss"]
    assert result.background > 0.8 and 0 <= result.shape <= 1 and 0 <= result.depth_bin <= 1
    tower, untouched = model.model.vision_tower.state_dict(), original.model.vision_tower.state_dict()
    assert all(torch.equal(tower[name], untouched[name]) for name in tower)


def test_the_letter_probe_is_scored_on_the_cells_of_marked_points(fitted, tiny_pair):
    assert fitted[2].marker_letter is None
    model, processor = copy.deepcopy(tiny_pair[0]), tiny_pair[1]
    cell = token_cell_size(model)
    marked = [
        render_patch_labelled_scenes(count, processor.image_processor, cell, seed=0, stream=stream, marked_share=1.0)
        for count, stream in ((32, "train"), (8, "eval"))
    ]
    result = fit_projector_from_probes(model, *marked, steps=20, batch_size=16, logging_steps=20)
    assert 0.0 <= result.marker_letter <= 1.0


def test_the_tally_probes_join_the_projectors_vocabulary(fitted, tiny_pair, cell_scenes):
    assert fitted[2].attribute_tally is None and fitted[2].object_tally is None
    model = copy.deepcopy(tiny_pair[0])
    tallies = tuple(TALLY_GROUPS)
    result = fit_projector_from_probes(model, *cell_scenes, steps=20, batch_size=16, logging_steps=20, tallies=tallies)
    assert 0.0 <= result.attribute_tally <= 1.0 and 0.0 <= result.object_tally <= 1.0
    num_classes = sum(probe_class_counts(tallies=tallies).values())
    assert num_classes == sum(probe_class_counts().values()) + len(TALLY_GROUPS) * NUM_TALLY_CLASSES
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values=cell_scenes[1].pixel_values).pooler_output.flatten(0, 1)
    assert sum(probe_class_counts().values()) < torch.linalg.matrix_rank(tokens, rtol=1e-4) <= num_classes
    with pytest.raises(ValueError, match="tallies"):
        fit_projector_from_probes(model, *cell_scenes, steps=1, tallies=1)
    assert list(probe_class_counts(tallies=("object_tally", "shape_tally")))[-2:] == ["shape_tally", "object_tally"]


def column_readout_accuracy(tokens: torch.Tensor, side: int) -> float:
    """How often a least-squares linear readout, fitted on the first half of the images' tokens, names the column of
    a token of the second half."""
    images, cells, _ = tokens.shape
    columns = torch.nn.functional.one_hot(torch.arange(cells) % side, side).float().expand(images, -1, -1)
    inputs = torch.cat([tokens, torch.ones(images, cells, 1)], -1)
    half = images // 2
    weights = torch.linalg.lstsq(inputs[:half].flatten(0, 1), columns[:half].flatten(0, 1)).solution
    predicted = (inputs[half:].flatten(0, 1) @ weights).argmax(-1)
    return float((predicted == columns[half:].flatten(0, 1).argmax(-1)).float().mean())


@pytest.fixture(scope="module")
def tower_that_knows_positions(tiny_pair):
    """The tiny model with random position embeddings in its vision tower (it starts them at zero), so the tower's
    features say where each patch is, as a pretrained tower's do."""
    model = copy.deepcopy(tiny_pair[0])
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embeddings.normal_(
            std=0.5, generator=torch.Generator().manual_seed(0)
        )
    return model


def test_the_position_probes_make_each_image_token_say_its_column(fitted, tower_that_knows_positions, cell_scenes):
    assert fitted[2].row is None and fitted[2].column is None
    with_positions, without = copy.deepcopy(tower_that_knows_positions), copy.deepcopy(tower_that_knows_positions)
    result = fit_projector_from_probes(
        with_positions, *cell_scenes, steps=60, batch_size=16, logging_steps=20, positions=True
    )
    fit_projector_from_probes(without, *cell_scenes, steps=60, batch_size=16, logging_steps=20)
    side = label_grid_side(cell_scenes[1])
    assert result.row > 0.9 and result.column > 0.9
    counts = probe_class_counts(grid_side=side)
    assert (counts["row"], counts["column"]) == (side, side) and list(counts)[-2:] == ["row", "column"]
    pixel_values = cell_scenes[1].pixel_values
    with torch.no_grad():
        tokens = {
            name: model.model.get_image_features(pixel_values=pixel_values).pooler_output
            for name, model in (("with", with_positions), ("without", without))
        }
    assert column_readout_accuracy(tokens["with"], side) > column_readout_accuracy(tokens["without"], side) + 0.2
    with pytest.raises(ValueError, match="positions"):
        fit_projector_from_probes(with_positions, *cell_scenes, steps=1, positions="yes")


def test_background_and_object_cells_get_different_tokens(fitted, cell_scenes):
    model, _, _ = fitted
    scenes = cell_scenes[1]
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values=scenes.pixel_values).pooler_output
    background = scenes.patch_objects == BACKGROUND
    gap = (tokens[background].mean(0) - tokens[~background].mean(0)).norm()
    assert gap > 0.5 * tokens[background].std(0).norm()


def test_the_projector_can_still_learn_what_the_probes_miss(fitted, cell_scenes):
    model = copy.deepcopy(fitted[0])
    projector = model.model.multi_modal_projector
    num_classes = sum(probe_class_counts().values())
    tokens = model.model.get_image_features(pixel_values=cell_scenes[1].pixel_values[:2]).pooler_output
    tokens.square().sum().backward()
    assert projector.linear_2.weight.grad[:, num_classes:].abs().sum() > 0


def test_scenes_labelled_per_patch_instead_of_per_token_cell_are_refused(tiny_model, tiny_pair):
    patch = vision_patch_size(tiny_model)
    scenes = render_patch_labelled_scenes(4, tiny_pair[1].image_processor, patch, seed=0, stream="eval")
    with pytest.raises(ValueError, match=f"patch_size={token_cell_size(tiny_model)}"):
        fit_projector_from_probes(tiny_model, scenes, scenes, steps=1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"steps": 0}, "steps"), ({"batch_size": 1.5}, "batch_size"), ({"learning_rate": -1.0}, "learning_rate")],
)
def test_fit_settings_are_validated(tiny_model, cell_scenes, arguments, message):
    with pytest.raises(ValueError, match=message):
        fit_projector_from_probes(tiny_model, *cell_scenes, **{"steps": 1, **arguments})


def test_a_projector_too_narrow_for_the_probe_classes_is_refused(tiny_model, cell_scenes):
    projector = tiny_model.model.multi_modal_projector
    projector.linear_1 = torch.nn.Linear(projector.linear_1.in_features, 8)
    with pytest.raises(ValueError, match="fewer than the"):
        fit_projector_from_probes(tiny_model, *cell_scenes, steps=1)
