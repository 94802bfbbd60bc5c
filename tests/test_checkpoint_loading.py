"""Broken checkpoint folders: every command that loads one fails with one line naming the file and what is wrong."""

from __future__ import annotations

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import perceptio.embedded_checkpoint
from perceptio.checkpoint_loading import check_checkpoint_folder, load_perceptio_checkpoint
from perceptio.cli import main


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def saved(tiny_pair, tmp_path_factory):
    """A tiny checkpoint written by `save_pretrained`, with the model card `perceptio push` asks for."""
    model, processor = tiny_pair
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "README.md").write_text("# tiny\n")
    return folder


def truncate_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, r"model\.safetensors is not a complete safetensors file \(.*\); it may be truncated"


def break_config(folder):
    path = folder / "config.json"
    path.write_text('{"model_type": "perceptio", ', encoding="utf-8")
    return path, r"config\.json is not valid JSON \(Expecting property name .* at line 1, column 29\)"


def remove_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    return folder, r"has no tokenizer\.json \(the processor's tokenizer\)"


BREAKAGES = {"truncated weights": truncate_weights, "invalid config": break_config, "no tokenizer": remove_tokenizer}


def command_line(command: str, folder, tmp_path) -> list[str]:
    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    return {
        "predict": [
            "predict",
            "--model",
            str(folder),
            "--image",
            str(image),
            "--prompt",
            "Hi",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        "eval": [
            "eval",
            "hardblink",
            "--model",
            str(folder),
            "--data",
            str(tmp_path),
            "--output-dir",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        "export": ["export", "--model", str(folder), "--output-dir", str(tmp_path / "out")],
        "push": ["push", str(folder), "--repo-id", "org/tiny", "--dry-run"],
    }[command]


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("command", ["predict", "eval", "export", "push"])
def test_a_broken_folder_fails_with_one_line_naming_the_file(saved, tmp_path, capsys, command, breakage):
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    named, message = BREAKAGES[breakage](folder)
    assert main(command_line(command, folder, tmp_path)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith(f"perceptio {command}: error: {named}")
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


def test_demo_reports_a_broken_embedded_checkpoint_in_one_line(saved, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    named, _ = truncate_weights(folder)
    monkeypatch.setattr(perceptio.embedded_checkpoint, "embedded_checkpoint_path", lambda: folder)
    assert main(["demo", "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith(f"perceptio demo: error: {named} is not a complete")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda config: {**config, "num_depth_tokens": -3}, r"config\.json: num_depth_tokens must be a positive"),
        (lambda config: {**config, "model_type": "internvl"}, r"config\.json: model_type is 'internvl', not "),
        (lambda config: [config], r"config\.json must hold a JSON object, not a list"),
    ],
)
def test_config_values_are_checked_and_named(saved, tmp_path, change, message):
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(ValueError, match=message):
        load_perceptio_checkpoint(folder)


def test_missing_and_lfs_pointer_weights_are_named(saved, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ValueError, match=r"model\.safetensors is a Git LFS pointer, not the weights"):
        check_checkpoint_folder(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has no weights: neither model\.safetensors nor model\.safetensors\.index"):
        check_checkpoint_folder(folder)


def test_weights_that_lack_a_module_are_named(saved, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        kept = {key: file.get_tensor(key) for key in file.keys() if not key.startswith("depth_tokenizer.")}
        metadata = file.metadata()
    save_file(kept, str(folder / "model.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"checkpoint: the weights lack \d+ tensor\(s\) .*first: depth_tokenizer\."):
        load_perceptio_checkpoint(folder)


def test_a_good_folder_loads(saved):
    model, processor = load_perceptio_checkpoint(saved)
    assert not model.training and type(processor).__name__ == "PerceptioProcessor"


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float16"])
def test_a_checkpoint_stored_in_bfloat16_gives_its_depth_tokenizer_in_float32(tiny_pair, tmp_path, dtype):
    # An older build stored everything in bf16: the depth tokenizer gets those stored values, computed in float32.
    model, processor = copy.deepcopy(tiny_pair[0]).to(torch.bfloat16), tiny_pair[1]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    stored = model.depth_tokenizer.state_dict()
    loaded, _ = load_perceptio_checkpoint(tmp_path, dtype=dtype)
    assert loaded.dtype == (torch.float16 if dtype == "float16" else torch.bfloat16)
    state = loaded.depth_tokenizer.state_dict()
    assert {tensor.dtype for tensor in state.values() if tensor.is_floating_point()} == {torch.float32}
    assert all(torch.equal(state[name], tensor.to(state[name].dtype)) for name, tensor in stored.items())
    assert all(state[name].dtype == tensor.dtype for name, tensor in stored.items() if not tensor.is_floating_point())
