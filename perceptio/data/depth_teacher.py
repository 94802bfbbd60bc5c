"""Depth Anything V2 as the depth tokenizer's teacher: images -> normalised relative inverse depth maps, cached as a
`datasets` column.

The teacher is transformers' `DepthAnythingForDepthEstimation` with its own image processor (the PIL backend is
used when torchvision is absent). Its output is relative inverse depth (larger = nearer), the convention the whole
project uses; each map is resized to a square `output_size` and min-max scaled to [0, 1] per image.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Array2D, Dataset
from datasets.fingerprint import Hasher
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation


logger = logging.getLogger(__name__)

ImageInput = Image.Image | np.ndarray | str | os.PathLike


class DepthTeacher:
    """Batched Depth Anything inference on CPU or GPU.

    Args:
        model_name_or_path: a `depth-anything/Depth-Anything-V2-*-hf` checkpoint id or a local folder holding the
            model and its `preprocessor_config.json`.
        output_size: side of the square maps returned (the depth tokenizer's `image_size` avoids a second resize).
        batch_size: images per forward pass.
        device: where the teacher runs; defaults to CUDA when available, else CPU.
        dtype: the teacher's weight dtype (float32 unless given, e.g. torch.float16 on GPU).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        output_size: int = 320,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        if not isinstance(output_size, int) or output_size <= 0:
            raise ValueError(f"output_size must be a positive integer, got {output_size!r}.")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.model_name_or_path = str(model_name_or_path)
        self.output_size = output_size
        self.batch_size = batch_size
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.image_processor = AutoImageProcessor.from_pretrained(self.model_name_or_path)
        self.model = DepthAnythingForDepthEstimation.from_pretrained(self.model_name_or_path, dtype=dtype)
        self.model.to(self.device).eval()
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """Hash of the teacher's weights, processor settings and output size: equal fingerprints give equal maps,
        so a cached column can be reused."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in self.model.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            digest.update(self.image_processor.to_json_string().encode())
            digest.update(str(self.output_size).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @torch.no_grad()
    def predict_batch(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Depth maps (B, output_size, output_size), float32 in [0, 1], larger = nearer, for one batch of images."""
        rgb_images = [_as_rgb_image(image) for image in images]
        if not rgb_images:
            raise ValueError("images is empty: give at least one image.")
        maps = [None] * len(rgb_images)
        # Aspect ratio is kept by the processor, so images of different shapes are run in separate groups.
        for indices, pixel_values in self._grouped_pixel_values(rgb_images):
            predicted = self.model(pixel_values=pixel_values.to(self.device, self.model.dtype)).predicted_depth
            for index, depth in zip(indices, self._square_unit_range(predicted.float())):
                maps[index] = depth
        return np.stack(maps).astype(np.float32)

    def predict(self, images: Sequence[ImageInput], show_progress: bool = True) -> np.ndarray:
        """Depth maps for any number of images, `batch_size` at a time, with a progress bar."""
        if len(images) == 0:
            raise ValueError("images is empty: give at least one image.")
        batches = range(0, len(images), self.batch_size)
        results = [
            self.predict_batch(images[start : start + self.batch_size])
            for start in tqdm(batches, desc="Teacher depth", disable=not show_progress)
        ]
        return np.concatenate(results)

    def _grouped_pixel_values(self, images: list[Image.Image]) -> list[tuple[list[int], torch.Tensor]]:
        groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        for index, image in enumerate(images):
            pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
            groups.setdefault(tuple(pixel_values.shape), []).append((index, pixel_values))
        return [
            ([index for index, _ in members], torch.stack([values for _, values in members]))
            for members in groups.values()
        ]

    def _square_unit_range(self, predicted: torch.Tensor) -> np.ndarray:
        resized = F.interpolate(
            predicted.unsqueeze(1), size=(self.output_size, self.output_size), mode="bilinear", align_corners=False
        )[:, 0]
        minimum = resized.amin(dim=(1, 2), keepdim=True)
        value_range = resized.amax(dim=(1, 2), keepdim=True) - minimum
        scaled = (resized - minimum) / value_range.clamp_min(torch.finfo(resized.dtype).tiny)
        return torch.where(value_range > 0, scaled, torch.zeros_like(resized)).cpu().numpy()


def add_teacher_depth_column(
    dataset: Dataset,
    teacher: DepthTeacher,
    image_column: str = "image",
    depth_column: str = "teacher_depth",
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Return `dataset` with a `depth_column` of teacher maps, computed by `Dataset.map` in batches.

    The map's fingerprint combines the dataset's fingerprint with the teacher's, so a second run over the same
    images and teacher loads the cached Arrow file instead of calling the teacher. Datasets loaded from disk cache
    next to their files; an in-memory dataset (e.g. `Dataset.from_dict`) caches only when `cache_dir` is given.
    """
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    if image_column not in dataset.column_names:
        raise ValueError(
            f"image_column {image_column!r} is not a column of the dataset (columns: {dataset.column_names})."
        )
    if depth_column in dataset.column_names:
        raise ValueError(f"depth_column {depth_column!r} already exists; remove it or choose another name.")
    fingerprint = Hasher.hash([dataset._fingerprint, teacher.fingerprint, image_column, depth_column])
    cache_file_name = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_file_name = str(Path(cache_dir) / f"teacher_depth-{fingerprint}.arrow")
    elif not dataset.cache_files:
        logger.warning("The dataset is in memory and no cache_dir was given: teacher depth will not be cached.")
    features = dataset.features.copy()
    features[depth_column] = Array2D(shape=(teacher.output_size, teacher.output_size), dtype="float32")
    return dataset.map(
        lambda batch: {depth_column: list(teacher.predict_batch(batch[image_column]))},
        batched=True,
        batch_size=teacher.batch_size,
        features=features,
        new_fingerprint=fingerprint,
        cache_file_name=cache_file_name,
        desc="Teacher depth",
    )


def image_dataset_from_folder(folder: str | os.PathLike, image_column: str = "image") -> Dataset:
    """A dataset with one image path per row for every image file under `folder` (sorted, recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist or is not a directory.")
    extensions = {
        extension for extension, format_name in Image.registered_extensions().items() if format_name in Image.OPEN
    }
    paths = sorted(str(path) for path in folder.rglob("*") if path.suffix.lower() in extensions and path.is_file())
    if not paths:
        raise ValueError(f"no image files found under {str(folder)!r}.")
    return Dataset.from_dict({image_column: paths})


def _as_rgb_image(image: ImageInput) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise ValueError(f"image path {str(image)!r} does not exist.")
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"image arrays must be (H, W) or (H, W, C), got shape {image.shape}.")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"images must be PIL images, numpy arrays or paths, got {type(image).__name__}.")
    return image.convert("RGB")


__all__ = ["DepthTeacher", "add_teacher_depth_column", "image_dataset_from_folder"]
