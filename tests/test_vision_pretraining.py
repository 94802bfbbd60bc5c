"""Dense patch-label pretraining of the vision tower (the synthetic recipe's stand-in for a pretrained InternViT)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from perceptio.trainers.projector_from_probes import vision_patch_size
from perceptio.trainers.vision_pretraining import (
    BACKGROUND,
    NUM_DEPTH_BINS,
    NUM_MARKER_CLASSES,
    NUM_TALLY_CLASSES,
    PATCH_ATTRIBUTES,
    POSITION_PROBES,
    TALLY_GROUPS,
    PatchLabelledScenes,
    VisionProbeHeads,
    balanced_marker_loss,
    cell_position_targets,
    depth_bin_edges,
    label_grid_side,
    patch_majority,
    patch_tallies,
    patch_targets,
    pooled_object_features,
    pretrain_vision_tower,
    probe_accuracy,
    render_patch_labelled_scenes,
)


@pytest.fixture(scope="module")
def scenes(tiny_pair):
    model, processor = tiny_pair
    patch = vision_patch_size(model)
    image_processor = processor.image_processor
    return (
        render_patch_labelled_scenes(48, image_processor, patch, seed=0, stream="train"),
        render_patch_labelled_scenes(12, image_processor, patch, seed=0, stream="eval"),
    )


@pytest.fixture(scope="module")
def marked_scenes(tiny_pair):
    """The held-out scenes of `scenes` again, every one with points marked where they fit."""
    model, processor = tiny_pair
    patch = vision_patch_size(model)
    return render_patch_labelled_scenes(12, processor.image_processor, patch, seed=0, stream="eval", marked_share=1.0)


@settings(max_examples=40, deadline=None)
@given(arrays(np.int64, (8, 12), elements=st.integers(BACKGROUND, 3)), st.sampled_from([1, 2, 4]))
def test_patch_majority_is_the_most_frequent_id_of_each_patch(ids, patch):
    majority = patch_majority(ids, patch)
    assert majority.shape == ((8 // patch) * (12 // patch),)
    for index, value in enumerate(majority):
        row, column = divmod(index, 12 // patch)
        block = ids[row * patch : (row + 1) * patch, column * patch : (column + 1) * patch].ravel()
        counts = np.bincount(block - BACKGROUND)
        assert counts[value - BACKGROUND] == counts.max()


def test_scenes_are_tiles_with_labels_of_their_own_objects(scenes, tiny_pair):
    train, evaluation = scenes
    tile = tiny_pair[1].image_processor.tile_size
    assert train.pixel_values.shape[1:] == (3, tile, tile)
    assert train.patch_objects.shape == train.patch_depth.shape
    for objects, attributes in zip(train.patch_objects, train.object_attributes):
        assert objects.min() >= BACKGROUND and objects.max() < len(attributes)
    assert (train.patch_objects != BACKGROUND).any() and (train.patch_depth > 0).all()
    assert not torch.equal(train.pixel_values[: len(evaluation)], evaluation.pixel_values)


def test_marked_scenes_are_the_same_scenes_with_the_patch_under_each_marked_point_labelled(scenes, marked_scenes):
    plain, marked = scenes[1], marked_scenes
    assert (plain.patch_markers == BACKGROUND).all()
    assert torch.equal(marked.patch_objects, plain.patch_objects)
    assert torch.equal(marked.patch_depth, plain.patch_depth)
    labelled = marked.patch_markers != BACKGROUND
    assert labelled.any(1).float().mean() >= 0.5
    grid = int(plain.patch_objects.shape[1] ** 0.5)
    patch = plain.pixel_values.shape[-1] // grid
    changed = (marked.pixel_values != plain.pixel_values).any(1)
    changed_patches = changed.unflatten(1, (grid, patch)).unflatten(3, (grid, patch)).any(2).any(-1).flatten(1)
    # A marker is drawn where each labelled patch is, and a scene without a label was left as it was.
    assert changed_patches[labelled].all()
    assert not changed[~labelled.any(1)].any()
    for letters in marked.patch_markers:
        present = sorted(set(letters[letters != BACKGROUND].tolist()))
        assert present == list(range(len(present))) or len(present) < 2


def test_marker_loss_weighs_marked_and_unmarked_patches_as_two_equal_halves():
    none = NUM_MARKER_CLASSES - 1
    logits = torch.randn(1, 5, NUM_MARKER_CLASSES)
    targets = {"marker": torch.tensor([[2, none, none, none, 0]])}
    per_patch = torch.nn.functional.cross_entropy(logits[0], targets["marker"][0], reduction="none")
    expected = per_patch[[0, 4]].mean() + per_patch[1:4].mean()
    torch.testing.assert_close(balanced_marker_loss(logits, targets), expected)
    assert balanced_marker_loss(logits, {"marker": torch.full((1, 5), none)}) is None


def test_the_marker_probe_learns_the_letters_of_marked_scenes(marked_scenes, tiny_model, scenes):
    result = pretrain_vision_tower(tiny_model, marked_scenes, marked_scenes, steps=40, batch_size=12, logging_steps=40)
    assert result.final.marker_letter > result.initial.marker_letter + 0.2
    assert pretrain_vision_tower(tiny_model, *scenes, steps=1).final.marker_letter is None


def test_worker_processes_render_the_same_labelled_scenes(scenes, tiny_pair):
    evaluation = scenes[1]
    patch = tiny_pair[1].image_processor.tile_size // int(evaluation.patch_objects.shape[1] ** 0.5)
    again = render_patch_labelled_scenes(12, tiny_pair[1].image_processor, patch, seed=0, stream="eval", processes=2)
    assert torch.equal(again.pixel_values, evaluation.pixel_values)
    assert torch.equal(again.patch_objects, evaluation.patch_objects)
    assert torch.equal(again.object_attributes, evaluation.object_attributes)


def test_targets_mark_background_with_the_extra_class_and_fill_every_depth_bin(scenes):
    train, _ = scenes
    edges = depth_bin_edges(train)
    targets = patch_targets(train, torch.arange(len(train)), edges)
    background = train.patch_objects == BACKGROUND
    for name, num_classes in PATCH_ATTRIBUTES.items():
        assert (targets[name][background] == num_classes).all() and (targets[name][~background] < num_classes).all()
    counts = torch.bincount(targets["depth_bin"].flatten(), minlength=NUM_DEPTH_BINS)
    assert len(counts) == NUM_DEPTH_BINS and (counts > 0).all()


def test_tallies_count_the_visible_objects_that_share_each_patch_objects_attributes():
    # Objects (colour, shape, size): 0 red small cube, 1 red large cube, 2 blue small cube, 3 red small cube hidden
    # from view (no pixel shows it, so the count questions do not count it), then a padding row.
    attributes = torch.tensor([[[0, 1, 0], [0, 1, 1], [2, 1, 0], [0, 1, 0], [0, 0, 0]]])
    visible = torch.tensor([[True, True, True, False, False]])
    objects = torch.tensor([[0, 1, 2, BACKGROUND, 0]])
    scenes = PatchLabelledScenes(
        torch.zeros(1, 3, 4, 4), objects, attributes, visible, torch.ones(1, 5), torch.full((1, 5), BACKGROUND)
    )
    tallies = patch_tallies(scenes, torch.tensor([0]), tuple(TALLY_GROUPS))
    assert set(tallies) == set(TALLY_GROUPS)
    assert tallies["colour_tally"].tolist() == [[2, 2, 1, 0, 2]]
    assert tallies["shape_tally"].tolist() == [[3, 3, 3, 0, 3]]
    assert tallies["size_shape_tally"].tolist() == [[2, 1, 2, 0, 2]]
    assert tallies["colour_shape_tally"].tolist() == [[2, 2, 1, 0, 2]]
    assert tallies["object_tally"].tolist() == [[3] * 5], "every patch, the background's too, counts the scene"


def test_rendered_scenes_tally_their_visible_objects(scenes):
    train, _ = scenes
    targets = patch_targets(train, torch.arange(len(train)), depth_bin_edges(train), tuple(TALLY_GROUPS))
    assert torch.equal(targets["object_tally"][:, 0], train.object_visible.sum(1))
    foreground = train.patch_objects != BACKGROUND
    for name in TALLY_GROUPS:
        assert (targets[name] < NUM_TALLY_CLASSES).all()
        if name != "object_tally":
            assert (targets[name][foreground] >= 1).all() and (targets[name][~foreground] == 0).all()
    assert (targets["object_tally"] >= targets["shape_tally"]).all()


def test_the_tally_probes_learn_and_are_scored_only_when_asked_for(scenes, tiny_model):
    train, evaluation = scenes
    without = pretrain_vision_tower(tiny_model, train, evaluation, steps=1)
    assert without.final.attribute_tally is None and without.final.object_tally is None
    result = pretrain_vision_tower(
        tiny_model, train, train, steps=60, batch_size=16, logging_steps=60, tallies=tuple(TALLY_GROUPS)
    )
    assert result.final.attribute_tally > result.initial.attribute_tally + 0.1
    assert 0.0 <= result.final.object_tally <= 1.0
    only_objects = pretrain_vision_tower(tiny_model, train, evaluation, steps=1, tallies=("object_tally",))
    assert only_objects.final.attribute_tally is None and 0.0 <= only_objects.final.object_tally <= 1.0
    for tallies in ("object_tally", ("objects",), True):
        with pytest.raises(ValueError, match="tallies"):
            pretrain_vision_tower(tiny_model, train, evaluation, steps=1, tallies=tallies)


def test_cell_position_targets_are_the_row_major_row_and_column():
    targets = cell_position_targets(2, 3)
    assert set(targets) == set(POSITION_PROBES)
    assert targets["row"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 2
    assert targets["column"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2]] * 2


def test_the_position_probes_teach_the_tower_where_each_patch_is(scenes, tiny_pair):
    train, evaluation = scenes
    # The tiny tower starts its position embeddings at zero, as InternVL does: its patches start not knowing where
    # they are.
    without = pretrain_vision_tower(copy.deepcopy(tiny_pair[0]), train, evaluation, steps=1)
    assert without.final.row is None and without.final.column is None
    model = copy.deepcopy(tiny_pair[0])
    result = pretrain_vision_tower(
        model, train, evaluation, steps=80, batch_size=16, logging_steps=80, learning_rate=5e-3, positions=True
    )
    side = label_grid_side(train)
    assert result.initial.column < 2 / side, "near chance before"
    assert result.final.column > 0.6 and result.final.row > 0.8, f"from chance (1 in {side}) in 80 steps"
    assert model.model.vision_tower.embeddings.position_embeddings.abs().sum() > 0
    with pytest.raises(ValueError, match="positions"):
        pretrain_vision_tower(model, train, evaluation, steps=1, positions="yes")


def test_pooled_features_average_each_object_patches():
    features = torch.arange(12, dtype=torch.float32).view(1, 4, 3)
    objects = torch.tensor([[0, 0, BACKGROUND, 1]])
    attributes = torch.tensor([[[0, 2, 1], [1, 0, 0]]])
    pooled, shapes = pooled_object_features(features, objects, attributes)
    # Object 1 covers one patch, too few to show an outline; object 0 is the mean of patches 0 and 1.
    assert torch.equal(pooled, features[0, :2].mean(0, keepdim=True)) and shapes.tolist() == [2]


def test_pretraining_trains_the_vision_tower_only_and_its_probes_learn(scenes, tiny_model):
    train, evaluation = scenes
    others = {name: value.clone() for name, value in tiny_model.named_parameters() if "vision_tower" not in name}
    result = pretrain_vision_tower(tiny_model, train, evaluation, steps=30, batch_size=16, logging_steps=10)
    assert [entry["step"] for entry in result.log] == [10, 20, 30]
    assert result.final.colour > result.initial.colour + 0.2
    assert all(torch.equal(value, others[name]) for name, value in tiny_model.named_parameters() if name in others)


def test_pretraining_scores_its_probes_on_as_many_training_scenes_as_are_held_out(scenes, tiny_pair):
    train, evaluation = scenes

    def pretrain(held_out):
        return pretrain_vision_tower(copy.deepcopy(tiny_pair[0]), train, held_out, steps=5, batch_size=8)

    # Held out on the first 12 training scenes, the two scores are of the same scenes.
    on_training = pretrain(train.first(12))
    assert on_training.training == on_training.final
    # Held out on other scenes, training goes the same way and the training score is still of the first 12.
    held_out = pretrain(evaluation)
    assert held_out.training == on_training.final and held_out.final != held_out.training
    assert len(train.first(12)) == 12 and len(train.first(1000)) == len(train)


def test_probe_accuracy_of_constant_heads_is_the_share_of_one_class(scenes, tiny_pair):
    train, evaluation = scenes
    heads = VisionProbeHeads(tiny_pair[0].config.vision_config.hidden_size, depth_bin_edges(train))
    with torch.no_grad():
        for head in (*heads.attributes.values(), heads.depth):
            head.weight.zero_()
            head.bias.zero_()
            head.bias[0] = 1.0
    accuracy = probe_accuracy(tiny_pair[0], heads, evaluation)
    foreground = evaluation.patch_objects != BACKGROUND
    colour = patch_targets(evaluation, torch.arange(len(evaluation)), heads.depth_bin_edges)["colour"]
    assert accuracy.colour == pytest.approx(((colour == 0) & foreground).sum().item() / foreground.sum().item())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"steps": 0}, "steps"), ({"batch_size": -1}, "batch_size"), ({"learning_rate": 0.0}, "learning_rate")],
)
def test_pretraining_settings_are_validated(scenes, tiny_model, arguments, message):
    train, evaluation = scenes
    with pytest.raises(ValueError, match=message):
        pretrain_vision_tower(tiny_model, train, evaluation, **{"steps": 1, **arguments})


def test_scene_rendering_settings_are_validated(tiny_pair):
    image_processor = tiny_pair[1].image_processor
    with pytest.raises(ValueError, match="num_scenes"):
        render_patch_labelled_scenes(0, image_processor, 4, seed=0)
    with pytest.raises(ValueError, match="stream"):
        render_patch_labelled_scenes(1, image_processor, 4, seed=0, stream="test")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        render_patch_labelled_scenes(1, image_processor, 5, seed=0)
    for share in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="marked_share"):
            render_patch_labelled_scenes(1, image_processor, 4, seed=0, marked_share=share)
