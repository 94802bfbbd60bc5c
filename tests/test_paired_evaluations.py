"""bench/paired_evaluations.py: two evaluations of the same questions compared question by question."""

from __future__ import annotations

import json

import pytest
from conftest import bench_script


@pytest.fixture(scope="module")
def paired_evaluations():
    yield from bench_script("paired_evaluations")


def write_samples(folder, records):
    folder.mkdir()
    (folder / "synthetic_samples.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


def colour_and_referring(correct, counts):
    answers = [{"sample_id": str(i), "task": "vqa_colour", "correct": value} for i, value in enumerate(correct)]
    masks = [
        {"sample_id": f"r{i}", "task": "referring", "intersection": inter, "union": union}
        for i, (inter, union) in enumerate(counts)
    ]
    return answers + masks


def test_prints_the_paired_difference_and_its_standard_error(paired_evaluations, tmp_path, capsys):
    baseline = write_samples(tmp_path / "a", colour_and_referring([1, 0, 0, 1], [(10, 20), (0, 20)]))
    candidate = write_samples(tmp_path / "b", colour_and_referring([1, 1, 0, 1], [(20, 20), (10, 20)]))
    assert paired_evaluations.main(["--baseline", str(baseline), "--candidate", str(candidate)]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line for line in capsys.readouterr().out.splitlines()}
    # Differences 0, 1, 0, 0: mean 0.25, sample standard deviation 0.5, over sqrt(4).
    assert rows["vqa_colour accuracy"] == "| vqa_colour accuracy | 4 | 0.500 | 0.750 | +0.250 ± 0.250 |"
    assert rows["referring cIoU"].startswith("| referring cIoU | 2 | 0.250 | 0.750 | +0.500 ± ")
    assert "n/a" in rows["vqa_shape accuracy"]


def test_prints_the_cious_of_each_kind_of_expression_the_samples_name(paired_evaluations, tmp_path, capsys):
    records = [colour_and_referring([], [(10, 20), (0, 20), (5, 10)]) for _ in range(2)]
    records[1][0]["intersection"] = 20
    for samples in records:
        for record, kind in zip(samples, ["attributes", "relation", None]):
            record["expression_kind"] = kind
    baseline, candidate = (write_samples(tmp_path / name, samples) for name, samples in zip("ab", records))
    assert paired_evaluations.main(["--baseline", str(baseline), "--candidate", str(candidate)]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["referring cIoU, attributes"].startswith(
        "| referring cIoU, attributes | 1 | 0.500 | 1.000 | +0.500 ± "
    )
    assert rows["referring cIoU, relation"].startswith("| referring cIoU, relation | 1 | 0.000 | 0.000 | +0.000 ± ")
    assert rows["referring cIoU"].startswith("| referring cIoU | 3 | 0.300 | 0.500 | +0.200 ± ")
    assert not any(name.startswith("referring cIoU, None") for name in rows)


def test_an_evaluation_against_itself_differs_by_nothing(paired_evaluations, tmp_path):
    records = colour_and_referring([1, 0, 1, 1, 0], [(3, 9), (5, 6), (0, 4)])
    samples = paired_evaluations.read_samples(write_samples(tmp_path / "a", records))
    assert paired_evaluations.paired_accuracy(samples, samples, "vqa_colour")["difference"] == 0
    figures = paired_evaluations.paired_ciou(samples, samples, resamples=50)
    assert figures["difference"] == 0 and figures["difference_se"] == 0


def test_the_cious_standard_error_is_its_bootstrap_spread(paired_evaluations, tmp_path):
    baseline = paired_evaluations.read_samples(write_samples(tmp_path / "a", colour_and_referring([], [(0, 10)] * 2)))
    candidate = paired_evaluations.read_samples(
        write_samples(tmp_path / "b", colour_and_referring([], [(10, 10), (0, 10)]))
    )
    figures = paired_evaluations.paired_ciou(baseline, candidate, resamples=4000)
    # A draw of two questions differs by 1 (the first twice), 0 (the second twice) or 0.5: standard deviation 0.354.
    assert figures["difference"] == 0.5
    assert figures["difference_se"] == pytest.approx(0.354, abs=0.02)


def test_refuses_evaluations_of_different_questions(paired_evaluations, tmp_path, capsys):
    baseline = write_samples(tmp_path / "a", colour_and_referring([1, 0], []))
    candidate = write_samples(tmp_path / "b", colour_and_referring([1, 0, 1], []))
    assert paired_evaluations.main(["--baseline", str(baseline), "--candidate", str(candidate)]) == 2
    assert "different samples" in capsys.readouterr().err


def test_names_a_folder_without_samples(paired_evaluations, tmp_path, capsys):
    baseline = write_samples(tmp_path / "a", colour_and_referring([1], []))
    assert paired_evaluations.main(["--baseline", str(baseline), "--candidate", str(tmp_path / "missing")]) == 2
    assert "missing/synthetic_samples.jsonl does not exist" in capsys.readouterr().err
