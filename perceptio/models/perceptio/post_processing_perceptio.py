"""Perceptio output post-processing: generated ids -> answer text, masks and depth at the original image size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .image_processing_perceptio import to_rgb_array
from .spatial_vocabulary_perceptio import strip_spatial_tokens


@dataclass
class PerceptioParsedGeneration:
    """The spatial structure of one generated sequence, before masks and depth are decoded.

    Attributes:
        text: the answer with every spatial and special token removed.
        num_seg_tokens: number of `[SEG]` tokens that get a mask: all of them but a `seg_truncated` one.
        seg_truncated: the sequence ended (max_new_tokens) right after a `[SEG]`, with no end-of-turn token. That
            `[SEG]` was never fed back to the model, so it has no hidden state and gets no mask (as in Sa2VA).
        depth_codes: the N codes of a complete depth block, else `None`.
        depth_truncated: a depth block was opened but the sequence ended (max_new_tokens or EOS) before it closed.
        depth_malformed: a depth block has the wrong number of codes, a stray code or marker, or there are several
            blocks (only possible with the grammar switched off); its depth is `None`.
        token_ids: the generated ids up to (not including) the end-of-turn token.
    """

    text: str
    num_seg_tokens: int
    seg_truncated: bool
    depth_codes: list[int] | None
    depth_truncated: bool
    depth_malformed: bool
    token_ids: list[int]


@dataclass
class PerceptioPrediction:
    """Perceptio's answer for one sample.

    Attributes:
        text: the answer, spatial tokens removed.
        masks: one boolean (H, W) array per `[SEG]`, at the original image size, in generation order.
        mask_scores: SAM2's predicted IoU of each mask.
        depth: float32 (H, W) map decoded from the depth block at the original image size, in the depth tokenizer's
            normalised [-1, 1] space where larger = nearer; `None` without a complete depth block.
        depth_codes: the N depth codes, or `None`.
        token_ids: the generated ids (prompt excluded, up to the end-of-turn token).
        seg_truncated: the last generated token is a `[SEG]` without a mask, cut off before the model read it (raise
            `max_new_tokens`).
        depth_truncated: a depth block was cut short (raise `max_new_tokens`).
        depth_malformed: a depth block broke the grammar (generation with `spatial_grammar=False`).
    """

    text: str
    masks: list[np.ndarray] = field(default_factory=list)
    mask_scores: list[float] = field(default_factory=list)
    depth: np.ndarray | None = None
    depth_codes: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    seg_truncated: bool = False
    depth_truncated: bool = False
    depth_malformed: bool = False

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary: text, codes, flags, token ids, and per mask its score and pixel area."""
        return {
            "text": self.text,
            "num_masks": len(self.masks),
            "mask_scores": [float(score) for score in self.mask_scores],
            "mask_areas": [int(mask.sum()) for mask in self.masks],
            "mask_size": list(self.masks[0].shape) if self.masks else None,
            "depth_size": list(self.depth.shape) if self.depth is not None else None,
            "depth_range": [float(self.depth.min()), float(self.depth.max())] if self.depth is not None else None,
            "depth_codes": self.depth_codes,
            "seg_truncated": self.seg_truncated,
            "depth_truncated": self.depth_truncated,
            "depth_malformed": self.depth_malformed,
            "token_ids": self.token_ids,
        }


class PerceptioPostProcessingMixin:
    """Adds `parse_generation`, `post_process_generation` and `image_sizes` to `PerceptioProcessor`.

    Needs the processor's `tokenizer` and `spatial_vocabulary`, which reads the depth block. A processor that was
    not given N (codes per depth block, a model setting) accepts blocks of any length: pass `num_depth_tokens` so a
    block of the wrong length counts as malformed.
    """

    def image_sizes(self, images: Any) -> list[tuple[int, int]]:
        """(height, width) of each image (one image or a list), as `post_process_generation` wants them."""
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        return [tuple(to_rgb_array(image).shape[:2]) for image in image_list]

    def parse_generation(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        num_depth_tokens: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> PerceptioParsedGeneration:
        """Split one generated sequence (prompt excluded) into `[SEG]` count, depth block and answer text.

        Reading stops at the first stop token (`stop_token_ids`, the ids generation stopped at; by default the
        tokenizer's EOS); padding after it is ignored. A sequence without one that ends in `[SEG]` was cut right after
        that token, which then gets no mask (`seg_truncated`). With `num_depth_tokens` (the model's N; the processor's
        own when it has one) a block with another number of codes is malformed; without either any non-empty block is
        accepted.
        """
        vocabulary = self.spatial_vocabulary.with_num_depth_tokens(num_depth_tokens)
        ids = _as_id_list(token_ids)
        stops = self._stop_token_ids(stop_token_ids)
        end = next((position for position, token in enumerate(ids) if token in stops), None)
        ended = end is not None
        if ended:
            ids = ids[:end]
        seg_truncated = not ended and bool(ids) and ids[-1] == vocabulary.seg
        codes, truncated, malformed = vocabulary.read_depth_block(ids)
        return PerceptioParsedGeneration(
            text=strip_spatial_tokens(self.tokenizer.decode(ids, skip_special_tokens=True)),
            num_seg_tokens=sum(token == vocabulary.seg for token in ids) - seg_truncated,
            seg_truncated=seg_truncated,
            depth_codes=codes,
            depth_truncated=truncated,
            depth_malformed=malformed,
            token_ids=ids,
        )

    def _stop_token_ids(self, stop_token_ids: Sequence[int] | int | None) -> set[int]:
        """The ids that end a generated answer: those given, or the tokenizer's EOS."""
        if stop_token_ids is None:
            eos = self.tokenizer.eos_token_id
            return set() if eos is None else {eos}
        stops = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids)
        if not all(isinstance(token, int) and not isinstance(token, bool) for token in stops):
            raise ValueError(f"stop_token_ids must be token ids (ints), got {stop_token_ids!r}.")
        return set(stops)

    def post_process_generation(
        self,
        generated_ids: torch.Tensor | Sequence[Sequence[int]],
        original_sizes: Sequence[tuple[int, int]] | None = None,
        mask_logits: Sequence[torch.Tensor] | None = None,
        mask_scores: Sequence[torch.Tensor] | None = None,
        depth_maps: Sequence[torch.Tensor | None] | None = None,
        mask_threshold: float = 0.0,
        prompt_length: int = 0,
        num_depth_tokens: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[PerceptioPrediction]:
        r"""
        Turn generated ids plus the model's mask logits and decoded depth into one `PerceptioPrediction` per sample.

        Args:
            generated_ids: (B, T) ids; pass `prompt_length` when they still include the prompt (`model.generate`).
            original_sizes: (height, width) per sample (`image_sizes(images)`); masks and depth are resized to it.
                Required when masks or depth are given.
            mask_logits, mask_scores: per sample, low-res logits (num_seg, h, w) and scores (num_seg,) from
                `model.predict_masks`; each sample needs one mask per `[SEG]` but a `seg_truncated` one. `None`: no
                masks (text only).
            depth_maps: per sample, the decoded normalised depth (S, S) or `None`; must be given for each complete
                depth block.
            mask_threshold: logits above it are foreground.
            prompt_length: number of leading prompt positions to skip in each row.
            num_depth_tokens: the model's N (`model.config.num_depth_tokens`); see `parse_generation`.
            stop_token_ids: the ids generation stopped at (`model.stop_token_ids(tokenizer)`); see `parse_generation`.
        """
        _check_prompt_length(prompt_length)
        rows = [_as_id_list(row)[prompt_length:] for row in _as_rows(generated_ids)]
        batch = len(rows)
        _check_per_sample("original_sizes", original_sizes, batch)
        _check_per_sample("mask_logits", mask_logits, batch)
        _check_per_sample("mask_scores", mask_scores, batch)
        _check_per_sample("depth_maps", depth_maps, batch)
        if (mask_logits is None) != (mask_scores is None):
            raise ValueError("Pass mask_logits and mask_scores together (both from model.predict_masks), or neither.")
        if not isinstance(mask_threshold, (int, float)) or isinstance(mask_threshold, bool):
            raise ValueError(f"mask_threshold must be a number, got {mask_threshold!r}.")
        predictions = []
        for index, ids in enumerate(rows):
            parsed = self.parse_generation(ids, num_depth_tokens, stop_token_ids)
            size = None if original_sizes is None else _check_size(original_sizes[index], index)
            masks, scores = self._masks(
                index, parsed, mask_logits, mask_scores, size, mask_threshold, self._mask_upsample_size()
            )
            predictions.append(
                PerceptioPrediction(
                    text=parsed.text,
                    masks=masks,
                    mask_scores=scores,
                    depth=self._depth(index, parsed, depth_maps, size),
                    depth_codes=parsed.depth_codes,
                    token_ids=parsed.token_ids,
                    seg_truncated=parsed.seg_truncated,
                    depth_truncated=parsed.depth_truncated,
                    depth_malformed=parsed.depth_malformed,
                )
            )
        return predictions

    def _mask_upsample_size(self) -> int | None:
        """The SAM2 input side when the image processor asks for Sa2VA's two-step mask resize, else `None`."""
        image_processor = getattr(self, "image_processor", None)
        if getattr(image_processor, "sam_mask_upsample", False):
            return image_processor.sam_image_size
        return None

    @staticmethod
    def _masks(
        index, parsed, mask_logits, mask_scores, size, threshold, upsample_size=None
    ) -> tuple[list[np.ndarray], list[float]]:
        if mask_logits is None:
            return [], []
        logits, scores = mask_logits[index], mask_scores[index]
        if logits.shape[0] != parsed.num_seg_tokens or scores.shape[0] != parsed.num_seg_tokens:
            raise ValueError(
                f"Sample {index} has {parsed.num_seg_tokens} [SEG] token(s) but {logits.shape[0]} mask(s) and "
                f"{scores.shape[0]} score(s); each [SEG] needs exactly one."
            )
        if logits.shape[0] == 0:
            return [], []
        if size is None:
            raise ValueError(f"Sample {index} has masks; pass original_sizes so they come back at the image size.")
        logits = logits[:, None].float()
        if upsample_size is not None:
            logits = F.interpolate(logits, size=(upsample_size, upsample_size), mode="bilinear", align_corners=False)
        resized = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[:, 0]
        return [mask.cpu().numpy() for mask in resized > threshold], [float(score) for score in scores]

    @staticmethod
    def _depth(index, parsed, depth_maps, size) -> np.ndarray | None:
        if parsed.depth_codes is None:
            return None
        depth = None if depth_maps is None else depth_maps[index]
        if depth is None:
            raise ValueError(
                f"Sample {index} has a complete depth block but no depth map was given; decode its codes with the "
                "model's depth tokenizer (model.predict does)."
            )
        if depth.ndim != 2:
            raise ValueError(f"Sample {index}: a depth map must be (S, S), got shape {tuple(depth.shape)}.")
        if size is None:
            raise ValueError(f"Sample {index} has depth; pass original_sizes so it comes back at the image size.")
        resized = F.interpolate(depth[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
        return resized.cpu().numpy().astype(np.float32)


def _as_rows(generated_ids: Any) -> list[Any]:
    if torch.is_tensor(generated_ids):
        if generated_ids.ndim != 2:
            raise ValueError(
                f"generated_ids must be a (batch, length) tensor, got shape {tuple(generated_ids.shape)}."
            )
        return list(generated_ids)
    if isinstance(generated_ids, (list, tuple)) and all(
        isinstance(row, (list, tuple)) or torch.is_tensor(row) for row in generated_ids
    ):
        return list(generated_ids)
    raise ValueError("generated_ids must be a (batch, length) tensor or a list of id lists.")


def _as_id_list(token_ids: Any) -> list[int]:
    if torch.is_tensor(token_ids):
        if token_ids.ndim != 1 or token_ids.dtype.is_floating_point:
            raise ValueError(
                f"token ids must be a 1-D integer tensor, got {token_ids.dtype} {tuple(token_ids.shape)}."
            )
        return token_ids.tolist()
    if isinstance(token_ids, (list, tuple)) and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in token_ids
    ):
        return [int(t) for t in token_ids]
    raise ValueError("token ids must be a 1-D integer tensor or a list of ints.")


def _check_prompt_length(prompt_length: Any) -> None:
    if not isinstance(prompt_length, int) or isinstance(prompt_length, bool) or prompt_length < 0:
        raise ValueError(f"prompt_length must be a non-negative integer, got {prompt_length!r}.")


def _check_per_sample(name: str, values: Any, batch: int) -> None:
    if values is not None and len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries for {batch} generated sequences; give one per sample.")


def _check_size(size: Any, index: int) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(side, (int, np.integer)) and not isinstance(side, bool) and side > 0 for side in size)
    ):
        raise ValueError(f"original_sizes[{index}] must be (height, width) positive integers, got {size!r}.")
    return int(size[0]), int(size[1])


__all__ = ["PerceptioParsedGeneration", "PerceptioPostProcessingMixin", "PerceptioPrediction"]
