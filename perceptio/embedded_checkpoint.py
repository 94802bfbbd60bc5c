"""The Perceptio checkpoint that ships inside the package, and the example scene the demo runs on.

The checkpoint is the result of the `synthetic-tiny` recipe (`perceptio train --recipe synthetic-tiny`): a few-MB
Perceptio trained on CPU on rendered scenes, so `perceptio demo` shows a learned mask, depth map and answer on a
fresh machine with no downloads.

>>> from perceptio.embedded_checkpoint import load_embedded_perceptio
>>> model, processor = load_embedded_perceptio()
>>> type(model).__name__
'PerceptioForConditionalGeneration'
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from PIL import Image

from .checkpoint_loading import load_perceptio_checkpoint
from .models.perceptio import PerceptioForConditionalGeneration, PerceptioProcessor


EMBEDDED_CHECKPOINT_NAME = "perceptio-tiny-synthetic"
EXAMPLE_SCENE_NAME = "example_scene.png"
EXAMPLE_PROMPT = (
    "Where is the small cylinder? Please output the segmentation mask. Also estimate the depth of the scene."
)


def embedded_checkpoint_path() -> Path:
    """Folder of the embedded checkpoint (model and processor files)."""
    path = Path(str(resources.files("perceptio.assets").joinpath(EMBEDDED_CHECKPOINT_NAME)))
    if not (path / "config.json").is_file():
        raise ValueError(
            f"The embedded checkpoint is missing from {path}: reinstall perceptio, or rebuild it with "
            "`perceptio train --recipe synthetic-tiny --output-dir DIR` and copy DIR/model there."
        )
    return path


def load_embedded_perceptio() -> tuple[PerceptioForConditionalGeneration, PerceptioProcessor]:
    """The embedded model (in eval mode) and its processor."""
    return load_perceptio_checkpoint(embedded_checkpoint_path())


def example_scene() -> Image.Image:
    """The bundled example scene (a held-out rendered scene, 128×128 RGB)."""
    with resources.files("perceptio.assets").joinpath(EXAMPLE_SCENE_NAME).open("rb") as file:
        image = Image.open(file)
        image.load()
    return image.convert("RGB")
