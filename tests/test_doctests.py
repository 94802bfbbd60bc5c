"""The docstring examples (`>>>`) of the package's modules run and print what they say.

Every module file under `perceptio/` whose text holds `>>>` is imported and its examples run with `doctest`
(ELLIPSIS and NORMALIZE_WHITESPACE on). The metric scripts that `evaluate.load` reads from a path get the names
their examples use (`evaluate`, `metric_path`), as the module docstring of `metric_modules` shows.
"""

from __future__ import annotations

import doctest
import importlib
import io
from pathlib import Path

import evaluate
import pytest

import perceptio
from perceptio.evaluation.metric_modules import metric_path


PACKAGE_DIR = Path(perceptio.__file__).resolve().parent
METRIC_SCRIPTS_DIR = PACKAGE_DIR / "evaluation" / "metrics"
OPTION_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def module_name(path: Path) -> str:
    """The dotted name of a module file under the package."""
    return ".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)


MODULES_WITH_EXAMPLES = sorted(
    module_name(path) for path in PACKAGE_DIR.rglob("*.py") if ">>>" in path.read_text(encoding="utf-8")
)


def test_the_package_has_docstring_examples():
    assert "perceptio.tiny_models" in MODULES_WITH_EXAMPLES
    assert "perceptio.embedded_checkpoint" in MODULES_WITH_EXAMPLES


@pytest.mark.parametrize("name", MODULES_WITH_EXAMPLES)
def test_docstring_examples_run(name, single_torch_thread):
    module = importlib.import_module(name)
    globs = (
        {"evaluate": evaluate, "metric_path": metric_path}
        if METRIC_SCRIPTS_DIR in Path(module.__file__).parents
        else {}
    )
    tests = [test for test in doctest.DocTestFinder().find(module, extraglobs=globs) if test.examples]
    assert tests, f"{name} has '>>>' but doctest finds no example in its docstrings"
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=OPTION_FLAGS)
    for test in tests:
        runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()
