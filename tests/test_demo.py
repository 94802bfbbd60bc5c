"""`perceptio demo` and `perceptio predict` on the embedded checkpoint, as a user runs them."""

from __future__ import annotations

import json

from PIL import Image

from perceptio.cli import main
from perceptio.embedded_checkpoint import embedded_checkpoint_path, example_scene, load_embedded_perceptio


def test_demo_writes_overlay_depth_and_json_at_the_scene_size(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Answer:" in printed
    size = example_scene().size
    with Image.open(tmp_path / "overlay.png") as overlay:
        assert overlay.size == size and overlay.mode == "RGB"
    result = json.loads((tmp_path / "prediction.json").read_text())
    assert result["prompt"].startswith("Where is")
    # The default prompt asks for depth, and the embedded checkpoint writes a depth block for it.
    assert result["depth_image"] == "depth.png"
    with Image.open(tmp_path / "depth.png") as depth:
        assert depth.size == size


def test_demo_on_a_user_image_and_bad_image(tmp_path):
    picture = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(picture)
    assert main(["demo", "--image", str(picture), "--output-dir", str(tmp_path / "out"), "--max-new-tokens", "8"]) == 0
    with Image.open(tmp_path / "out" / "overlay.png") as overlay:
        assert overlay.size == (40, 30)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["demo", "--image", str(broken), "--output-dir", str(tmp_path / "bad")]) == 2


def test_predict_defaults_to_the_embedded_checkpoint(tmp_path):
    picture = tmp_path / "scene.png"
    example_scene().save(picture)
    assert (
        main(
            [
                "predict",
                "--image",
                str(picture),
                "--prompt",
                "How many cubes are there?",
                "--output-dir",
                str(tmp_path / "out"),
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    assert (tmp_path / "out" / "prediction.json").is_file()


def test_embedded_checkpoint_is_small_and_loads():
    size = sum(path.stat().st_size for path in embedded_checkpoint_path().iterdir())
    assert size <= 25 * 1024 * 1024
    model, processor = load_embedded_perceptio()
    assert not model.training and processor.num_depth_codes == model.config.num_depth_codes
