"""Tasks on synthetic scenes and the dataset builder: one right answer per question, disjoint reproducible splits."""

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perceptio.data.scene_rendering import COLOUR_PALETTE, SHAPES, SIZE_NAMES, render_scene
from perceptio.data.synthetic_dataset import (
    SPLIT_NAMES,
    build_synthetic_dataset,
    sample_spatial_targets,
)
from perceptio.data.synthetic_tasks import (
    DEFAULT_TASK_CONFIG,
    DEPTH_REQUEST,
    TASK_NAMES,
    TaskConfig,
    generate_task_sample,
    make_relative_depth_sample,
    referred_object_facts,
    referring_expressions,
)


CONFIG = DEFAULT_TASK_CONFIG


def parse_phrase(phrase):
    """Attributes named by a noun phrase such as "small red spheres" or "green object"."""
    words = phrase.split()
    noun = words[-1]
    noun = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES + ("object",) else noun
    attributes = {"shape": None if noun == "object" else noun, "size": None, "colour": None}
    for word in words[:-1]:
        key = "size" if word in SIZE_NAMES else "colour" if word in COLOUR_PALETTE else None
        assert key is not None, f"unexpected word {word!r} in {phrase!r}"
        attributes[key] = word
    assert attributes["shape"] in SHAPES + (None,)
    return attributes


def matching(objects, phrase):
    wanted = parse_phrase(phrase)
    return [obj for obj in objects if all(value in (None, getattr(obj, key)) for key, value in wanted.items())]


def single(objects, phrase):
    found = matching(objects, phrase)
    assert len(found) == 1, f"{phrase!r} matches {len(found)} objects"
    return found[0]


def resolve(text, scene):
    """Object ids an expression picks out, read from its words alone; asserts the expression is unambiguous."""
    objects, width = scene.objects, scene.image_size[1]
    assert text.startswith(("the ", "all the "))
    if text.startswith("all the "):
        members = matching(objects, text[len("all the ") :])
        assert len(members) >= 2
        return tuple(obj.object_id for obj in sorted(members, key=lambda obj: obj.centroid[0]))
    if " and the " in text:
        first, second = text[len("the ") :].split(" and the ")
        return single(objects, first).object_id, single(objects, second).object_id
    body = text[len("the ") :]
    for suffix, nearest in ((" nearest the camera", True), (" farthest from the camera", False)):
        if body.endswith(suffix):
            members = sorted(
                matching(objects, body[: -len(suffix)]), key=lambda obj: obj.distance, reverse=not nearest
            )
            low, high = sorted((members[0].distance, members[1].distance))
            assert high >= low * (1 + CONFIG.distance_margin)
            return (members[0].object_id,)
    for relation, sign in ((" left of the ", -1), (" right of the ", 1)):
        if relation in body:
            target, reference_phrase = body.split(relation)
            reference = single(objects, reference_phrase)
            candidates = [obj for obj in matching(objects, target) if obj is not reference]
            offsets = [sign * (obj.centroid[0] - reference.centroid[0]) for obj in candidates]
            assert all(abs(offset) >= CONFIG.left_right_margin * width for offset in offsets)
            chosen = [obj for obj, offset in zip(candidates, offsets) if offset > 0]
            assert len(chosen) == 1
            return (chosen[0].object_id,)
    return (single(objects, body).object_id,)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**40))
def test_every_referring_expression_picks_out_exactly_its_objects(seed):
    scene = render_scene(seed, image_size=48)
    expressions = referring_expressions(scene)
    assert expressions
    for expression in expressions:
        assert resolve(expression.text, scene) == expression.object_ids, expression


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**40))
def test_each_referred_object_comes_with_what_its_own_phrase_names(seed):
    scene = render_scene(seed, image_size=48)
    objects = {obj.object_id: obj for obj in scene.objects}
    for expression in referring_expressions(scene):
        assert len(expression.named) == len(expression.object_ids), expression
        for object_id, query in zip(expression.object_ids, expression.named):
            assert query.matches(objects[object_id]), expression
            phrase = query.phrase(plural=expression.kind == "plural")
            assert f"the {phrase}" in expression.text, expression


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**40))
def test_referring_sample_carries_one_mask_per_referred_object(seed):
    scene = render_scene(seed, image_size=48)
    sample = generate_task_sample(scene, "referring", np.random.default_rng(seed))
    ids = resolve(sample.meta["expression"], scene)
    assert sample.meta["expression"] in sample.prompt
    np.testing.assert_array_equal(sample.masks, scene.instance_masks[list(ids)])
    assert sample.answer == ("Here it is." if len(ids) == 1 else "Here they are.")
    assert "[SEG]" not in sample.answer


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**40))
def test_referring_sample_records_each_referred_objects_own_attributes_and_ranks(seed):
    scene = render_scene(seed, image_size=48)
    sample = generate_task_sample(scene, "referring", np.random.default_rng(seed))
    visible = [obj for obj in scene.objects if obj.visible_pixels > 0]
    assert len(sample.meta["referred"]) == len(sample.meta["object_ids"])
    for object_id, facts in zip(sample.meta["object_ids"], sample.meta["referred"]):
        obj = scene.objects[object_id]
        assert (facts["colour"], facts["shape"], facts["size"]) == (obj.colour, obj.shape, obj.size)
        assert facts["nearness_rank"] == sum(other.distance < obj.distance for other in visible)
        assert facts["column_rank"] == sum(other.centroid[0] < obj.centroid[0] for other in visible)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**40))
def test_a_superlatives_referred_object_has_the_extreme_nearness_rank_among_its_candidates(seed):
    scene = render_scene(seed, image_size=48)
    visible = [obj for obj in scene.objects if obj.visible_pixels > 0]
    for expression in referring_expressions(scene):
        if expression.kind != "superlative":
            continue
        candidates = [obj.object_id for obj in visible if expression.named[0].matches(obj)]
        ranks = [facts["nearness_rank"] for facts in referred_object_facts(visible, tuple(candidates))]
        (referred,) = referred_object_facts(visible, expression.object_ids)
        extreme = min(ranks) if "nearest" in expression.text else max(ranks)
        assert referred["nearness_rank"] == extreme, expression


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**40), num_points=st.integers(min_value=2, max_value=5))
def test_every_relative_depth_question_has_exactly_one_right_answer(seed, num_points):
    scene = render_scene(seed, image_size=96)
    sample = make_relative_depth_sample(scene, np.random.default_rng(seed), num_points=num_points)
    if sample is None:
        return
    meta = sample.meta
    points = np.array(meta["points"])
    depths = scene.depth[points[:, 1], points[:, 0]]
    ordered = np.sort(depths)
    assert ordered[1] >= ordered[0] * (1 + CONFIG.depth_margin)
    assert sample.answer == f"({meta['letters'][int(np.argmin(depths))]})"
    assert meta["letters"] == list("ABCDE"[:num_points])
    for letter in meta["letters"]:
        assert f"({letter})" in sample.prompt
    # Markers do not overlap, so no point sits under another point's circle.
    radius = meta["marker_radius"]
    gaps = np.abs(points[:, None, :] - points[None, :, :]).max(axis=2) + np.eye(len(points), dtype=int) * 10**6
    assert gaps.min() > 2 * radius
    changed = np.any(sample.image != scene.image, axis=2)
    assert changed[points[:, 1], points[:, 0]].all()
    assert sample.use_depth_block and sample.masks.shape[0] == 0


def test_relative_depth_questions_are_usually_possible_and_answers_vary():
    answers = []
    for seed in range(30):
        sample = make_relative_depth_sample(render_scene(seed, image_size=96), np.random.default_rng(seed))
        if sample is not None:
            answers.append(sample.answer)
    assert len(answers) >= 25
    assert len(set(answers)) >= 3


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**40))
def test_vqa_answers_follow_from_the_scene(seed):
    scene = render_scene(seed, image_size=48)
    rng = np.random.default_rng(seed)
    count = generate_task_sample(scene, "vqa_count", rng)
    question = count.prompt.removesuffix(f" {DEPTH_REQUEST}")
    phrase = question[len("How many ") : -len(" are there?")]
    assert count.answer == str(len(matching(scene.objects, phrase)))
    colour = generate_task_sample(scene, "vqa_colour", rng)
    if colour is not None:
        phrase = colour.prompt.removesuffix(f" {DEPTH_REQUEST}")[len("What colour is the ") : -1]
        assert parse_phrase(phrase)["colour"] is None
        assert colour.answer == single(scene.objects, phrase).colour.capitalize()
    shape = generate_task_sample(scene, "vqa_shape", rng)
    if shape is not None:
        phrase = shape.prompt.removesuffix(f" {DEPTH_REQUEST}")[len("What shape is the ") : -1]
        assert parse_phrase(phrase)["shape"] is None
        assert shape.answer == single(scene.objects, phrase).shape.capitalize()


def one_object_count_answers(config, num_scenes=40):
    return [
        generate_task_sample(
            render_scene(seed, 48, num_objects=1), "vqa_count", np.random.default_rng(seed), config
        ).answer
        for seed in range(num_scenes)
    ]


def test_count_random_query_share_sets_how_often_a_count_names_an_absent_attribute():
    # In a one-object scene a question built from the object's own attributes always counts 1.
    assert "0" not in one_object_count_answers(replace(CONFIG, count_random_query_share=0.0))
    default_zeros = one_object_count_answers(CONFIG).count("0")
    assert one_object_count_answers(replace(CONFIG, count_random_query_share=1.0)).count("0") > default_zeros + 5


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_count_random_query_share_must_be_a_probability(share):
    with pytest.raises(ValueError, match="count_random_query_share"):
        TaskConfig(count_random_query_share=share)


def test_unknown_task_raises_value_error():
    with pytest.raises(ValueError):
        generate_task_sample(render_scene(0, 32), "caption", np.random.default_rng(0))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return build_synthetic_dataset(10, 4, 4, image_size=(48, 56), seed=3, cache_dir=str(tmp_path_factory.mktemp("a")))


def test_dataset_schema_and_targets(small_dataset):
    assert list(small_dataset) == list(SPLIT_NAMES)
    assert [len(small_dataset[split]) for split in SPLIT_NAMES] == [10, 4, 4]
    for row in small_dataset["train"]:
        assert row["image"].mode == "RGB" and row["image"].size == (56, 48)
        assert row["task"] in TASK_NAMES and "<image>" not in row["prompt"] and "[SEG]" not in row["answer"]
        targets = sample_spatial_targets(row)
        assert targets.masks.dtype == bool and targets.masks.shape[1:] == (48, 56)
        scene = render_scene(row["scene_seed"], image_size=(48, 56))
        np.testing.assert_allclose(targets.inverse_depth, 1.0 / scene.depth, rtol=1e-6)
        meta = json.loads(row["meta"])
        if row["task"] == "referring":
            np.testing.assert_array_equal(targets.masks, scene.instance_masks[meta["object_ids"]])
        else:
            assert targets.masks.shape[0] == 0
        if row["task"] == "relative_depth":
            assert row["use_depth_block"] and row["answer"] == f"({meta['answer_letter']})"


def test_splits_are_disjoint_and_reproducible(small_dataset, tmp_path):
    seeds = [set(small_dataset[split]["scene_seed"]) for split in SPLIT_NAMES]
    assert not (seeds[0] & seeds[1] or seeds[0] & seeds[2] or seeds[1] & seeds[2])
    images = [{row["image"].tobytes() for row in small_dataset[split]} for split in SPLIT_NAMES]
    assert not (images[0] & images[1] or images[0] & images[2] or images[1] & images[2])
    again = build_synthetic_dataset(10, 4, 4, image_size=(48, 56), seed=3, cache_dir=str(tmp_path))
    for split in SPLIT_NAMES:
        for first, second in zip(small_dataset[split], again[split]):
            assert first["image"].tobytes() == second["image"].tobytes()
            assert (first["prompt"], first["answer"], first["meta"]) == (
                second["prompt"],
                second["answer"],
                second["meta"],
            )
    other = build_synthetic_dataset(4, 0, 0, image_size=(48, 56), seed=4, cache_dir=str(tmp_path))
    assert not set(other["train"]["scene_seed"]) & seeds[0]
    assert len(other["validation"]) == 0


@pytest.mark.parametrize("num_objects", [1, 2])
def test_num_objects_fixes_the_objects_of_every_scene(num_objects, tmp_path):
    tasks = ("vqa_colour", "vqa_shape", "vqa_count")
    dataset = build_synthetic_dataset(
        6, 0, 0, image_size=64, seed=5, tasks=tasks, cache_dir=str(tmp_path), num_objects=num_objects
    )
    for row in dataset["train"]:
        scene = render_scene(row["scene_seed"], 64, num_objects=num_objects)
        assert len(scene.objects) == num_objects
        assert np.array_equal(np.asarray(row["image"]), scene.image)
    free = build_synthetic_dataset(6, 0, 0, image_size=64, seed=5, tasks=tasks, cache_dir=str(tmp_path))
    assert [row["image"].tobytes() for row in free["train"]] != [row["image"].tobytes() for row in dataset["train"]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_train": -1},
        {"tasks": ["caption"]},
        {"tasks": {"referring": -1.0}},
        {"tasks": []},
        {"seed": -2},
        {"image_size": 3},
        {"num_proc": 0},
        {"num_objects": 0},
        {"num_objects": 7},
        {"num_objects": True},
        {"num_objects": 1.0},
    ],
)
def test_invalid_builder_arguments_raise_value_error(kwargs, tmp_path):
    arguments = {
        "num_train": 1,
        "num_validation": 0,
        "num_test": 0,
        "image_size": 32,
        "seed": 0,
        "cache_dir": str(tmp_path),
    }
    with pytest.raises(ValueError):
        build_synthetic_dataset(**{**arguments, **kwargs})


def test_samples_with_a_depth_block_ask_for_it_unless_they_are_depth_questions():
    from perceptio.data.synthetic_dataset import generate_sample

    samples = [generate_sample(seed=3, split="train", index=index, image_size=64) for index in range(40)]
    for sample in samples:
        asks = sample["prompt"].endswith(DEPTH_REQUEST)
        if sample["task"] == "relative_depth":
            assert sample["use_depth_block"] and not asks
        else:
            assert asks == sample["use_depth_block"]
    assert any(sample["use_depth_block"] and sample["task"] != "relative_depth" for sample in samples)


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ({"captioning": 1.0}, r"tasks must weigh the tasks .*\['captioning'\] are not among them"),
        ({"referring": -1.0}, "tasks must be non-negative numbers"),
        ({"referring": 0.0}, "tasks must give some task a positive weight"),
        ("referring", "non-empty list of task names"),
    ],
)
def test_dataset_task_weights_are_checked_as_every_task_weight_is(tmp_path, tasks, message):
    with pytest.raises(ValueError, match=message):
        build_synthetic_dataset(1, 0, 0, image_size=32, seed=0, tasks=tasks, cache_dir=str(tmp_path))
