"""Export a Perceptio model and processor as a flat, self-contained Hub folder.

The folder holds safetensors weights, the processor and tokenizer files, every source file of
`perceptio/models/perceptio/` copied as it is, and `auto_map` entries so that
`AutoModel.from_pretrained(folder, trust_remote_code=True)` works where the `perceptio` package is not installed.
The modules of that folder import one another only as `from .X import`, so they run unchanged in the flat folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..models.perceptio import PerceptioForConditionalGeneration, PerceptioProcessor
from ..models.perceptio.pipeline_perceptio import custom_pipelines_config


HUB_CODE_FOLDER = Path(__file__).resolve().parent.parent / "models" / "perceptio"
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_perceptio.PerceptioConfig",
    "AutoModel": "modeling_perceptio.PerceptioForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_perceptio.PerceptioForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {
    "AutoProcessor": "processing_perceptio.PerceptioProcessor",
    "AutoImageProcessor": "image_processing_perceptio.PerceptioImageProcessor",
}
PROCESSOR_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json")


def hub_source_files() -> list[Path]:
    """The Python files that ship with every exported checkpoint (the package `__init__` excluded)."""
    return sorted(path for path in HUB_CODE_FOLDER.glob("*.py") if path.name != "__init__.py")


def export_pretrained(
    model: PerceptioForConditionalGeneration,
    processor: PerceptioProcessor,
    output_dir: str | Path,
    overwrite: bool = False,
) -> Path:
    """Write `model` and `processor` to `output_dir` as a flat folder that loads with `trust_remote_code=True`."""
    if not isinstance(model, PerceptioForConditionalGeneration):
        raise ValueError(f"model must be a PerceptioForConditionalGeneration, got {type(model).__name__}.")
    if not isinstance(processor, PerceptioProcessor):
        raise ValueError(f"processor must be a PerceptioProcessor, got {type(processor).__name__}.")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    for source in hub_source_files():
        shutil.copyfile(source, output_dir / source.name)
    _add_auto_map(output_dir / "config.json", MODEL_AUTO_MAP)
    _add_custom_pipelines(output_dir / "config.json")
    for name in PROCESSOR_CONFIG_FILES:
        if (output_dir / name).exists():
            _add_auto_map(output_dir / name, PROCESSOR_AUTO_MAP)
    return output_dir


def _add_custom_pipelines(path: Path) -> None:
    content = json.loads(path.read_text(encoding="utf-8"))
    content["custom_pipelines"] = {**content.get("custom_pipelines", {}), **custom_pipelines_config()}
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _add_auto_map(path: Path, auto_map: dict[str, str]) -> None:
    content = json.loads(path.read_text(encoding="utf-8"))
    content["auto_map"] = {**content.get("auto_map", {}), **auto_map}
    if "image_processor" in content and isinstance(content["image_processor"], dict):
        content["image_processor"]["auto_map"] = {"AutoImageProcessor": auto_map["AutoImageProcessor"]}
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
