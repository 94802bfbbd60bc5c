"""bench/relative_depth_planted.py: a fresh language model of a checkpoint's configuration on planted image tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import bench_script

from perceptio.data.synthetic_tasks import DEFAULT_TASK_CONFIG, POINT_LETTERS
from perceptio.embedded_checkpoint import embedded_checkpoint_path


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("relative_depth_planted")


@pytest.fixture(scope="module")
def text_config(bench):
    return bench.text_configuration(str(embedded_checkpoint_path()))


def test_each_question_marks_its_points_and_the_answer_is_the_closest(bench):
    questions = bench.plant_questions(64, 192, torch.Generator().manual_seed(0))
    margin = math.log1p(DEFAULT_TASK_CONFIG.depth_margin)
    for tokens, points, answer in zip(questions.tokens, questions.num_points.tolist(), questions.answers.tolist()):
        marked = (tokens[:, bench.MARKED_CHANNEL] == bench.MARK_SCALE).nonzero().squeeze(-1)
        assert len(marked) == points and 2 <= points <= len(POINT_LETTERS)
        letters = tokens[marked][:, : len(POINT_LETTERS)].argmax(-1)
        assert sorted(letters.tolist()) == list(range(points)), "each of the question's letters marks one cell"
        depths = tokens[marked, bench.DEPTH_CHANNEL][letters.argsort()]
        assert int(depths.argmin()) == answer
        runner_up = depths.sort().values[1]
        assert runner_up - depths.min() >= bench.MARK_SCALE * margin - 1e-4, "the closest point is clearly closest"
    assert 0 <= int(questions.depth_codes.min()) and int(questions.depth_codes.max()) < bench.DEPTH_CODE_LEVELS
    same = bench.plant_questions(64, 192, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same.tokens, questions.tokens)


def test_two_point_questions_have_two_points_and_either_answer(bench):
    questions = bench.plant_questions(64, 192, torch.Generator().manual_seed(3), num_points=2)
    assert (questions.num_points == 2).all()
    assert ((questions.tokens[..., bench.MARKED_CHANNEL] == bench.MARK_SCALE).sum(-1) == 2).all()
    assert set(questions.answers.tolist()) == {0, 1}


def test_the_reader_scores_only_the_questions_letters_and_sees_the_image_tokens(bench, text_config):
    questions = bench.plant_questions(6, text_config.hidden_size, torch.Generator().manual_seed(1))
    for depth_block in (False, True):
        reader = bench.PlantedReader(text_config, depth_block, seed=0).eval()
        with torch.no_grad():
            own = reader(questions)
            swapped = reader(questions, questions.tokens.roll(1, dims=0))
        beyond = torch.arange(len(POINT_LETTERS)) >= questions.num_points[:, None]
        assert torch.isinf(own[beyond]).all() and torch.isfinite(own[~beyond]).all()
        assert not torch.allclose(own[~beyond], swapped[~beyond]), "the answer position sees the image tokens"
    trainable = {name for name, parameter in reader.named_parameters() if parameter.requires_grad}
    assert not {"prefix", "depth_code_embeddings", "answer_start"} & trainable, "the text embeddings stay fixed"


def test_a_reader_learns_eight_questions_by_heart(bench, text_config):
    questions = bench.plant_questions(8, text_config.hidden_size, torch.Generator().manual_seed(2))
    reader = bench.PlantedReader(text_config, depth_block=True, seed=0)
    optimiser = torch.optim.AdamW(reader.parameters(), 3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(reader(questions), questions.answers)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_prints_one_table_row_per_evaluation_and_seed(bench, capsys):
    arguments = ["--train-questions", "8", "--test-questions", "4", "--steps", "3", "--batch-size", "4"]
    assert bench.main([*arguments, "--eval-every", "2", "--seeds", "0", "1"]) == 0
    printed = capsys.readouterr().out
    rows = [
        line.split("|")[1:3] for line in printed.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")
    ]
    assert [(seed.strip(), step.strip()) for seed, step in rows] == [
        ("0", "0"), ("0", "2"), ("0", "3"), ("1", "0"), ("1", "2"), ("1", "3"),
    ]  # fmt: skip
    assert "without a depth block; 4 layers of width 192" in printed
    assert bench.main([*arguments, "--eval-every", "3", "--two-point-steps", "2", "--depth-block"]) == 0
    assert "with a depth block, the first 2 steps on two points alone;" in capsys.readouterr().out


def test_a_folder_without_a_text_configuration_is_refused(bench, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "perceptio"}))
    with pytest.raises(ValueError, match="no text_config"):
        bench.text_configuration(str(tmp_path))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--train-questions", "0"], "--train-questions"),
        (["--test-questions", "1"], "--test-questions"),
        (["--steps", "0"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--eval-every", "0"], "--eval-every"),
        (["--learning-rate", "0"], "--learning-rate"),
        (["--two-point-steps", "-1"], "--two-point-steps"),
        (["--model", "/nonexistent"], "--model: /nonexistent"),
    ],
)
def test_bad_arguments_are_refused_with_what_was_wrong(bench, arguments, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(arguments)
    assert message in capsys.readouterr().err
