"""bench/gpu_report.py: with --tiny it runs on CPU and prints every row and column of the table (no figure is
checked); a missing feature or a spent time budget gives one line and an "unavailable" cell, not a crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bench_script


pytestmark = pytest.mark.usefixtures("single_torch_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_report.py"


@pytest.fixture(scope="module")
def gpu_report():
    yield from bench_script("gpu_report")


def table_cells(markdown: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in markdown.splitlines()]


def test_tiny_report_prints_every_row_and_column(gpu_report, capsys):
    report = gpu_report.main(["--tiny"])
    printed = capsys.readouterr().out
    lines = table_cells(printed[printed.index("| measurement") :])
    assert tuple(lines[0]) == gpu_report.COLUMNS
    rows = [line for line in lines[2:] if line != [""]]
    assert all(len(row) == len(gpu_report.COLUMNS) for row in rows)
    assert {row[0] for row in rows} == set(gpu_report.MEASUREMENTS)
    by_name = {name: [row for row in rows if row[0] == name] for name in gpu_report.MEASUREMENTS}
    assert len(by_name["prefill"]) == 2 and len(by_name["decode"]) == len(by_name["decode roofline"]) == 4
    decode_settings = " ".join(row[1] for row in by_name["decode"])
    assert (
        "batch 1" in decode_settings and "batch 8" in decode_settings and "static cache + compile" in decode_settings
    )
    # Every figure was measured on CPU, except the peak memory, which needs a CUDA counter.
    unavailable = [row[0] for row in rows if row[2] == gpu_report.UNAVAILABLE]
    assert unavailable == ["LoRA step peak memory"]
    assert "LoRA step peak memory" in printed.split("| measurement")[0], "the missing counter is said in one line"
    assert len(report.rows) == len(rows)


def tiny_settings(gpu_report, **changes):
    settings, _ = gpu_report.parse_settings(["--tiny", "--new-tokens", "3"])
    for name, value in changes.items():
        setattr(settings, name, value)
    return settings


def test_missing_compile_support_gives_one_line_and_an_unavailable_cell(gpu_report, monkeypatch, capsys):
    def older_transformers(static_cache=False, compile=False):
        raise ImportError("cannot import name 'CompileConfig' from 'transformers'")

    monkeypatch.setattr(gpu_report, "decoding_kwargs", older_transformers)
    report = gpu_report.Report(tiny_settings(gpu_report))
    model, _ = gpu_report.build_model(True, torch.device("cpu"))
    plain = gpu_report.plain_internvl(model)
    for compiled in (False, True):
        report.attempt(
            "decode", "batch 1", lambda c=compiled: gpu_report.measure_decode(report, model, plain, 1, c, 1e9)
        )
    assert [row.value == gpu_report.UNAVAILABLE for row in report.rows if row.measurement == "decode"] == [False, True]
    notices = [line for line in capsys.readouterr().out.splitlines() if "unavailable:" in line]
    assert len(notices) == 1 and "CompileConfig" in notices[0]


def test_each_row_is_printed_as_it_is_measured(gpu_report, capsys):
    report = gpu_report.Report(tiny_settings(gpu_report))
    report.attempt("prefill", "1 tiles", lambda: report.add("prefill", "1 tile", "3.0 ms"))
    printed = capsys.readouterr().out
    assert printed.startswith("[") and printed.rstrip().endswith("prefill | 1 tile | 3.0 ms |  |")


def test_rows_past_the_budget_are_skipped(gpu_report, capsys):
    report = gpu_report.Report(tiny_settings(gpu_report, budget_s=1e-9))
    report.attempt("prefill", "1 tiles", lambda: pytest.fail("a row past the budget must not run"))
    assert report.rows[0].value == gpu_report.UNAVAILABLE and "budget" in capsys.readouterr().out


def test_bad_arguments_raise(gpu_report):
    with pytest.raises(ValueError, match="--new-tokens must be at least 2"):
        gpu_report.parse_settings(["--tiny", "--new-tokens", "1"])
    with pytest.raises(ValueError, match="Unknown measurement"):
        gpu_report.Report(tiny_settings(gpu_report)).add("throughput", "", "")


def test_an_older_transformers_gives_one_line_and_status_2():
    older = (
        "import runpy, sys, transformers; transformers.__version__ = '4.50.0'; sys.argv = ['gpu_report.py', '--tiny'];"
        f" runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", older], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and not result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "transformers 4.50.0 is older than" in lines[0] and "requirements" in lines[0]


def test_wheel_script_refuses_a_malformed_python_version(tmp_path):
    script = SCRIPT.with_name("gpu_wheels.sh")
    result = subprocess.run(["bash", str(script), str(tmp_path / "wheels"), "312"], capture_output=True, text=True)
    assert result.returncode == 2 and "must look like 3.12" in result.stderr
    assert not (tmp_path / "wheels").exists(), "nothing is downloaded for a refused version"
