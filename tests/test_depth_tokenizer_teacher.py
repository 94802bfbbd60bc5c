"""The Depth Anything teacher wrapper and its cached `datasets` column, with a tiny random teacher saved in HF
format by the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk
from PIL import Image
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessorPil

from perceptio.data.depth_teacher import DepthTeacher, add_teacher_depth_column, image_dataset_from_folder


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_depth_anything")
    backbone = Dinov2Config(
        image_size=32,
        patch_size=16,
        hidden_size=4,
        num_hidden_layers=2,
        num_attention_heads=1,
        intermediate_size=8,
        out_indices=[1, 2],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=4,
        neck_hidden_sizes=[2, 2],
        fusion_hidden_size=6,
        reassemble_factors=[2, 1],
        head_hidden_size=4,
    )
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessorPil(
        size={"height": 32, "width": 32}, keep_aspect_ratio=True, ensure_multiple_of=16
    ).save_pretrained(folder)
    return folder


def random_images(count: int, seed: int = 0) -> list[Image.Image]:
    generator = np.random.default_rng(seed)
    shapes = [(40, 60), (32, 32), (50, 30)]
    return [
        Image.fromarray(generator.integers(0, 255, (*shapes[index % 3], 3), dtype=np.uint8)) for index in range(count)
    ]


class CallCounter:
    """Wraps a teacher's `predict_batch` and counts the images it is asked for."""

    def __init__(self, teacher: DepthTeacher):
        self.images = 0
        self._predict_batch = teacher.predict_batch
        teacher.predict_batch = self

    def __call__(self, images):
        self.images += len(images)
        return self._predict_batch(images)


def test_teacher_returns_unit_range_square_maps_batched_like_one_by_one(teacher_folder):
    teacher = DepthTeacher(teacher_folder, output_size=16, batch_size=2, device="cpu")
    images = random_images(5)
    maps = teacher.predict(images, show_progress=False)
    assert maps.shape == (5, 16, 16) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    one_by_one = np.stack([teacher.predict_batch([image])[0] for image in images])
    np.testing.assert_allclose(maps, one_by_one, atol=1e-5)


def test_teacher_rejects_bad_inputs(teacher_folder):
    teacher = DepthTeacher(teacher_folder, output_size=16, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        teacher.predict([])
    with pytest.raises(ValueError, match="does not exist"):
        teacher.predict_batch(["/nonexistent/image.png"])
    with pytest.raises(ValueError, match="output_size"):
        DepthTeacher(teacher_folder, output_size=0)


def test_second_run_over_the_same_images_reuses_the_cache(teacher_folder, tmp_path):
    dataset = Dataset.from_dict({"image": random_images(4)})
    first_teacher = DepthTeacher(teacher_folder, output_size=16, batch_size=3, device="cpu")
    first_calls = CallCounter(first_teacher)
    first = add_teacher_depth_column(dataset, first_teacher, cache_dir=tmp_path / "cache")
    assert first_calls.images == 4

    second_teacher = DepthTeacher(teacher_folder, output_size=16, batch_size=3, device="cpu")
    second_calls = CallCounter(second_teacher)
    second = add_teacher_depth_column(dataset, second_teacher, cache_dir=tmp_path / "cache")
    assert second_calls.images == 0
    np.testing.assert_array_equal(np.asarray(first["teacher_depth"]), np.asarray(second["teacher_depth"]))

    other_size = DepthTeacher(teacher_folder, output_size=8, batch_size=3, device="cpu")
    other_calls = CallCounter(other_size)
    add_teacher_depth_column(dataset, other_size, cache_dir=tmp_path / "cache")
    assert other_calls.images == 4


def test_dataset_loaded_from_disk_caches_next_to_its_files(teacher_folder, tmp_path):
    for index, image in enumerate(random_images(3, seed=1)):
        image.save(tmp_path / f"image_{index}.png")
    image_dataset_from_folder(tmp_path).save_to_disk(tmp_path / "dataset")
    teacher = DepthTeacher(teacher_folder, output_size=16, device="cpu")
    calls = CallCounter(teacher)
    add_teacher_depth_column(load_from_disk(tmp_path / "dataset"), teacher)
    add_teacher_depth_column(load_from_disk(tmp_path / "dataset"), teacher)
    assert calls.images == 3


def test_column_arguments_are_validated(teacher_folder):
    teacher = DepthTeacher(teacher_folder, output_size=16, device="cpu")
    dataset = Dataset.from_dict({"image": random_images(1)})
    with pytest.raises(ValueError, match="image_column"):
        add_teacher_depth_column(dataset, teacher, image_column="pixels")
    with pytest.raises(ValueError, match="already exists"):
        add_teacher_depth_column(dataset, teacher, depth_column="image")
    with pytest.raises(ValueError, match="no image files"):
        image_dataset_from_folder(__import__("tempfile").mkdtemp())
