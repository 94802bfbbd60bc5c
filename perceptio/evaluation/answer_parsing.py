"""Strict multiple-choice answer parsing: the one option letter a generated answer names, or None.

Lenient parsers that accept the right letter anywhere in the answer inflate scores ("A or B" would be right whatever
the truth). This parser scores an answer only when it names exactly one option letter.

The rule, applied to the generated text:

1. Spatial tokens (`[SEG]`, `<DEPTH_START>`, `<DEPTH_END>`, `<DEPTH_k>`) are replaced by a space.
2. A *letter mention* is an uppercase ASCII letter A-Z that stands alone: the characters on either side of it are
   not letters, digits, underscores or hyphens, and it is not joined to a word by an apostrophe. So "B", "(B)",
   "B.", "B)", "B:", "'B'", "Answer: B" and "The answer is (B)." all mention B, while "Bob", "X-ray", "I'm",
   "O'Neil" and "U2" mention nothing.
3. "A" and "I" are also English words (an article, a pronoun). A standalone "A" or "I" is read as that word, and is
   not a mention, when it is *bare* — not written "(A)" and not followed directly by ".", ")" or ":" — and is
   followed by whitespace and then a lowercase word other than a linking word (or, and, nor, vs, versus, is, are,
   was, has, seems, appears, looks), as in "A red sphere" or "I think". "A" as the whole answer, "(A)", "A.",
   "A)", "A:", "A, ...", "A or B" and "A is closer" all mention A.
4. The answer is the letter when the mentions name exactly one distinct letter and it is one of the first
   `num_choices` letters. No mention, two different letters ("A or B", "(A) ... (C)") or a letter outside the
   choices gives None, which callers score as wrong.

Lowercase letters never count ("b" and "(b)" give None): in free text they are ordinary words or list markers.
Reasoning that mentions other options ("Point A is nearer than B, so (A)") gives None: the answer is strict by
design, so ask for the letter alone in the prompt.
"""

from __future__ import annotations

import re
import string

from perceptio.models.perceptio.spatial_vocabulary_perceptio import SPATIAL_TOKEN_PATTERN


# An uppercase letter with no word character or hyphen touching it, and not part of a word joined by an apostrophe
# ("I'm", "O'Neil"); a quoted letter ('B') still stands alone.
STANDALONE_LETTER_PATTERN = re.compile(r"(?<![\w\-])(?<!\w['’])([A-Z])(?![\w\-])(?!['’]\w)")

# Letters that are also English words when followed by an ordinary lowercase word.
LETTERS_THAT_ARE_WORDS = frozenset({"A", "I"})

# Words after "A"/"I" which show the letter names an option ("A or B", "A is closer") rather than being a word.
LINKING_WORDS = frozenset({"or", "and", "nor", "vs", "versus", "is", "are", "was", "has", "seems", "appears", "looks"})

# Characters right after a letter that mark it as an option label: "A.", "A)", "A:".
LABEL_SUFFIXES = frozenset({".", ")", ":"})

# Whitespace then a lowercase word: what follows "A"/"I" when they are the article/pronoun.
FOLLOWING_WORD_PATTERN = re.compile(r"\s+([a-z]+)\b")

# A ground-truth answer: one letter, bare or in parentheses.
REFERENCE_PATTERN = re.compile(r"\(([A-Z])\)|([A-Z])")

MAX_CHOICES = len(string.ascii_uppercase)


def validate_num_choices(num_choices: int) -> int:
    """Return `num_choices` if it is an int in [1, 26], else raise ValueError saying what is accepted."""
    if isinstance(num_choices, bool) or not isinstance(num_choices, int):
        raise ValueError(f"num_choices must be an int between 1 and {MAX_CHOICES}; got {num_choices!r}.")
    if not 1 <= num_choices <= MAX_CHOICES:
        raise ValueError(f"num_choices must be between 1 and {MAX_CHOICES} (options A-Z); got {num_choices}.")
    return num_choices


def choice_letters(num_choices: int) -> str:
    """The option letters of a question with `num_choices` options: 'ABCD' for 4."""
    return string.ascii_uppercase[: validate_num_choices(num_choices)]


def remove_spatial_tokens(text: str) -> str:
    """Replace every spatial token with a space, so neighbouring text is never glued into a new word."""
    return SPATIAL_TOKEN_PATTERN.sub(" ", text)


def _is_english_word(text: str, match: re.Match) -> bool:
    """Whether a standalone "A"/"I" reads as the article/pronoun (see rule 3 of the module docstring)."""
    letter = match.group(1)
    if letter not in LETTERS_THAT_ARE_WORDS:
        return False
    start, end = match.span(1)
    parenthesised = text[start - 1 : start] == "(" and text[end : end + 1] == ")"
    labelled = text[end : end + 1] in LABEL_SUFFIXES
    if parenthesised or labelled:
        return False
    following = FOLLOWING_WORD_PATTERN.match(text, end)
    return following is not None and following.group(1) not in LINKING_WORDS


def mentioned_letters(text: str) -> list[str]:
    """The option-letter mentions in `text`, in order, after removing spatial tokens (rules 1-3 of the module)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str (the generated answer); got {type(text).__name__}.")
    cleaned = remove_spatial_tokens(text)
    return [
        match.group(1) for match in STANDALONE_LETTER_PATTERN.finditer(cleaned) if not _is_english_word(cleaned, match)
    ]


def parse_choice_letter(text: str, num_choices: int) -> str | None:
    """The option letter a generated answer names, or None when it names none, several, or one out of range.

    Args:
        text: the generated answer; may contain spatial tokens, which are ignored.
        num_choices: how many options the question has (letters A.. up to the `num_choices`-th).

    Returns:
        The letter, e.g. "B" for "(B)", "B", "B." or "The answer is (B).", else None. See the module docstring
        for the exact rule. Never raises for a str `text`; a bad `num_choices` raises ValueError.
    """
    letters = choice_letters(num_choices)
    mentions = set(mentioned_letters(text))
    if len(mentions) != 1:
        return None
    (letter,) = mentions
    return letter if letter in letters else None


def parse_reference_letter(reference: str, num_choices: int) -> str:
    """The letter of a ground-truth answer written "(A)" or "A"; raise ValueError for anything else."""
    letters = choice_letters(num_choices)
    if not isinstance(reference, str):
        raise ValueError(f"reference must be a str like '(A)' or 'A'; got {type(reference).__name__}.")
    match = REFERENCE_PATTERN.fullmatch(reference.strip())
    if match is None:
        raise ValueError(f"reference must be one option letter written like '(A)' or 'A'; got {reference!r}.")
    letter = match.group(1) or match.group(2)
    if letter not in letters:
        raise ValueError(f"reference {reference!r} is outside the {num_choices} choices ({', '.join(letters)}).")
    return letter
