"""bench/relative_depth_layers.py: readouts of the language model's hidden states, layer by layer, at three places."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from conftest import bench_script

from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.embedded_checkpoint import embedded_checkpoint_path


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("relative_depth_layers")


@pytest.fixture(scope="module")
def checkpoint():
    model, processor = load_perceptio_checkpoint(embedded_checkpoint_path())
    return model.eval(), processor


def test_each_place_holds_what_the_sequence_has_there(bench, checkpoint):
    model, processor = checkpoint
    rows = bench.render_questions(3)
    states = bench.sequence_states(model, processor, rows)
    num_layers = model.config.text_config.num_hidden_layers
    image, depth, answer = (states.places[place] for place in bench.PLACES)
    assert image.shape[:2] == depth.shape[:2] == answer.shape[:2] == (3, num_layers + 1)

    image_tokens = sys.modules["marker_probe"].checkpoint_tokens(model, processor, rows, "image")
    torch.testing.assert_close(image[:, 0], image_tokens)

    embeddings = model.get_input_embeddings().weight
    depth_code_ids = list(bench.PerceptioDataCollator(processor).spatial_vocabulary.depth_code_ids)
    assert depth.shape[2] == len(depth_code_ids), "one state per depth code of the block"
    distances = torch.cdist(depth[:, 0].reshape(-1, depth.shape[-1]), embeddings[depth_code_ids])
    assert distances.min(-1).values.max() < 1e-3, "layer 0 of the depth place is the depth codes' embeddings"

    opening = processor.tokenizer.convert_tokens_to_ids("(")
    torch.testing.assert_close(answer[:, 0, 0], embeddings[opening].expand(3, -1))
    assert states.letter_logits.shape == (3, len(bench.POINT_LETTERS))


def test_an_answer_without_a_point_letter_is_refused(bench, checkpoint):
    letters = bench.letter_token_ids(checkpoint[1])
    labels = torch.tensor([[bench.IGNORE_INDEX, 5, letters[1], 7], [bench.IGNORE_INDEX, 5, 6, 7]])
    with pytest.raises(ValueError, match="no point letter"):
        bench.answer_positions(labels, letters)
    assert bench.answer_positions(labels[:1], letters).tolist() == [1]


def test_prints_a_row_per_layer_for_each_checkpoint_and_the_ratio_to_the_base(bench, capsys):
    folder = str(embedded_checkpoint_path())
    arguments = ["--models", folder, folder, "--train-questions", "6", "--test-questions", "4", "--epochs", "1"]
    assert bench.main(arguments) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith(f"| {folder} |")]
    assert len(rows) == 10 and rows[:5] == rows[5:], "one row per layer; the same checkpoint scores the same"
    assert [row.split("|")[2].strip() for row in rows[:5]] == ["0", "1", "2", "3", "4"]
    assert re.search(r"own teacher-forced answer, [01]\.\d{3}", printed)
    assert re.search(r"/ base, readout at the answer position after the last layer: (1\.00|nan)", printed)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--train-questions", "0"], "--train-questions"),
        (["--test-questions", "1"], "--test-questions"),
        (["--epochs", "0"], "--epochs"),
        (["--heads", "0"], "--heads"),
    ],
)
def test_bad_arguments_are_refused_with_what_was_wrong(bench, arguments, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--models", str(embedded_checkpoint_path()), *arguments])
    assert message in capsys.readouterr().err
