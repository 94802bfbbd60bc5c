"""Teacher-forced answer scoring: how likely a model finds a given answer to a question about an image.

The inputs and labels are built by `PerceptioDataCollator` from rows of the dataset schema, so the scored sequence
is exactly what training feeds the model: the chat-formatted prompt with the image expanded, then the target and the
end-of-turn token. The target is the answer, without `[SEG]`s; a sample that asks for a depth block (as every
relative-depth question does) has the block of its `depth` map teacher-forced before its answer, as the model writes
it there, and only the answer and the end-of-turn token are scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...models.perceptio.loss_perceptio import per_sample_lm_loss
from ...models.perceptio.processing_perceptio import IGNORE_INDEX, PerceptioProcessor
from ...models.perceptio.spatial_vocabulary_perceptio import PerceptioSpatialVocabulary
from ...trainers.collator_perceptio import PerceptioDataCollator
from .resumable_run import batches


def answer_losses(
    model, processor: PerceptioProcessor, samples: Sequence[Mapping[str, Any]], batch_size: int
) -> list[float]:
    """Per sample, the mean cross-entropy of its answer tokens and end-of-turn token given its prompt and image.

    Each sample is a mapping with `image`, `prompt` and `answer` (the dataset schema), and no `masks`. One with
    `use_depth_block` also needs its `depth` map (metric, or `inverse_depth`): the block the model's depth tokenizer
    makes of it is teacher-forced between the prompt and the answer, and not scored. Samples go through the model
    `batch_size` at a time.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    for index, sample in enumerate(samples):
        masks = sample.get("masks")
        if masks is not None and len(masks):
            raise ValueError(
                f"Sample {index} has masks; answer_losses scores a text answer, so give each sample its image, "
                "prompt, answer and (for a depth block) its depth map, without masks."
            )
    with_depth_block = any(sample.get("use_depth_block") for sample in samples)
    depth_tokenizer = model.require_depth_tokenizer() if with_depth_block else None
    collator = PerceptioDataCollator(processor, depth_tokenizer=depth_tokenizer)
    losses: list[float] = []
    for chunk in batches(samples, batch_size):
        batch = collator(chunk)
        batch["labels"] = answer_labels(batch["labels"], collator.spatial_vocabulary)
        losses.extend(batch_answer_losses(model, batch))
    return losses


def answer_labels(labels: torch.LongTensor, vocabulary: PerceptioSpatialVocabulary) -> torch.LongTensor:
    """`labels` with the depth-block tokens ignored, so only the answer and the end-of-turn token are scored."""
    return labels.masked_fill(vocabulary.is_depth_block_token(labels), IGNORE_INDEX)


@torch.no_grad()
def batch_answer_losses(model, batch: Mapping[str, Any]) -> list[float]:
    """Per row of a right-padded collator batch, the mean cross-entropy of its labelled tokens.

    Only the positions from the batch's first labelled token on go through the LM head, so the (batch, length,
    vocabulary) logits of the image and prompt positions are never materialised.
    """
    labels = batch["labels"]
    labelled = labels != IGNORE_INDEX
    if not labelled.any(-1).all():
        raise ValueError("Every sample needs at least one labelled target token to be scored.")
    first = int(labelled.int().argmax(-1).min())
    inputs = {key: batch[key].to(model.device) for key in ("input_ids", "attention_mask")}
    if batch.get("pixel_values") is not None:
        inputs["pixel_values"] = batch["pixel_values"].to(model.device, model.dtype)
    # The kept logits (positions first - 1 ... length - 1) predict the labels from position first on.
    logits = model(**inputs, logits_to_keep=labels.shape[1] - first + 1).logits
    losses, _ = per_sample_lm_loss(logits, labels[:, first - 1 :].to(logits.device))
    return losses.tolist()
