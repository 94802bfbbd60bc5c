"""Flat Hub export: self-contained folder, auto_map, and loading with trust_remote_code without the package."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perceptio import PerceptioForConditionalGeneration
from perceptio.hub_cards.export_perceptio import (
    MODEL_AUTO_MAP,
    PROCESSOR_AUTO_MAP,
    export_pretrained,
    hub_source_files,
)


HUB_FOLDER = Path(__file__).resolve().parent.parent / "perceptio" / "models" / "perceptio"
ALLOWED_TOP_LEVEL = {"torch", "numpy", "PIL", "transformers", "safetensors"}
# What `processor.save_pretrained` copies: the processor's modules and their `from .X import`s (transformers'
# `custom_object_save` follows only same-folder relative imports).
PROCESSOR_CODE_FILES = {
    "processing_perceptio.py",
    "image_processing_perceptio.py",
    "post_processing_perceptio.py",
    "spatial_vocabulary_perceptio.py",
}


def run_isolated_script(script: str, folder: Path, request: dict, tmp_path: Path, *arguments: str) -> dict:
    """Run `tests/SCRIPT` on `folder` in a fresh interpreter that cannot import perceptio (the Hub user's situation),
    with `request` as its inputs; returns what it saved."""
    torch.save(request, tmp_path / "inputs.pt")
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(Path(__file__).with_name(script)), str(folder), str(tmp_path / "inputs.pt")]
    completed = subprocess.run(
        [*command, str(tmp_path / "outputs.pt"), *arguments],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt", weights_only=False)


def _imports_leaving_the_folder(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    siblings = {file.stem for file in path.parent.glob("*.py")}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top not in ALLOWED_TOP_LEVEL and top not in sys.stdlib_module_names:
                    bad.append(f"{path.name}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1 or (node.level == 1 and (node.module or "").split(".")[0] not in siblings):
                bad.append(f"{path.name}:{node.lineno} from {'.' * node.level}{node.module or ''}")
            elif node.level == 0:
                top = (node.module or "").split(".")[0]
                if top not in ALLOWED_TOP_LEVEL and top not in sys.stdlib_module_names:
                    bad.append(f"{path.name}:{node.lineno} from {node.module}")
    return bad


def test_hub_shipped_files_import_only_their_folder():
    sources = sorted(HUB_FOLDER.glob("*.py"))
    assert {"modeling_perceptio.py", *PROCESSOR_CODE_FILES} <= {path.name for path in sources}
    bad = [line for path in sources for line in _imports_leaving_the_folder(path)]
    assert not bad, "Hub-shipped code imports from outside its folder:\n" + "\n".join(bad)


def test_import_check_catches_a_package_import(tmp_path):
    offender = tmp_path / "modeling_bad.py"
    offender.write_text("from perceptio.tiny_models import build_tiny_perceptio\nfrom ..x import y\nimport yaml\n")
    assert len(_imports_leaving_the_folder(offender)) == 3


def test_exported_files_import_only_their_flat_folder(tiny_pair, tmp_path):
    folder = export_pretrained(*tiny_pair, tmp_path / "export")
    sources = [folder / source.name for source in hub_source_files()]
    assert [path.read_bytes() for path in sources] == [source.read_bytes() for source in hub_source_files()]
    bad = [line for path in sources for line in _imports_leaving_the_folder(path)]
    assert not bad, "Exported code imports from outside its flat folder:\n" + "\n".join(bad)


def test_export_writes_a_flat_self_contained_folder(tiny_pair, tmp_path):
    model, processor = tiny_pair
    folder = export_pretrained(model, processor, tmp_path / "export")
    names = {path.name for path in folder.iterdir()}
    assert {source.name for source in hub_source_files()} <= names
    assert "model.safetensors" in names and not any(name.endswith(".bin") for name in names)
    assert {"tokenizer.json", "processor_config.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == MODEL_AUTO_MAP
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == PROCESSOR_AUTO_MAP
    with pytest.raises(ValueError, match="not empty"):
        export_pretrained(model, processor, folder)


def test_exported_folder_loads_without_the_package_and_matches_bitwise(tiny_pair, rgb_image, tmp_path):
    model, processor = tiny_pair
    folder = export_pretrained(model, processor, tmp_path / "export")
    # A teacher-forced [SEG] after the prompt exercises the SAM2 path as well as the language model.
    request = {"image": rgb_image, "prompt": processor.format_prompt("Where is the red cube?") + "[SEG]"}
    remote = run_isolated_script("isolated_hub_load.py", folder, request, tmp_path)
    assert remote["model_class"].startswith("transformers_modules.")
    inputs = processor(images=[request["image"]], text=[request["prompt"]])
    for key, value in inputs.items():
        assert torch.equal(value, remote["inputs"][key]), key
    # The package's class loading the same folder must match the Hub code bit for bit. The freshly built model agrees
    # to float rounding only: SAM2's mask path differs by ~1e-11 between a built and a loaded copy of identical weights.
    reloaded = PerceptioForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        local = reloaded(**inputs)
        built = model(**inputs)
    assert torch.equal(local.logits, remote["logits"])
    assert local.pred_masks[0].shape[0] == 1
    assert torch.equal(local.pred_masks[0], remote["pred_masks"][0])
    assert torch.equal(built.logits, remote["logits"])
    assert torch.allclose(built.pred_masks[0], remote["pred_masks"][0], atol=1e-8, rtol=0)


def test_an_exported_model_with_seg_attribute_heads_loads_them_without_the_package(
    tiny_attribute_model, tiny_processor, rgb_image, tmp_path
):
    folder = export_pretrained(tiny_attribute_model, tiny_processor, tmp_path / "export")
    request = {"image": rgb_image, "prompt": tiny_processor.format_prompt("Where is the red cube?") + "[SEG]"}
    remote = run_isolated_script("isolated_hub_load.py", folder, request, tmp_path)
    expected = [head.weight for head in tiny_attribute_model.seg_attribute_heads]
    hidden = tiny_attribute_model.config.text_config.hidden_size
    assert [tuple(weight.shape) for weight in remote["seg_attribute_heads"]] == [(4, hidden), (3, hidden)]
    assert all(torch.equal(local, loaded) for local, loaded in zip(expected, remote["seg_attribute_heads"]))


def test_a_save_pretrained_folder_gives_the_processor_without_the_package(tiny_pair, rgb_image, tmp_path):
    model, processor = tiny_pair
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert PROCESSOR_CODE_FILES <= {path.name for path in folder.iterdir()}
    request = {"image": rgb_image, "prompt": processor.format_prompt("Where is the red cube?")}
    remote = run_isolated_script("isolated_processor_load.py", folder, request, tmp_path)
    # Without trust_remote_code: an error asking for it, never the bare tokenizer.
    assert remote["untrusted"].startswith("ValueError") and "trust_remote_code=True" in remote["untrusted"]
    assert remote["processor_class"].startswith("transformers_modules.")
    assert remote["processor_class"].endswith(".PerceptioProcessor")
    inputs = processor(images=[request["image"]], text=[request["prompt"]])
    assert set(remote["inputs"]) == set(inputs) and "pixel_values" in inputs
    for key, value in inputs.items():
        assert torch.equal(value, remote["inputs"][key]), key
