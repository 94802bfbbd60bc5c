"""Paths of the `evaluate` metric modules shipped inside the package, for offline `evaluate.load(path)`."""

from __future__ import annotations

from pathlib import Path


# Each module is a folder metrics/<name>/ holding <name>.py, the layout `evaluate.load` expects of a local path.
METRICS_DIRECTORY = Path(__file__).resolve().parent / "metrics"

METRIC_NAMES = ("referring_segmentation", "multiple_choice", "depth_estimation")


def metric_path(name: str) -> str:
    """The folder of the shipped metric module `name`, to pass to `evaluate.load`.

    Example:
        >>> import evaluate
        >>> ciou_giou = evaluate.load(metric_path("referring_segmentation"))  # no network needed
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric module {name!r}; the package ships {', '.join(METRIC_NAMES)}.")
    folder = METRICS_DIRECTORY / name
    if not (folder / f"{name}.py").is_file():
        raise ValueError(f"Metric module {name!r} is missing from the installation: {folder / (name + '.py')}.")
    return str(folder)
