"""Datasets: procedurally rendered 3D scenes with exact depth and masks, their tasks, and the depth teacher."""

from .scene_rendering import metric_depth_to_inverse_depth, render_scene
from .synthetic_dataset import build_synthetic_dataset, sample_spatial_targets


__all__ = ["build_synthetic_dataset", "metric_depth_to_inverse_depth", "render_scene", "sample_spatial_targets"]
