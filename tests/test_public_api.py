"""The package's public names: `from perceptio import PerceptioTrainer` works without slowing `import perceptio`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import perceptio


# Run in a fresh interpreter: this test session has imported the trainer already.
IMPORT_CHECK = """
import sys

import perceptio

assert "transformers.trainer" not in sys.modules, "import perceptio imported transformers.Trainer"
assert "perceptio.trainers.trainer_perceptio" not in sys.modules, "import perceptio imported the trainer"

from transformers import Trainer

from perceptio import PerceptioTrainer
from perceptio.trainers.trainer_perceptio import PerceptioTrainer as trainer_class

assert PerceptioTrainer is trainer_class and issubclass(PerceptioTrainer, Trainer)
"""


def test_perceptio_trainer_is_exported_and_imported_on_first_use():
    completed = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "PerceptioTrainer" in perceptio.__all__


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="module 'perceptio' has no attribute 'PerceptioTrainr'"):
        perceptio.PerceptioTrainr  # noqa: B018
