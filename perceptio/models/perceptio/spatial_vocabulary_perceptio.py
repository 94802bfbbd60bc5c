"""Perceptio's spatial vocabulary: the ids of its spatial tokens and the rules of the assistant format they make.

The assistant turn is `[SEG]`×n, then at most one depth block `<DEPTH_START> <DEPTH_k>×N <DEPTH_END>`, then text.
`PerceptioSpatialVocabulary` holds the ids of one tokenizer (or config) and is the one place that writes, checks and
reads that format; the processor, the config, the collator, the losses, the generation grammar and the
post-processing all take their ids and rules from it. A segmentation-only vocabulary (`num_depth_codes=0`) has
`[SEG]` and no depth tokens at all.

The processor imports it as a same-folder module (`from .spatial_vocabulary_perceptio import`), so a processor's
`save_pretrained` copies this file into the checkpoint with the processor's own.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch


SEG_TOKEN = "[SEG]"
DEPTH_START_TOKEN = "<DEPTH_START>"
DEPTH_END_TOKEN = "<DEPTH_END>"
DEPTH_CODE_TOKEN_TEMPLATE = "<DEPTH_{}>"
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"

# The spatial tokens as text, to keep them out of answers (and out of the answer text of a target).
SPATIAL_TOKEN_PATTERN = re.compile(r"\[SEG\]|<DEPTH_START>|<DEPTH_END>|<DEPTH_\d+>")

# The `PerceptioConfig` field that stores each vocabulary field; checkpoints keep these JSON names.
CONFIG_FIELD_NAMES = {
    "seg": "seg_token_id",
    "depth_start": "depth_start_token_id",
    "depth_end": "depth_end_token_id",
    "depth_code_offset": "depth_code_token_offset",
    "num_depth_codes": "num_depth_codes",
    "num_depth_tokens": "num_depth_tokens",
    "image_context": "image_token_id",
}
# The token each id field names, for error messages.
ID_FIELD_TOKENS = {
    "seg": SEG_TOKEN,
    "depth_start": DEPTH_START_TOKEN,
    "depth_end": DEPTH_END_TOKEN,
    "depth_code_offset": DEPTH_CODE_TOKEN_TEMPLATE.format(0),
    "image_context": IMAGE_CONTEXT_TOKEN,
}
DEPTH_ID_FIELDS = ("depth_start", "depth_end", "depth_code_offset")

# States of the generation grammar, the rows of `forbidden_next_tokens`. Outside a depth block (0-3), bit 0 says that
# `[SEG]` is no longer allowed and bit 1 that no further block is; inside one, codes are missing or all written.
WANTS_CODE = 4
WANTS_END = 5


def depth_code_tokens(num_depth_codes: int) -> list[str]:
    """The code tokens `<DEPTH_0>` … `<DEPTH_{K-1}>`, in id order (none for a segmentation-only vocabulary)."""
    if not _is_int(num_depth_codes) or num_depth_codes < 0:
        raise ValueError(f"num_depth_codes must be a non-negative integer, got {num_depth_codes!r}.")
    return [DEPTH_CODE_TOKEN_TEMPLATE.format(code) for code in range(num_depth_codes)]


def spatial_tokens(num_depth_codes: int) -> list[str]:
    """Every token Perceptio adds to a base tokenizer, in the order they get their (contiguous) ids."""
    depth_tokens = [DEPTH_START_TOKEN, DEPTH_END_TOKEN] if num_depth_codes else []
    return [
        IMAGE_START_TOKEN,
        IMAGE_END_TOKEN,
        IMAGE_CONTEXT_TOKEN,
        SEG_TOKEN,
        *depth_tokens,
        *depth_code_tokens(num_depth_codes),
    ]


def strip_spatial_tokens(text: str) -> str:
    """Remove every spatial token from `text` (the answer users read)."""
    return SPATIAL_TOKEN_PATTERN.sub("", text).strip()


@dataclass
class DepthBlocks:
    """Where the depth blocks of a labelled batch are, as index tensors into the (unshifted) labels."""

    samples: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor

    def __len__(self) -> int:
        return int(self.samples.numel())


@dataclass
class _DepthBlockScan:
    """Each row's first depth block, located with tensor operations only (no host sync): the count of
    `<DEPTH_START>`s, the position of the first one and of the first `<DEPTH_END>` from there on (the row length when
    there is none), and which positions hold `<DEPTH_END>`, codes, and non-codes between the two markers."""

    is_end: torch.Tensor
    is_code: torch.Tensor
    num_starts: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    non_codes_inside: torch.Tensor

    @property
    def num_inside(self) -> torch.Tensor:
        """Tokens between the first `<DEPTH_START>` and its `<DEPTH_END>` (or the end of the row)."""
        return self.ends - self.starts - 1


@dataclass(frozen=True)
class PerceptioSpatialVocabulary:
    r"""
    The spatial tokens of one tokenizer or config, and the rules of the assistant format they make.

    The format is `[SEG]`×n, then at most one depth block `<DEPTH_START>`, exactly N codes `<DEPTH_k>` (0 ≤ k < K),
    `<DEPTH_END>`, then text; `[SEG]` never follows the block. Code k has the id `depth_code_offset + k`. With
    `num_depth_codes=0` the vocabulary is segmentation-only: no depth tokens, so no depth block.

    Build it with `from_config` or `from_tokenizer` (`add_to_tokenizer` adds missing tokens first). The constructor
    checks the fields once and raises a `ValueError` naming what is wrong and what is accepted.

    Args:
        seg (`int`): id of `[SEG]`.
        depth_start, depth_end (`int`, *optional*): ids of `<DEPTH_START>` and `<DEPTH_END>`; `None` without depth.
        depth_code_offset (`int`, *optional*): id of `<DEPTH_0>`; `None` without depth.
        num_depth_codes (`int`, defaults to 0): K, the number of code tokens; 0 for a segmentation-only vocabulary.
        num_depth_tokens (`int`, *optional*, defaults to 0): N, the codes in one block; 0 without depth, `None` when
            the block length is not fixed (a processor that was not given it: any non-empty block is read).
        image_context (`int`, *optional*): id of `<IMG_CONTEXT>`, the token each image expands into.
    """

    seg: int
    depth_start: int | None = None
    depth_end: int | None = None
    depth_code_offset: int | None = None
    num_depth_codes: int = 0
    num_depth_tokens: int | None = 0
    image_context: int | None = None

    def __post_init__(self):
        for field in ("seg", *DEPTH_ID_FIELDS, "image_context"):
            value = getattr(self, field)
            if (value is not None or field == "seg") and (not _is_int(value) or value < 0):
                raise ValueError(
                    f"{field} (the id of {ID_FIELD_TOKENS[field]}) must be a non-negative integer, got {value!r}."
                )
        self.check_sizes(self.num_depth_codes, self.num_depth_tokens)
        named_ids = {
            ID_FIELD_TOKENS[field]: getattr(self, field)
            for field in ("seg", "depth_start", "depth_end", "image_context")
            if getattr(self, field) is not None
        }
        seen: dict[int, str] = {}
        for token, token_id in named_ids.items():
            if token_id in seen:
                raise ValueError(
                    f"{seen[token_id]} and {token} share the id {token_id}; the spatial token ids must be distinct."
                )
            seen[token_id] = token
        if self.depth_code_offset is not None:
            codes = range(self.depth_code_offset, self.depth_code_offset + self.num_depth_codes)
            for token, token_id in named_ids.items():
                if token_id in codes:
                    raise ValueError(
                        f"{token} (id {token_id}) falls inside the depth code ids [{codes.start}, {codes.stop}); "
                        "the other spatial token ids must lie outside the code ids."
                    )
        depth_ids = {field: getattr(self, field) for field in DEPTH_ID_FIELDS}
        if self.num_depth_codes and None in depth_ids.values():
            missing = [field for field, value in depth_ids.items() if value is None]
            raise ValueError(
                f"A vocabulary with depth codes (num_depth_codes={self.num_depth_codes}) needs {DEPTH_ID_FIELDS}; "
                f"missing: {missing}. A segmentation-only vocabulary has num_depth_codes=0 and none of them."
            )
        if not self.num_depth_codes and any(value is not None for value in depth_ids.values()):
            present = [field for field, value in depth_ids.items() if value is not None]
            raise ValueError(
                f"A segmentation-only vocabulary (num_depth_codes=0) has no depth tokens, but {present} are set; "
                "set num_depth_codes to K to have a depth block, or leave these None."
            )

    @staticmethod
    def check_sizes(num_depth_codes: int, num_depth_tokens: int | None) -> None:
        """Raise a `ValueError` unless K and N describe a depth block (K, N ≥ 1, or N `None`: not fixed) or none
        (both 0, a segmentation-only vocabulary). The config checks its fields with this before it has token ids."""
        if not _is_int(num_depth_codes) or num_depth_codes < 0:
            raise ValueError(
                "num_depth_codes must be a positive integer (or 0 for a segmentation-only vocabulary), got "
                f"{num_depth_codes!r}."
            )
        if num_depth_tokens is not None and (not _is_int(num_depth_tokens) or num_depth_tokens < 0):
            raise ValueError(
                "num_depth_tokens must be a positive integer (or 0 for a segmentation-only vocabulary, None when the "
                f"block length is not fixed), got {num_depth_tokens!r}."
            )
        if not num_depth_codes and num_depth_tokens != 0:
            raise ValueError(
                f"num_depth_codes is 0 (a segmentation-only vocabulary, without depth block) but num_depth_tokens is "
                f"{num_depth_tokens!r}; set num_depth_tokens=0 too, or both to positive values for a depth block."
            )
        if num_depth_codes and num_depth_tokens == 0:
            raise ValueError(
                f"num_depth_tokens must be a positive integer when there are depth codes (num_depth_codes="
                f"{num_depth_codes}), got 0; 0 is for a segmentation-only vocabulary (num_depth_codes=0)."
            )

    @classmethod
    def from_config(cls, config) -> PerceptioSpatialVocabulary:
        """The vocabulary of a `PerceptioConfig` (its `seg_token_id`, `depth_*` and `image_token_id` fields)."""
        return cls(**{field: getattr(config, name) for field, name in CONFIG_FIELD_NAMES.items()})

    def config_fields(self) -> dict[str, int | None]:
        """The `PerceptioConfig` keyword arguments that store this vocabulary (the inverse of `from_config`)."""
        return {name: getattr(self, field) for field, name in CONFIG_FIELD_NAMES.items()}

    @classmethod
    def from_tokenizer(
        cls, tokenizer, num_depth_codes: int, num_depth_tokens: int | None = None
    ) -> PerceptioSpatialVocabulary:
        """Look up the spatial tokens in a tokenizer that has them; the depth codes must have contiguous ids.

        `num_depth_tokens` is N when known; without depth codes it may be left `None` (there is no block: N = 0).
        """
        if not num_depth_codes and num_depth_tokens is None:
            num_depth_tokens = 0
        vocab = tokenizer.get_vocab()
        absent = [token for token in spatial_tokens(num_depth_codes) if token not in vocab]
        if absent:
            raise ValueError(
                f"The tokenizer lacks {len(absent)} spatial tokens (first: {absent[:3]}); "
                "add them with PerceptioSpatialVocabulary.add_to_tokenizer(tokenizer, num_depth_codes) first."
            )
        code_ids = [vocab[token] for token in depth_code_tokens(num_depth_codes)]
        offset = code_ids[0] if code_ids else None
        if code_ids and code_ids != list(range(offset, offset + num_depth_codes)):
            raise ValueError(
                "The depth code tokens <DEPTH_0>…<DEPTH_{K-1}> must have contiguous ids in this tokenizer; "
                f"found ids starting {code_ids[:4]}…"
            )
        return cls(
            seg=vocab[SEG_TOKEN],
            depth_start=vocab[DEPTH_START_TOKEN] if num_depth_codes else None,
            depth_end=vocab[DEPTH_END_TOKEN] if num_depth_codes else None,
            depth_code_offset=offset,
            num_depth_codes=num_depth_codes,
            num_depth_tokens=num_depth_tokens,
            image_context=vocab[IMAGE_CONTEXT_TOKEN],
        )

    @classmethod
    def add_to_tokenizer(
        cls, tokenizer, num_depth_codes: int, num_depth_tokens: int | None = None
    ) -> PerceptioSpatialVocabulary:
        """Add the missing spatial tokens to `tokenizer` as special tokens, then `from_tokenizer`.

        Tokens already present (a tokenizer saved by Perceptio) keep their ids; new depth codes get contiguous ids.
        """
        known = tokenizer.get_vocab()
        missing = [token for token in spatial_tokens(num_depth_codes) if token not in known]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        return cls.from_tokenizer(tokenizer, num_depth_codes, num_depth_tokens)

    def with_num_depth_tokens(self, num_depth_tokens: int | None) -> PerceptioSpatialVocabulary:
        """This vocabulary with block length N: itself when `num_depth_tokens` is `None` or its own N, a copy when its
        N is not fixed, and a `ValueError` when it fixes another N."""
        if num_depth_tokens is None or num_depth_tokens == self.num_depth_tokens:
            return self
        if self.num_depth_tokens is not None:
            raise ValueError(
                f"num_depth_tokens ({num_depth_tokens!r}) differs from this vocabulary's N ({self.num_depth_tokens}); "
                "the model, processor and collator must agree on the codes per depth block."
            )
        return dataclasses.replace(self, num_depth_tokens=num_depth_tokens)

    @property
    def has_depth_block(self) -> bool:
        """Whether this vocabulary has depth tokens (False for a segmentation-only one)."""
        return self.num_depth_codes > 0

    @property
    def depth_code_ids(self) -> range:
        """Ids of `<DEPTH_0>` … `<DEPTH_{K-1}>` (contiguous; empty without depth)."""
        offset = self.depth_code_offset or 0
        return range(offset, offset + self.num_depth_codes)

    @property
    def spatial_token_ids(self) -> list[int]:
        """Ids of `[SEG]`, `<DEPTH_START>`, `<DEPTH_END>` and the K codes, sorted."""
        markers = [self.seg, self.depth_start, self.depth_end]
        return sorted([token_id for token_id in markers if token_id is not None] + list(self.depth_code_ids))

    def depth_code_id(self, code: int) -> int:
        """Token id of depth code `code`, in [0, K)."""
        if not 0 <= code < self.num_depth_codes:
            raise ValueError(f"depth codes must lie in [0, {self.num_depth_codes}), got {code!r}.")
        return self.depth_code_ids.start + code

    def is_depth_code(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Whether each id is one of the K depth code tokens."""
        codes = self.depth_code_ids
        return (token_ids >= codes.start) & (token_ids < codes.stop)

    def is_depth_block_token(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Whether each id is `<DEPTH_START>`, `<DEPTH_END>` or one of the depth codes."""
        return (
            self.is_depth_code(token_ids) | _equals(token_ids, self.depth_start) | _equals(token_ids, self.depth_end)
        )

    def check_depth_codes(self, depth_codes: Sequence[int]) -> list[int]:
        """The codes of one depth block as ints, or a `ValueError`: there must be N of them (any number above 0
        when N is not fixed), each in [0, K)."""
        if not self.has_depth_block:
            raise ValueError(
                "This vocabulary is segmentation-only (num_depth_codes=0): it has no depth block to write codes into."
            )
        codes = [int(code) for code in depth_codes]
        if self.num_depth_tokens is not None and len(codes) != self.num_depth_tokens:
            raise ValueError(
                f"a depth block has {len(codes)} codes but exactly {self.num_depth_tokens} codes (num_depth_tokens) "
                "are needed."
            )
        if not codes:
            raise ValueError("a depth block needs at least one code, got none.")
        outside = [code for code in codes if not 0 <= code < self.num_depth_codes]
        if outside:
            raise ValueError(f"depth codes must lie in [0, {self.num_depth_codes}), got {outside[:5]}.")
        return codes

    def depth_block(self, depth_codes: Sequence[int]) -> list[int]:
        """The token ids of the depth block that holds `depth_codes`: `<DEPTH_START>`, the codes, `<DEPTH_END>`."""
        codes = self.check_depth_codes(depth_codes)
        return [self.depth_start, *(self.depth_code_id(code) for code in codes), self.depth_end]

    def format_target(self, num_seg: int, depth_codes: Sequence[int] | None, answer: str) -> str:
        """The assistant text in the format's fixed order: `[SEG]`×num_seg, then the depth block of `depth_codes`
        (none when `None`), then the answer.

        >>> vocabulary = PerceptioSpatialVocabulary(0, 1, 2, depth_code_offset=3, num_depth_codes=4, num_depth_tokens=2)
        >>> vocabulary.format_target(2, [3, 0], "Two cubes.")
        '[SEG][SEG]<DEPTH_START><DEPTH_3><DEPTH_0><DEPTH_END>Two cubes.'
        """
        if not _is_int(num_seg) or num_seg < 0:
            raise ValueError(f"num_seg must be a non-negative integer, got {num_seg!r}.")
        if not isinstance(answer, str):
            raise ValueError(f"answer must be a string, got {type(answer).__name__}.")
        if SPATIAL_TOKEN_PATTERN.search(answer):
            raise ValueError(f"answer must be plain text without spatial tokens, got {answer!r}.")
        parts = [SEG_TOKEN] * num_seg
        if depth_codes is not None:
            parts.append(DEPTH_START_TOKEN)
            parts.extend(DEPTH_CODE_TOKEN_TEMPLATE.format(code) for code in self.check_depth_codes(depth_codes))
            parts.append(DEPTH_END_TOKEN)
        parts.append(answer)
        return "".join(parts)

    def _scan_depth_blocks(self, token_ids: torch.LongTensor) -> _DepthBlockScan:
        """Locate the first depth block of each row of `token_ids` (batch, length): see `_DepthBlockScan`."""
        length = token_ids.shape[1]
        positions = torch.arange(length, device=token_ids.device)
        is_start = _equals(token_ids, self.depth_start)
        is_end = _equals(token_ids, self.depth_end)
        is_code = self.is_depth_code(token_ids)
        # Counting the positions before a row's first match gives its index, or `length` when it has none: the first
        # `<DEPTH_START>`, then the first `<DEPTH_END>` from there on.
        starts = (is_start.cumsum(1) == 0).sum(1)
        ends = ((is_end & (positions >= starts[:, None])).cumsum(1) == 0).sum(1)
        inside = (positions > starts[:, None]) & (positions < ends[:, None])
        return _DepthBlockScan(
            is_end=is_end,
            is_code=is_code,
            num_starts=is_start.sum(1),
            starts=starts,
            ends=ends,
            non_codes_inside=inside & ~is_code,
        )

    def find_depth_blocks(self, labels: torch.LongTensor) -> DepthBlocks:
        """Locate the depth blocks of labelled targets (batch, length), checking each target is well-formed.

        A target holds at most one block, `<DEPTH_START>`, exactly N codes and `<DEPTH_END>`, nothing else in between
        and no `<DEPTH_END>` without a start; otherwise a `ValueError` names the first bad sample. Runs as tensor
        operations on the labels' device with one host read per batch (a single device sync on an accelerator),
        since it runs every training step.
        """
        if not self.has_depth_block:
            # Nothing to find, and no host read: a segmentation-only model trains without a sync per step.
            empty = labels.new_zeros(0)
            return DepthBlocks(samples=empty, starts=empty, ends=empty)
        if self.num_depth_tokens is None:
            raise ValueError(
                "Finding depth blocks needs N, the codes per block, which this vocabulary does not fix; "
                "use vocabulary.with_num_depth_tokens(N)."
            )
        batch, length = labels.shape
        scan = self._scan_depth_blocks(labels)
        single = scan.num_starts == 1
        has_end = scan.ends < length
        holds_non_codes = scan.non_codes_inside.any(1)
        has_block = single & has_end & ~holds_non_codes & (scan.num_inside == self.num_depth_tokens)
        malformed = (scan.num_starts > 1) | ((scan.num_starts == 0) & scan.is_end.any(1)) | (single & ~has_block)
        # The one host read: the first malformed sample (`batch` when none) and the number of blocks, which sizes the
        # index tensors so they are built without a further sync.
        sample, num_blocks = torch.stack([(malformed.cumsum(0) == 0).sum(), has_block.sum()]).tolist()
        if sample < batch:
            num_starts = int(scan.num_starts[sample])
            if num_starts > 1:
                raise ValueError(f"Sample {sample} has {num_starts} depth blocks; at most one is allowed.")
            if num_starts == 0:
                raise ValueError(f"Sample {sample} has <DEPTH_END> without <DEPTH_START>.")
            if not has_end[sample]:
                raise ValueError(f"Sample {sample}: its depth block has no <DEPTH_END>.")
            if holds_non_codes[sample]:
                shown = labels[sample][scan.non_codes_inside[sample]][:5].tolist()
                raise ValueError(
                    f"Sample {sample}: its depth block holds non-code tokens {shown}; only <DEPTH_k> with k in "
                    f"[0, {self.num_depth_codes}) may stand between <DEPTH_START> and <DEPTH_END>."
                )
            raise ValueError(
                f"Sample {sample}: its depth block has {int(scan.num_inside[sample])} codes but exactly "
                f"{self.num_depth_tokens} (num_depth_tokens) are needed."
            )
        samples = torch.nonzero_static(has_block, size=num_blocks).flatten()
        return DepthBlocks(samples=samples, starts=scan.starts[samples], ends=scan.ends[samples])

    def read_depth_block(self, token_ids: Sequence[int]) -> tuple[list[int] | None, bool, bool]:
        """Read the depth block of one generated sequence: (codes, truncated, malformed).

        The codes are those of a complete block (N of them, or any number above 0 when N is not fixed), else `None`.
        Truncated: a block was opened and the sequence ended inside it, every token so far a code. Malformed: any other
        use of the depth tokens (a stray code or marker, a wrong count, a second block), which only generation without
        the grammar can produce.
        """
        ids = torch.tensor([list(token_ids)], dtype=torch.long)
        scan = self._scan_depth_blocks(ids)
        num_starts, start, end = int(scan.num_starts[0]), int(scan.starts[0]), int(scan.ends[0])
        num_ends, num_codes = int(scan.is_end.sum()), int(scan.is_code.sum())
        num_inside, only_codes_inside = end - start - 1, not scan.non_codes_inside.any()
        length = self.num_depth_tokens
        if not num_starts:
            return None, False, bool(num_ends or num_codes)
        if end == ids.shape[1]:
            codes_before = bool(scan.is_code[0, :start].any())
            stray = num_starts > 1 or num_ends > 0 or not only_codes_inside or codes_before
            stray = stray or (length is not None and num_inside > length)
            return None, not stray, stray
        wrong = num_starts > 1 or num_ends > 1 or num_codes != num_inside or not only_codes_inside
        wrong = wrong or not num_inside or (length is not None and num_inside != length)
        if wrong:
            return None, False, True
        return (ids[0, start + 1 : end] - self.depth_code_ids.start).tolist(), False, False

    def forbidden_next_tokens(self, vocab_size: int) -> torch.Tensor:
        """The format's next-token rule as a (6, vocab_size) table: row s holds the tokens grammar state s forbids.

        Codes and `<DEPTH_END>` only inside a block; inside, codes until N are written, then only `<DEPTH_END>`.
        """
        token_ids = torch.arange(vocab_size)
        code = self.is_depth_code(token_ids)
        end = _equals(token_ids, self.depth_end)
        start = _equals(token_ids, self.depth_start)
        seg = token_ids == self.seg
        outside = code | end
        return torch.stack(
            [
                outside,  # [SEG] and a block allowed
                outside | seg,  # a block allowed ([SEG] comes before the first block)
                outside | start,  # [SEG] allowed (no more blocks)
                outside | start | seg,  # text only (after the last allowed block, or no image)
                ~code,  # WANTS_CODE: inside a block, codes missing
                ~end,  # WANTS_END: inside a block, all codes written
            ]
        )

    def grammar_states(
        self, generated: torch.LongTensor, max_depth_blocks: int, without_image: torch.Tensor | None = None
    ) -> torch.LongTensor:
        """The grammar state (a row of `forbidden_next_tokens`) of each row of generated ids (batch, length).

        At most `max_depth_blocks` blocks, `[SEG]` only before the first, and neither in rows flagged
        `without_image`. Computed from counts, so it holds no memory of earlier steps; valid for sequences that obey
        the grammar so far. Needs N fixed.
        """
        is_code = self.is_depth_code(generated)
        blocks_started = _equals(generated, self.depth_start).sum(-1)
        blocks_ended = _equals(generated, self.depth_end).sum(-1)
        # Under the grammar codes occur only inside blocks, so the open block holds all codes not in closed blocks.
        codes_in_open_block = is_code.sum(-1) - blocks_ended * self.num_depth_tokens
        in_block = blocks_started > blocks_ended
        wants_code = in_block & (codes_in_open_block < self.num_depth_tokens)
        wants_end = in_block & ~wants_code
        seg_forbidden = blocks_started > 0
        start_forbidden = blocks_started >= max_depth_blocks
        if without_image is not None:
            seg_forbidden, start_forbidden = seg_forbidden | without_image, start_forbidden | without_image
        outside_state = seg_forbidden.long() + 2 * start_forbidden.long()
        return torch.where(wants_code, WANTS_CODE, torch.where(wants_end, WANTS_END, outside_state))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _equals(token_ids: torch.Tensor, token_id: int | None) -> torch.Tensor:
    """`token_ids == token_id`, all False when the vocabulary has no such token."""
    if token_id is None:
        return torch.zeros_like(token_ids, dtype=torch.bool)
    return token_ids == token_id


__all__ = ["DepthBlocks", "PerceptioSpatialVocabulary"]
