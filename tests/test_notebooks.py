"""The example notebooks run top to bottom, as committed, and show real pictures.

Each notebook is executed with nbclient in a fresh kernel, in a temporary folder, at its "small" size (the size
switch of its first code cell reads PERCEPTIO_NOTEBOOK_SIZE). The kernel gets one OpenMP thread: the tiny models run
several times faster so on CPU cores shared with other work.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image


REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
REPO_PATH = re.compile(r"(?<![\w./-])((?:examples|bench|docs|perceptio|tests)/[\w./+-]*[\w+-])")
NOTEBOOKS = ("quickstart.ipynb", "finetune.ipynb", "evaluate.ipynb")
SIZE_VARIABLE = "PERCEPTIO_NOTEBOOK_SIZE"
CELL_TIMEOUT_S = 300


def execute_notebook(name: str, folder: Path, monkeypatch: pytest.MonkeyPatch, size: str = "small"):
    """Run the notebook `name` in `folder` at `size`; return the executed notebook (errors fail the test)."""
    monkeypatch.setenv(SIZE_VARIABLE, size)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(EXAMPLES_DIR / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    client.execute()
    return notebook


def png_images(notebook) -> list[Image.Image]:
    """Every image/png output of the notebook, decoded."""
    images = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                images.append(Image.open(io.BytesIO(base64.b64decode(data["image/png"]))))
    return images


def text_output(notebook) -> str:
    """All stream and text/plain outputs, joined."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def assert_real_picture(image: Image.Image) -> None:
    """A decodable picture with some content: not empty and not a single colour."""
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 8 and pixels.shape[1] > 8
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 4, "the figure is blank"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_committed_without_outputs_and_have_a_size_switch(name):
    notebook = nbformat.read(EXAMPLES_DIR / name, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells), f"{name}: clear outputs"
    first = code_cells[0].source
    assert SIZE_VARIABLE in first and '"small"' in first and '"full"' in first, f"{name}: size switch first"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_name_only_files_that_exist(name):
    notebook = nbformat.read(EXAMPLES_DIR / name, as_version=4)
    text = "\n".join(cell.source for cell in notebook.cells)
    missing = sorted(path for path in set(REPO_PATH.findall(text)) if not (REPO_ROOT / path).exists())
    assert not missing, f"{name} names files that do not exist: {missing}"


def test_quickstart_runs_and_its_figures_hold_images(tmp_path, monkeypatch):
    notebook = execute_notebook("quickstart.ipynb", tmp_path, monkeypatch)
    images = png_images(notebook)
    # The bundled scene, its overlay + depth, the user image's overlay (+ depth), the decoded codes.
    assert len(images) >= 3
    for image in images:
        assert_real_picture(image)
    text = text_output(notebook)
    assert "Answer:" in text and "segmentation:" in text and "depth block:" in text
    assert "without the perceptio package: transformers_modules." in text


def test_finetune_trains_plots_losses_and_reloads_the_adapter(tmp_path, monkeypatch):
    notebook = execute_notebook("finetune.ipynb", tmp_path, monkeypatch)
    images = png_images(notebook)
    assert images, "the loss plot is missing"
    for image in images:
        assert_real_picture(image)
    text = text_output(notebook)
    assert "loss_lm" in text and "trainable params" in text
    assert "largest logit difference between the trained and the reloaded model" in text


def test_evaluate_runs_both_evaluations_and_shows_the_table(tmp_path, monkeypatch):
    notebook = execute_notebook("evaluate.ipynb", tmp_path, monkeypatch)
    tables = [
        output["data"]["text/markdown"]
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "text/markdown" in output.get("data", {})
    ]
    assert len(tables) == 1
    table = tables[0]
    assert "referring cIoU / gIoU" in table and "relative depth accuracy" in table
    mean_row = next(line for line in table.splitlines() if "mean accuracy" in line)
    assert mean_row.rstrip(" |").endswith("71.0"), "the paper's HardBLINK mean belongs next to ours"
    assert "hardblink_summary.json" in text_output(notebook) and "synthetic_summary.json" in text_output(notebook)


def test_an_unknown_size_is_refused(tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="PERCEPTIO_NOTEBOOK_SIZE must be one of"):
        execute_notebook("quickstart.ipynb", tmp_path, monkeypatch, size="huge")
