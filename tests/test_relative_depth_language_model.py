"""bench/relative_depth_language_model.py: the language model trained on relative-depth letters alone."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import bench_script

from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.embedded_checkpoint import embedded_checkpoint_path


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("relative_depth_language_model")


@pytest.fixture(scope="module")
def sequences(bench):
    model, processor = load_perceptio_checkpoint(embedded_checkpoint_path())
    model.eval()
    return model, bench.question_sequences(model, processor, bench.render_questions(8))


def test_another_image_changes_only_what_the_image_tokens_say(bench, sequences):
    model, questions = sequences
    language_model, head = bench.trainable_language_model(model, fresh=False, seed=0)
    language_model.eval()
    first = torch.arange(4)
    with torch.no_grad():
        own = bench.letter_logits(language_model, head, questions, first)
        itself = bench.letter_logits(language_model, head, questions, first, image_donors=first)
        swapped = bench.letter_logits(language_model, head, questions, first, image_donors=first + 4)
    torch.testing.assert_close(own, itself)
    assert not torch.allclose(own, swapped), "the answer position sees the image tokens"
    beyond = torch.arange(own.shape[1]) >= questions.num_points[first][:, None]
    assert torch.isinf(own[beyond]).all() and torch.isfinite(own[~beyond]).all(), "only the question's letters"


def test_fresh_weights_replace_the_checkpoints_and_training_fits_the_answers(bench, sequences):
    model, questions = sequences
    fresh, _ = bench.trainable_language_model(model, fresh=True, seed=0)
    assert fresh is not model.model.language_model
    reference = next(iter(model.model.language_model.state_dict().values()))
    assert not torch.equal(next(iter(fresh.state_dict().values())), reference)

    language_model, head = bench.trainable_language_model(model, fresh=True, seed=0)
    optimiser = torch.optim.AdamW([*language_model.parameters(), *head.parameters()], 3e-3)
    batch = torch.arange(8)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(
            bench.letter_logits(language_model, head, questions, batch), questions.answers[batch]
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], "eight questions' letters are learnable by heart"


def test_prints_the_evaluations_of_each_checkpoint_and_the_ratio_to_the_base(bench, capsys):
    folder = str(embedded_checkpoint_path())
    arguments = ["--models", folder, folder, "--train-questions", "6", "--test-questions", "4"]
    assert bench.main([*arguments, "--steps", "3", "--batch-size", "4", "--eval-every", "2"]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith(f"| {folder} |")]
    assert len(rows) == 6 and rows[:3] == rows[3:], "steps 0, 2 and the last; the same checkpoint scores the same"
    assert [row.split("|")[2].strip() for row in rows[:3]] == ["0", "2", "3"]
    assert "language model from the checkpoint's weights" in printed
    assert re.search(r"/ base, own image after 3 steps: (1\.00|nan)", printed)


def test_a_two_point_start_is_announced_and_refused_without_two_point_questions(bench, capsys):
    folder = str(embedded_checkpoint_path())
    arguments = [
        "--models",
        folder,
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--eval-every",
        "2",
        "--two-point-steps",
        "2",
    ]
    assert bench.main([*arguments, "--train-questions", "6", "--test-questions", "4"]) == 0
    assert "the first 2 steps on two points alone" in capsys.readouterr().out
    # The third rendered question, the only one trained on here, has three points.
    with pytest.raises(ValueError, match="none of the 1 training questions has two points"):
        bench.main([*arguments, "--train-questions", "1", "--test-questions", "2"])


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
    ],
)
def test_bad_arguments_are_refused_with_what_was_wrong(bench, arguments, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--models", str(embedded_checkpoint_path()), *arguments])
    assert message in capsys.readouterr().err
