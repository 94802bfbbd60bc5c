"""`perceptio predict`: the overlay, depth picture and JSON it writes, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from perceptio.cli import build_parser, main


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(path)
    return path


def predict_command(checkpoint, image_file, output_dir, *flags, prompt="Segment the cube.", max_new_tokens=22) -> dict:
    """Run `perceptio predict`, check it succeeds, and return its prediction.json."""
    arguments = ["predict", "--model", str(checkpoint), "--image", str(image_file), "--prompt", prompt]
    code = main([*arguments, "--output-dir", str(output_dir), "--max-new-tokens", str(max_new_tokens), *flags])
    assert code == 0
    return json.loads((output_dir / "prediction.json").read_text())


def test_predict_writes_overlay_depth_and_json(biased_checkpoint, image_file, tmp_path):
    output_dir = tmp_path / "out"
    result = predict_command(biased_checkpoint, image_file, output_dir)
    assert result["num_masks"] == 1 and result["mask_size"] == [40, 70] and result["depth_size"] == [40, 70]
    assert len(result["depth_codes"]) == 16 and not result["depth_truncated"]
    overlay = Image.open(output_dir / result["overlay"])
    depth = Image.open(output_dir / result["depth_image"])
    assert overlay.size == depth.size == (70, 40) and overlay.mode == depth.mode == "RGB"
    original = np.asarray(Image.open(image_file))
    assert (np.asarray(overlay) != original).any() == (result["mask_areas"][0] > 0)


def test_truncated_depth_writes_no_depth_picture(biased_checkpoint, image_file, tmp_path):
    result = predict_command(biased_checkpoint, image_file, tmp_path, prompt="Depth?", max_new_tokens=5)
    assert result["depth_truncated"] and result["depth_image"] is None
    assert not (tmp_path / "depth.png").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--image": "missing.png"}, "does not exist"),
        ({"--model": "nowhere"}, "no config.json"),
        ({"--max-new-tokens": "0"}, "positive"),
    ],
)
def test_bad_arguments_fail_with_a_message(biased_checkpoint, image_file, tmp_path, capsys, change, message):
    arguments = {
        "--model": str(biased_checkpoint),
        "--image": str(image_file),
        "--prompt": "Hi",
        "--output-dir": str(tmp_path),
    }
    for key, value in change.items():
        arguments[key] = value if key == "--max-new-tokens" else str(tmp_path / value)
    code = main(["predict", *[item for pair in arguments.items() for item in pair]])
    assert code == 2 and message in capsys.readouterr().err


def test_unreadable_image_fails_with_a_message(biased_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code = main(
        [
            "predict",
            "--model",
            str(biased_checkpoint),
            "--image",
            str(bad),
            "--prompt",
            "Hi",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 2 and "not an image" in capsys.readouterr().err


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--help"])
    assert "example:" in capsys.readouterr().out
