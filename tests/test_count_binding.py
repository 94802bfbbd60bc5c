"""bench/count_binding.py: the oracle count arm's language model fitted on count questions alone, scored held-in and
held-out with each question's own and another's image."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import bench_script

from perceptio.trainers.synthetic_recipe import build_recipe_processor
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("count_binding")


def test_a_fit_prints_and_saves_each_evaluation_with_both_images(bench, tmp_path, capsys):
    arguments = ["--output-dir", str(tmp_path), "--questions", "6", "--held-out", "4", "--steps", "2"]
    assert bench.main([*arguments, "--kind", "all", "--eval-every", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == 3 and all("held-out loss" in line for line in lines)
    figures = json.loads((tmp_path / "all-6.json").read_text(encoding="utf-8"))
    assert [evaluation["step"] for evaluation in figures["evaluations"]] == [0, 1, 2]
    first, last = figures["evaluations"][0], figures["evaluations"][-1]
    assert last["held_in_own"]["loss"] < first["held_in_own"]["loss"], "the held-in questions are being fitted"
    assert first["held_in_own"]["loss"] != first["held_in_other"]["loss"], "the other image changes the tokens"
    assert figures["settings"]["kind"] == "all"


@pytest.mark.parametrize(("count", "sizes"), [(2, [2]), (64, [64]), (65, [65]), (66, [64, 2]), (300, [64] * 4 + [44])])
def test_every_evaluation_batch_holds_another_row_to_take_an_image_from(bench, count, sizes):
    batches = bench.evaluation_batches(count)
    assert [len(batch) for batch in batches] == sizes
    assert [index for batch in batches for index in batch] == list(range(count))


def test_the_kinds_split_the_count_questions_by_whether_they_name_an_attribute(bench):
    assert bench.asks_for_all_objects(json.dumps({"query": {"size": None, "colour": None, "shape": None}}))
    assert not bench.asks_for_all_objects(json.dumps({"query": {"size": None, "colour": "red", "shape": None}}))


def test_class_words_make_the_objects_tokens_the_language_models_word_embeddings(bench):
    processor = build_recipe_processor(SyntheticTinyRecipe())
    tokenizer = processor.tokenizer
    embeddings = torch.nn.Embedding(len(tokenizer), 8)
    word_ids = bench.class_word_ids(tokenizer, embeddings)
    cube, cubes = (bench.single_token_id(tokenizer, word) for word in ("cube", "cubes"))
    assert torch.equal(embeddings.weight[cube], embeddings.weight[cubes]), "a plural starts as its singular"
    tokens = bench.ClassWordTokens(bench.OracleImageTokens(8, centres=True), embeddings, word_ids)
    attributes = torch.tensor([[0, 1, 0]])  # colour, shape and size class ids of one object
    cover = torch.tensor([[1.0, 0.0]])  # one token, all object
    with torch.no_grad():
        tokens.oracle.centre.zero_()
    token = tokens(cover, attributes, torch.zeros(1, 1))
    expected = sum(embeddings.weight[ids[attributes[0, index]]] for index, ids in enumerate(word_ids))
    assert torch.allclose(token[0], expected)
    assert any(weight is embeddings.weight for weight in tokens.parameters()), "the words train with the tokens"


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ([], "attribute-64"),
        (["--class-words", "--kind", "objects"], "objects-64-class-words"),
        (
            ["--text-num-attention-heads", "8", "--learning-rate", "3e-4", "--seed", "2"],
            "attribute-64-heads8-lr0.0003-seed2",
        ),
    ],
)
def test_fits_with_other_settings_save_their_figures_under_other_names(bench, options, name):
    assert bench.figures_name(bench.parse_arguments(["--output-dir", "out", *options])) == name


def test_the_heads_asked_for_reach_the_recipes_language_model(bench, tmp_path, capsys):
    assert bench.main(["--output-dir", str(tmp_path), "--text-num-attention-heads", "7"]) == 1
    assert "text_num_attention_heads must be None or a positive integer dividing" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--steps", "0"], "must be a positive integer"),
        (["--learning-rate", "0"], "--learning-rate must be > 0"),
        (["--held-out", "1"], "--held-out must be at least 2"),
        (["--text-num-attention-heads", "0"], "must be a positive integer"),
    ],
)
def test_bad_settings_are_refused_with_what_was_wrong(bench, option, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--output-dir", "out", *option])
    assert message in capsys.readouterr().err
