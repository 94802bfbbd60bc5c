"""Perceptio's spatial-token vocabulary and the assistant-target format (segmentation, then depth, then text)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


SEG_TOKEN = "[SEG]"
DEPTH_START_TOKEN = "<DEPTH_START>"
DEPTH_END_TOKEN = "<DEPTH_END>"
DEPTH_CODE_TOKEN_TEMPLATE = "<DEPTH_{}>"
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"

_SPATIAL_TOKEN_PATTERN = re.compile(r"\[SEG\]|<DEPTH_START>|<DEPTH_END>|<DEPTH_\d+>")


def depth_code_tokens(num_depth_codes: int) -> list[str]:
    """The code tokens `<DEPTH_0>` … `<DEPTH_{K-1}>`, in id order."""
    if not isinstance(num_depth_codes, int) or num_depth_codes <= 0:
        raise ValueError(f"num_depth_codes must be a positive integer, got {num_depth_codes!r}.")
    return [DEPTH_CODE_TOKEN_TEMPLATE.format(code) for code in range(num_depth_codes)]


def spatial_vocabulary(num_depth_codes: int) -> list[str]:
    """Every token Perceptio adds to a base tokenizer, in the order they get their (contiguous) ids."""
    return [
        IMAGE_START_TOKEN,
        IMAGE_END_TOKEN,
        IMAGE_CONTEXT_TOKEN,
        SEG_TOKEN,
        DEPTH_START_TOKEN,
        DEPTH_END_TOKEN,
        *depth_code_tokens(num_depth_codes),
    ]


@dataclass(frozen=True)
class SpatialTokenIds:
    """Token ids of the spatial vocabulary in one tokenizer."""

    image_start: int
    image_end: int
    image_context: int
    seg: int
    depth_start: int
    depth_end: int
    depth_code_offset: int
    num_depth_codes: int

    def depth_code_id(self, code: int) -> int:
        """Token id of depth code `code`."""
        return self.depth_code_offset + code

    def is_depth_code(self, token_id: int) -> bool:
        """Whether `token_id` is one of the K depth code tokens."""
        return self.depth_code_offset <= token_id < self.depth_code_offset + self.num_depth_codes


def add_spatial_tokens(tokenizer, num_depth_codes: int) -> SpatialTokenIds:
    """Add the spatial vocabulary to `tokenizer` as special tokens and return their ids.

    Tokens already present (a tokenizer saved by Perceptio) keep their ids. The depth codes must end up contiguous
    so that code `k` is `depth_code_token_offset + k`; a tokenizer where they are not raises a `ValueError`.
    """
    vocabulary = spatial_vocabulary(num_depth_codes)
    known = tokenizer.get_vocab()
    missing = [token for token in vocabulary if token not in known]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return spatial_token_ids(tokenizer, num_depth_codes)


def spatial_token_ids(tokenizer, num_depth_codes: int) -> SpatialTokenIds:
    """Look up the spatial-token ids in a tokenizer that already has them; check the depth codes are contiguous."""
    vocab = tokenizer.get_vocab()
    vocabulary = spatial_vocabulary(num_depth_codes)
    absent = [token for token in vocabulary if token not in vocab]
    if absent:
        raise ValueError(
            f"The tokenizer lacks {len(absent)} spatial tokens (first: {absent[:3]}); "
            "call add_spatial_tokens(tokenizer, num_depth_codes) first."
        )
    code_ids = [vocab[token] for token in depth_code_tokens(num_depth_codes)]
    offset = code_ids[0]
    if code_ids != list(range(offset, offset + num_depth_codes)):
        raise ValueError(
            "The depth code tokens <DEPTH_0>…<DEPTH_{K-1}> must have contiguous ids in this tokenizer; "
            f"found ids starting {code_ids[:4]}…"
        )
    return SpatialTokenIds(
        image_start=vocab[IMAGE_START_TOKEN],
        image_end=vocab[IMAGE_END_TOKEN],
        image_context=vocab[IMAGE_CONTEXT_TOKEN],
        seg=vocab[SEG_TOKEN],
        depth_start=vocab[DEPTH_START_TOKEN],
        depth_end=vocab[DEPTH_END_TOKEN],
        depth_code_offset=offset,
        num_depth_codes=num_depth_codes,
    )


def format_assistant_target(
    num_seg: int,
    depth_codes: Sequence[int] | None,
    answer: str,
    num_depth_codes: int,
    num_depth_tokens: int | None = None,
) -> str:
    """The assistant text in Perceptio's fixed order: `[SEG]`×num_seg, then the depth block, then the answer.

    >>> format_assistant_target(2, [3, 0], "Two cubes.", num_depth_codes=4)
    '[SEG][SEG]<DEPTH_START><DEPTH_3><DEPTH_0><DEPTH_END>Two cubes.'
    """
    if not isinstance(num_seg, int) or isinstance(num_seg, bool) or num_seg < 0:
        raise ValueError(f"num_seg must be a non-negative integer, got {num_seg!r}.")
    if not isinstance(answer, str):
        raise ValueError(f"answer must be a string, got {type(answer).__name__}.")
    if _SPATIAL_TOKEN_PATTERN.search(answer):
        raise ValueError(f"answer must be plain text without spatial tokens, got {answer!r}.")
    parts = [SEG_TOKEN] * num_seg
    if depth_codes is not None:
        codes = [int(code) for code in depth_codes]
        if num_depth_tokens is not None and len(codes) != num_depth_tokens:
            raise ValueError(f"a depth block needs exactly {num_depth_tokens} codes, got {len(codes)}.")
        if not codes:
            raise ValueError("a depth block needs at least one code, got none.")
        bad = [code for code in codes if not 0 <= code < num_depth_codes]
        if bad:
            raise ValueError(f"depth codes must lie in [0, {num_depth_codes}), got {bad[:5]}.")
        parts.append(DEPTH_START_TOKEN)
        parts.extend(DEPTH_CODE_TOKEN_TEMPLATE.format(code) for code in codes)
        parts.append(DEPTH_END_TOKEN)
    parts.append(answer)
    return "".join(parts)


def strip_spatial_tokens(text: str) -> str:
    """Remove every spatial token from `text` (the answer users read)."""
    return _SPATIAL_TOKEN_PATTERN.sub("", text).strip()
