"""The scene renderer: exact analytic depth, masks consistent with depth, determinism, camera geometry."""

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perceptio.data.scene_rendering import (
    DEFAULT_SAMPLING_CONFIG,
    Camera,
    ObjectSpec,
    SceneSpec,
    metric_depth_to_inverse_depth,
    render,
    render_scene,
    render_scenes,
)


LEVEL_CAMERA = Camera(position=(0.0, 0.0, 1.5), tilt=0.0, vertical_fov=math.radians(50.0))


@pytest.mark.parametrize("distance,radius", [(3.0, 0.5), (5.5, 1.2), (8.25, 0.3)])
def test_sphere_straight_ahead_has_analytic_centre_depth(distance, radius):
    sphere = ObjectSpec(shape="sphere", colour="red", centre=(0.0, distance, 1.5), radius=radius)
    scene = render(SceneSpec(objects=(sphere,), wall_distance=20.0), LEVEL_CAMERA, image_size=33)
    assert scene.depth[16, 16] == pytest.approx(distance - radius, rel=1e-6)
    assert scene.instance_masks[0, 16, 16]
    assert scene.objects[0].distance == pytest.approx(distance)


def test_empty_scene_depth_matches_ground_and_wall_planes():
    height, wall = 1.5, 9.0
    scene = render(SceneSpec(objects=(), wall_distance=wall), LEVEL_CAMERA, image_size=(31, 40))
    focal = scene.intrinsics[1, 1]
    rows = np.arange(31) + 0.5 - 31 / 2
    # A level camera: a pixel row below the centre sees the ground at z = h * f / dy, capped by the wall.
    expected = np.where(rows > 0, np.minimum(height * focal / np.where(rows > 0, rows, 1.0), wall), wall)
    np.testing.assert_allclose(scene.depth, np.broadcast_to(expected[:, None], (31, 40)), rtol=1e-6)
    assert scene.instance_masks.shape == (0, 31, 40)


def test_cube_and_cylinder_face_depth_is_exact():
    cube = ObjectSpec(shape="cube", colour="blue", centre=(0.0, 4.0, 1.5), radius=0.4)
    cylinder = ObjectSpec(shape="cylinder", colour="green", centre=(0.0, 6.0, 1.5), radius=0.5, half_height=0.7)
    for obj, front in ((cube, 4.0 - 0.4), (cylinder, 6.0 - 0.5)):
        scene = render(SceneSpec(objects=(obj,)), LEVEL_CAMERA, image_size=21)
        assert scene.depth[10, 10] == pytest.approx(front, rel=1e-6)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_masks_mark_where_each_object_is_the_nearest_surface(seed):
    scene = render_scene(seed, image_size=40)
    spec = scene.spec
    background = render(SceneSpec(objects=(), wall_distance=spec.wall_distance), scene.camera, 40).depth
    alone = []
    for obj in spec.objects:
        single = render(SceneSpec(objects=(obj,), wall_distance=spec.wall_distance), scene.camera, 40)
        alone.append(np.where(single.instance_masks[0], single.depth, np.inf))
    alone = np.stack(alone)
    nearest = np.minimum(alone.min(axis=0), background)
    np.testing.assert_array_equal(scene.depth, nearest)
    for index, mask in enumerate(scene.instance_masks):
        assert mask.any()
        np.testing.assert_array_equal(mask, (alone[index] == nearest) & (alone[index] < background))
    assert not (scene.instance_masks.sum(axis=0) > 1).any()


def test_same_seed_gives_same_bytes_and_different_seeds_differ():
    first, second = render_scene(11, image_size=(48, 64)), render_scene(11, image_size=(48, 64))
    assert first.image.tobytes() == second.image.tobytes()
    assert first.depth.tobytes() == second.depth.tobytes()
    assert first.instance_masks.tobytes() == second.instance_masks.tobytes()
    others = [render_scene(seed, image_size=(48, 64)).image.tobytes() for seed in (12, 13, 14)]
    assert len({first.image.tobytes(), *others}) == 4


def test_scenes_rendered_by_worker_processes_are_the_same_scenes_in_order():
    seeds = [5, 3, 99, 7, 11]
    serial = list(render_scenes(seeds, (48, 64)))
    parallel = list(render_scenes(seeds, (48, 64), processes=2))
    assert [scene.image.tobytes() for scene in parallel] == [scene.image.tobytes() for scene in serial]
    assert [scene.instance_masks.tobytes() for scene in parallel] == [
        scene.instance_masks.tobytes() for scene in serial
    ]
    assert serial[2].image.tobytes() == render_scene(99, (48, 64)).image.tobytes()
    for processes in (0, 1.5, True):
        with pytest.raises(ValueError, match="processes"):
            list(render_scenes(seeds, 32, processes))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**40), side=st.integers(min_value=24, max_value=72))
def test_random_scenes_are_valid(seed, side):
    scene = render_scene(seed, image_size=(side, side + 8))
    config = DEFAULT_SAMPLING_CONFIG
    assert scene.image.shape == (side, side + 8, 3) and scene.image.dtype == np.uint8
    assert scene.depth.dtype == np.float32 and np.all(np.isfinite(scene.depth)) and np.all(scene.depth > 0)
    assert config.min_objects <= len(scene.objects) <= config.max_objects
    assert scene.instance_masks.shape == (len(scene.objects), side, side + 8)
    for obj, mask in zip(scene.objects, scene.instance_masks):
        rows, cols = np.nonzero(mask)
        assert obj.visible_pixels == mask.sum() > 0
        assert obj.centroid == pytest.approx((cols.mean(), rows.mean()))
        assert obj.size in ("small", "large")


def test_num_objects_is_respected():
    for count in (1, 3, 6):
        assert len(render_scene(5, image_size=48, num_objects=count).objects) == count


def test_intrinsics_and_extrinsics_back_project_ground_pixels_onto_the_ground():
    scene = render_scene(3, image_size=(40, 56))
    background = ~scene.instance_masks.any(axis=0)
    rows, cols = np.nonzero(background)
    depth = scene.depth[rows, cols].astype(np.float64)
    pixels = np.stack([cols + 0.5, rows + 0.5, np.ones_like(depth)])
    camera_points = np.linalg.inv(scene.intrinsics) @ pixels * depth
    world = np.linalg.inv(scene.extrinsics) @ np.vstack([camera_points, np.ones_like(depth)])
    on_ground = np.isclose(world[2], 0.0, atol=1e-3)
    on_wall = np.isclose(world[1], scene.spec.wall_distance, atol=1e-3)
    assert np.all(on_ground | on_wall)
    assert on_ground.any() and on_wall.any()


def test_inverse_depth_is_reciprocal_and_rejects_invalid_depth():
    depth = np.array([[1.0, 2.0], [4.0, 0.5]], dtype=np.float32)
    np.testing.assert_allclose(metric_depth_to_inverse_depth(depth), 1.0 / depth)
    assert metric_depth_to_inverse_depth(depth)[1, 1] > metric_depth_to_inverse_depth(depth)[0, 0]
    for bad in (np.array([[0.0, 1.0]]), np.array([[np.inf, 1.0]]), np.array([])):
        with pytest.raises(ValueError):
            metric_depth_to_inverse_depth(bad)


@pytest.mark.parametrize(
    "call",
    [
        lambda: render_scene(-1, 32),
        lambda: render_scene(0, 4),
        lambda: render_scene(0, (32, 32, 3)),
        lambda: render_scene(0, 32, num_objects=0),
        lambda: render_scene(0, 32, num_objects=9),
        lambda: ObjectSpec(shape="cone", colour="red", centre=(0, 3, 1), radius=0.5),
        lambda: ObjectSpec(shape="sphere", colour="pink", centre=(0, 3, 1), radius=0.5),
        lambda: Camera(tilt=2.0),
        lambda: render(SceneSpec(objects=()), Camera(tilt=-1.2, vertical_fov=2.0), 16),
    ],
)
def test_invalid_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_a_256_scene_renders_in_well_under_a_second():
    render_scene(0, image_size=64)
    start = time.perf_counter()
    render_scene(1, image_size=256)
    assert time.perf_counter() - start < 1.0
