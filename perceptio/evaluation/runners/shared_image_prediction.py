"""Batched prediction in which the SAM2 image encoder runs once per distinct image of the batch.

Referring benchmarks ask several sentences about one image. `model.predict` encodes each prompt's SAM2 view
separately, so a batch holding five sentences of one image would run the SAM2 encoder five times.
`encode_each_distinct_sam_image` wraps the model's `sam_image_embeddings` for the duration of a call: rows of
`sam_pixel_values` that are equal (the same image) are encoded once and
their features are gathered back to every row that shows them. The outputs are the same as without it; only repeated work is removed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


def distinct_row_indices(batch: torch.Tensor) -> tuple[list[int], list[int]]:
    """The first index of each distinct row of `batch`, and for every row the position of its distinct row."""
    firsts: list[int] = []
    positions: list[int] = []
    for index in range(batch.shape[0]):
        match = next((slot for slot, first in enumerate(firsts) if torch.equal(batch[index], batch[first])), None)
        if match is None:
            firsts.append(index)
            match = len(firsts) - 1
        positions.append(match)
    return firsts, positions


@contextmanager
def encode_each_distinct_sam_image(model) -> Iterator[None]:
    """Within the block, `model.sam_image_embeddings` encodes each distinct image of a batch once."""
    encode = model.sam_image_embeddings

    def encode_distinct(sam_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        firsts, positions = distinct_row_indices(sam_pixel_values)
        if len(firsts) == sam_pixel_values.shape[0]:
            return encode(sam_pixel_values)
        levels = encode(sam_pixel_values[firsts])
        gather = torch.tensor(positions, device=levels[0].device)
        return [level.index_select(0, gather) for level in levels]

    model.sam_image_embeddings = encode_distinct
    try:
        yield
    finally:
        del model.sam_image_embeddings


def predict_batch(model, processor, images: Sequence[Any], prompts: Sequence[str], predict_kwargs: dict) -> list:
    """`model.predict` on one batch (one image per prompt), SAM2-encoding each distinct image once."""
    with encode_each_distinct_sam_image(model):
        return model.predict(list(images), list(prompts), processor=processor, **predict_kwargs)
