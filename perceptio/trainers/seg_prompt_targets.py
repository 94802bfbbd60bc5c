"""Target SAM2 prompts for `[SEG]`s: what the grounding stage's attribute prompts say each phrase should prompt.

The grounding stage (`grounding_pretraining`) trains SAM2 jointly with an `AttributePromptEmbedding`, so SAM2 learns
to segment the object a sum of attribute embeddings names. In the main stage the `[SEG]` prompt must reach the same
place through `text_hidden_fcs`, and the mask loss alone, back-propagated through the frozen decoder, moves it there
slowly. `loss_seg_prompt` supervises the prompt directly: for a `[SEG]` whose phrase names its object alone, the
target is the attribute prompt of the attributes that phrase names.
"""

from __future__ import annotations

import json

import torch
from datasets import Dataset, Sequence, Value

from ..data.seg_attributes import SEG_ATTRIBUTE_COLUMN
from .grounding_pretraining import AttributePromptEmbedding


SEG_PROMPT_COLUMN = "seg_prompt_targets"
# Referring kinds whose every phrase picks out its object alone, as the grounding stage's prompts always do; the other
# kinds' phrases ("the cylinder" of "the cylinder farthest from the camera") may name several objects.
PROMPT_TARGET_KINDS = ("attributes", "conjunction")


def add_seg_prompt_column(dataset: Dataset, prompt_embedding: AttributePromptEmbedding) -> Dataset:
    """Add `seg_prompt_targets`: per mask of a `PROMPT_TARGET_KINDS` referring row, `prompt_embedding` of its
    `seg_attributes` row; a row of NaN for every other mask (no target).

    Raises:
        ValueError: `dataset` has no `seg_attributes` column (add it with `add_seg_attribute_column`).
    """
    if SEG_ATTRIBUTE_COLUMN not in dataset.column_names:
        raise ValueError(
            f"The dataset has no {SEG_ATTRIBUTE_COLUMN!r} column; add it with "
            "perceptio.data.seg_attributes.add_seg_attribute_column first."
        )
    device = next(prompt_embedding.parameters()).device
    features = dataset.features.copy()
    features[SEG_PROMPT_COLUMN] = Sequence(Sequence(Value("float32")))

    def targets(meta: str, seg_attributes: list[list[int]]) -> dict:
        if not seg_attributes:
            return {SEG_PROMPT_COLUMN: []}
        with torch.no_grad():
            prompts = prompt_embedding(torch.tensor(seg_attributes, dtype=torch.long, device=device)).cpu()
        if json.loads(meta).get("kind") not in PROMPT_TARGET_KINDS:
            prompts = torch.full_like(prompts, float("nan"))
        return {SEG_PROMPT_COLUMN: prompts.tolist()}

    return dataset.map(
        targets, input_columns=["meta", SEG_ATTRIBUTE_COLUMN], features=features, desc="[SEG] prompt targets"
    )


__all__ = ["PROMPT_TARGET_KINDS", "SEG_PROMPT_COLUMN", "add_seg_prompt_column"]
