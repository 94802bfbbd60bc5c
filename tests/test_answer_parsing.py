"""The strict multiple-choice parser and the accuracy built on it."""

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perceptio.evaluation.answer_parsing import (
    mentioned_letters,
    parse_choice_letter,
    parse_reference_letter,
    remove_spatial_tokens,
)
from perceptio.evaluation.multiple_choice import multiple_choice_accuracy, multiple_choice_summary


SPATIAL_TOKENS = ["[SEG]", "<DEPTH_START>", "<DEPTH_END>", "<DEPTH_0>", "<DEPTH_17>", "<DEPTH_127>"]
ANSWER_FORMS = ["{}", "({})", "{}.", "{})", "Answer: {}", "The answer is ({}).", "The answer is {}.", " **{}** \n"]

letters_of_four = st.sampled_from("ABCD")
spatial_prefix = st.lists(st.sampled_from(SPATIAL_TOKENS), max_size=6).map("".join)
# Text built from the pieces the parser reacts to, so random cases reach its edge cases, not just noise.
answer_like_text = st.lists(
    st.sampled_from(SPATIAL_TOKENS + ["A", "I", "B", "Z", "(", ")", ".", ":", "'", "-", " ", "\n", "or", "red", "is"])
    | st.text(max_size=3),
    max_size=30,
).map("".join)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(B)", "B"),
        ("B", "B"),
        ("B.", "B"),
        ("The answer is (B).", "B"),
        ("Answer: C", "C"),
        ("'D'", "D"),
        ("[SEG]<DEPTH_START><DEPTH_4><DEPTH_9><DEPTH_END>(A)", "A"),
        ("A", "A"),
        ("A.", "A"),
        ("(A)", "A"),
        ("A is closer to the camera.", "A"),
        ("A red sphere is closer, so the answer is (B).", "B"),
        ("I think it is C.", "C"),
        ("I'm sure it is D", "D"),
    ],
)
def test_one_unambiguous_letter_is_read(text, expected):
    assert parse_choice_letter(text, 4) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A or B",
        "B or A",
        "(A) or (C)",
        "A and B are both close",
        "Point A is nearer than B, so (A).",
        "A red sphere",
        "I think so",
        "b",
        "(b)",
        "E",
        "The answer is (E).",
        "Bob took an X-ray.",
        "[SEG]<DEPTH_START><DEPTH_4><DEPTH_END>",
    ],
)
def test_no_letter_several_letters_or_out_of_range_is_none(text):
    assert parse_choice_letter(text, 4) is None


def test_article_a_and_pronoun_i_are_words_only_before_an_ordinary_word():
    assert mentioned_letters("A red sphere, I think") == []
    assert mentioned_letters("A or I") == ["A", "I"]
    assert mentioned_letters("A. red sphere (I) I: A)") == ["A", "I", "I", "A"]


def test_spatial_tokens_are_replaced_by_a_space_not_glued():
    assert remove_spatial_tokens("see<DEPTH_3>B") == "see B"
    assert parse_choice_letter("see<DEPTH_3>B", 2) == "B"


@settings(max_examples=300)
@given(text=st.text(max_size=200) | answer_like_text, num_choices=st.integers(1, 26))
def test_arbitrary_text_never_raises_and_gives_a_named_letter_or_none(text, num_choices):
    letter = parse_choice_letter(text, num_choices)
    assert letter is None or (letter in string.ascii_uppercase[:num_choices] and letter in text)


@given(
    text=st.text(alphabet=st.characters(blacklist_characters=string.ascii_uppercase), max_size=100),
    num_choices=st.integers(1, 26),
)
def test_text_without_uppercase_letters_is_none(text, num_choices):
    assert parse_choice_letter(text, num_choices) is None


@given(letter=letters_of_four, form=st.sampled_from(ANSWER_FORMS), prefix=spatial_prefix)
def test_every_answer_form_after_spatial_tokens_is_read(letter, form, prefix):
    assert parse_choice_letter(prefix + form.format(letter), 4) == letter


@given(
    first=letters_of_four,
    second=letters_of_four,
    joiner=st.sampled_from([" or ", ", ", " and ", " / ", " vs "]),
    wrap=st.sampled_from(["{}", "({})"]),
)
def test_two_different_letters_are_none(first, second, joiner, wrap):
    text = wrap.format(first) + joiner + wrap.format(second)
    expected = first if first == second else None
    assert parse_choice_letter(text, 4) == expected


@settings(max_examples=200)
@given(text=st.text(max_size=100) | answer_like_text, other=letters_of_four)
def test_naming_another_letter_after_a_read_answer_makes_it_none(text, other):
    letter = parse_choice_letter(text, 4)
    if letter is not None and other != letter:
        assert parse_choice_letter(f"{text} or ({other})", 4) is None


@given(letter=letters_of_four, text=st.text(max_size=60) | answer_like_text)
def test_appending_a_letter_never_yields_a_different_letter(letter, text):
    assert parse_choice_letter(f"{text} ({letter})", 4) in (letter, None)


@given(
    words=st.lists(st.sampled_from(["the", "red", "sphere", "is", "closer", "(B)", "A", "so"]), max_size=12),
    token=st.sampled_from(SPATIAL_TOKENS),
    position=st.integers(0, 12),
)
def test_spatial_tokens_between_words_do_not_change_the_answer(words, token, position):
    text = " ".join(words)
    with_token = " ".join(words[:position] + [token] + words[position:])
    assert parse_choice_letter(with_token, 4) == parse_choice_letter(text, 4)


@pytest.mark.parametrize("num_choices", [0, 27, "4", 2.0, True])
def test_bad_num_choices_raise(num_choices):
    with pytest.raises(ValueError, match="num_choices"):
        parse_choice_letter("A", num_choices)


def test_non_string_answer_raises():
    with pytest.raises(ValueError, match="str"):
        parse_choice_letter(None, 4)


def test_reference_forms():
    assert parse_reference_letter("(C)", 4) == "C"
    assert parse_reference_letter(" B ", 4) == "B"
    for bad in ["(E)", "C or D", "c", "", "(A"]:
        with pytest.raises(ValueError, match="reference"):
            parse_reference_letter(bad, 4)


def test_accuracy_scores_only_unambiguous_right_letters():
    predictions = ["(B)", "A or B", "<DEPTH_START><DEPTH_1><DEPTH_END>A.", "The answer is (C).", "A red cube"]
    references = ["(B)", "(A)", "(A)", "(C)", "(A)"]
    # Right: samples 0, 2, 3. Unreadable: 1 (two letters) and 4 (article only).
    assert multiple_choice_accuracy(predictions, references, 4) == pytest.approx(3 / 5)
    assert multiple_choice_summary(predictions, references, 4) == {
        "accuracy": pytest.approx(3 / 5),
        "num_samples": 5,
        "num_unparsed": 2,
    }


def test_accuracy_with_per_sample_choice_counts():
    # "C" is valid with 3 choices but outside 2 choices.
    assert multiple_choice_accuracy(["C", "C"], ["(C)", "(A)"], [3, 2]) == pytest.approx(1 / 2)


@pytest.mark.parametrize(
    ("predictions", "references", "num_choices", "message"),
    [
        (["A"], ["(A)", "(B)"], 2, "one entry per sample"),
        ([], [], 2, "empty"),
        (["A"], ["(C)"], 2, "sample 0"),
        (["A", "B"], ["(A)", "(B)"], [2], "one int per sample"),
        ([None], ["(A)"], 2, "str"),
    ],
)
def test_accuracy_bad_input_raises(predictions, references, num_choices, message):
    with pytest.raises(ValueError, match=message):
        multiple_choice_accuracy(predictions, references, num_choices)
