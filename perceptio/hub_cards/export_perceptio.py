"""Export a Perceptio model and processor as a flat, self-contained Hub folder.

The folder holds safetensors weights, the processor and tokenizer files, every source file of
`perceptio/modeling_perceptio/` and `perceptio/processing/` copied flat, and `auto_map` entries so that
`AutoModel.from_pretrained(folder, trust_remote_code=True)` works where the `perceptio` package is not installed.
The model code imports the spatial vocabulary from the processing folder (`from ..processing.X import`); in the flat
folder that import becomes `from .X import`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..modeling_perceptio import PerceptioForConditionalGeneration
from ..modeling_perceptio.pipeline_perceptio import custom_pipelines_config
from ..processing import PerceptioProcessor


HUB_CODE_PACKAGES = ("modeling_perceptio", "processing")
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
# An import of a module of the other Hub-shipped folder, which the flat folder holds as a sibling.
CROSS_FOLDER_IMPORT = re.compile(
    rf"^(\s*from\s+)\.\.(?:{'|'.join(HUB_CODE_PACKAGES)})\.(\w+\s+import\b)", re.MULTILINE
)


def hub_source_files() -> list[Path]:
    """The Python files that ship with every exported checkpoint (package `__init__` files excluded)."""
    package_root = Path(__file__).resolve().parent.parent
    files = []
    for package in HUB_CODE_PACKAGES:
        files.extend(sorted(path for path in (package_root / package).glob("*.py") if path.name != "__init__.py"))
    names = [path.name for path in files]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise ValueError(
            f"Hub-shipped files must have distinct names when copied flat; duplicated: {sorted(duplicates)}."
        )
    return files


def flat_source(path: Path) -> str:
    """The text of a Hub-shipped file as it runs in the flat folder: imports of the other folder made relative."""
    return CROSS_FOLDER_IMPORT.sub(r"\1.\2", path.read_text(encoding="utf-8"))


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
        (output_dir / source.name).write_text(flat_source(source), encoding="utf-8")
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
