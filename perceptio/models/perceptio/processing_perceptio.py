"""PerceptioProcessor: images + prompts -> model inputs, and assistant targets -> training labels."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .post_processing_perceptio import PerceptioPostProcessingMixin
from .spatial_vocabulary_perceptio import (
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_START_TOKEN,
    PerceptioSpatialVocabulary,
)


IGNORE_INDEX = -100
PADDING_SIDES = ("left", "right")
# `padding` as transformers' tokenizers take it; False and "do_not_pad" need prompts of one length.
PADDINGS = (True, False, "longest", "max_length", "do_not_pad")
NO_TRUNCATION = (None, False, "do_not_truncate")
RETURN_TENSORS = ("pt", "np")

# ChatML, as InternVL's Qwen2 backbones use; an image item becomes the `<image>` placeholder the processor expands.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>"


class PerceptioProcessor(PerceptioPostProcessingMixin, ProcessorMixin):
    r"""
    Turns images and prompts into Perceptio inputs, and (image, prompt, target) triples into training examples.

    The tokenizer gets the spatial vocabulary (`[SEG]`, `<DEPTH_START>`, `<DEPTH_END>`, `<DEPTH_0>`…`<DEPTH_{K-1}>`
    and InternVL's image tokens) as special tokens with contiguous depth-code ids; `spatial_vocabulary` holds their
    ids and the format's rules. With `num_depth_codes=0` it is segmentation-only: `[SEG]` and the image tokens. Each
    `<image>` in a prompt is expanded to `<img>` + `<IMG_CONTEXT>` × (tiles × image_seq_length) + `</img>`.

    Args:
        image_processor ([`PerceptioImageProcessor`]): tiles and SAM2 views.
        tokenizer: any fast tokenizer of the base LLM.
        chat_template (`str`, *optional*): Jinja chat template; ChatML by default.
        num_depth_codes (`int`, defaults to 128): K, the number of depth code tokens; 0 for segmentation only.
        image_seq_length (`int`, defaults to 256): `<IMG_CONTEXT>` tokens per tile (the model's `image_seq_length`).
        num_depth_tokens (`int`, *optional*): N, the codes per depth block (the model's `num_depth_tokens`). When
            given, targets and generations are checked against it; otherwise any non-empty block is accepted unless
            `parse_generation` is told N.
        text_before_images (`bool`, defaults to False): put the prompt's text before its images in the user turn.
            InternVL and Sa2VA put the images first; with the question first, each image token can attend to the
            question (the language model is causal), so a small model learns which object a phrase names far sooner.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_depth_codes: int = 128,
        image_seq_length: int = 256,
        num_depth_tokens: int | None = None,
        text_before_images: bool = False,
        **kwargs,
    ):
        if not isinstance(image_seq_length, int) or image_seq_length <= 0:
            raise ValueError(f"image_seq_length must be a positive integer, got {image_seq_length!r}.")
        if not isinstance(text_before_images, bool):
            raise ValueError(f"text_before_images must be True or False, got {text_before_images!r}.")
        self.text_before_images = text_before_images
        # Kept as given: `save_pretrained` writes the `__init__` arguments found among the attributes.
        self.num_depth_codes = num_depth_codes
        self.num_depth_tokens = num_depth_tokens
        self.image_seq_length = image_seq_length
        self.spatial_vocabulary = PerceptioSpatialVocabulary.add_to_tokenizer(
            tokenizer, num_depth_codes, num_depth_tokens
        )
        if tokenizer.pad_token is None:
            raise ValueError("The tokenizer needs a pad token (set tokenizer.pad_token) so batches can be padded.")
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE, **kwargs)

    def format_prompt(self, text: str, num_images: int = 1) -> str:
        """A user turn with `num_images` images and `text` (in the order `text_before_images` says), followed by the
        assistant header (chat template)."""
        _check_prompt(text, 0)
        if not isinstance(num_images, int) or num_images < 0:
            raise ValueError(f"num_images must be a non-negative integer, got {num_images!r}.")
        images = [{"type": "image"}] * num_images
        if self.text_before_images:
            # The template ends an image with a newline; the text gets one so the two stay apart the same way.
            content = [{"type": "text", "text": f"{text}\n" if num_images else text}, *images]
        else:
            content = [*images, {"type": "text", "text": text}]
        return self.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs):
        """transformers' `apply_chat_template`; with `text_before_images`, each turn's text comes before its images,
        whatever order its content lists them in, so a chat prompt is the prompt the model was trained on."""
        if self.text_before_images:
            conversation = _text_first(conversation)
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    def format_target(self, num_seg: int, depth_codes: Sequence[int] | None, answer: str) -> str:
        """The assistant target in the fixed order `[SEG]`s → depth block → answer."""
        return self.spatial_vocabulary.format_target(num_seg, depth_codes, answer)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        videos: None = None,
        audio: None = None,
        padding: bool | str = True,
        padding_side: str = "left",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        truncation: bool | str | None = None,
        add_special_tokens: bool = False,
        return_attention_mask: bool = True,
        max_num_tiles: int | None = None,
        max_patches: int | None = None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        r"""
        Tokenize prompts (with their `<image>` placeholders expanded) and pre-process their images.

        `images` is one image, a flat list (assigned to the `<image>` placeholders in order) or a list with one
        list of images per prompt. A prompt with no placeholder gets one image in front when the batch has exactly
        one image per prompt. Batches are left-padded for generation (`padding_side="right"` for training).

        The other arguments are transformers' usual ones:

        - `padding` (`True`/"longest", "max_length" with `max_length`, or `False`/"do_not_pad" for prompts of one
          length), `padding_side`, `pad_to_multiple_of`, `add_special_tokens` (off: the chat template writes them)
          and `return_attention_mask` go to the tokenizer;
        - `max_num_tiles` (or `max_patches`, InternVL's name for it) caps the tiles per image;
        - `return_tensors` is "pt" or "np";
        - `truncation` may only be off: cutting a prompt would cut its image tokens, which must match the tiles;
        - `videos` and `audio` may only be `None` (`apply_chat_template` passes them): Perceptio reads images.

        Any other argument is a `ValueError` listing these.
        """
        if kwargs:
            accepted = list(inspect.signature(PerceptioProcessor.__call__).parameters)[1:-1]  # no self, kwargs
            raise ValueError(f"Unexpected processor argument(s) {sorted(kwargs)}; accepted: {', '.join(accepted)}.")
        for name, value in (("videos", videos), ("audio", audio)):
            if value is not None:
                raise ValueError(f"{name} must be None: Perceptio reads images and text only.")
        if truncation not in NO_TRUNCATION:
            raise ValueError(
                f"truncation must be off (one of {NO_TRUNCATION}), got {truncation!r}: cutting a prompt would cut "
                "its image tokens. Shorten the text instead."
            )
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(f"return_tensors must be one of {RETURN_TENSORS}, got {return_tensors!r}.")
        _check_padding_side(padding_side)
        _check_padding(padding, max_length, pad_to_multiple_of)
        max_num_tiles = _tile_limit(max_num_tiles, max_patches)
        texts = _as_prompt_list(text)
        images_per_prompt = self._images_per_prompt(images, texts)
        texts = [
            IMAGE_PLACEHOLDER + "\n" + prompt if prompt.count(IMAGE_PLACEHOLDER) == 0 and prompt_images else prompt
            for prompt, prompt_images in zip(texts, images_per_prompt)
        ]
        data: dict[str, Any] = {}
        tile_counts: list[int] = []
        flat_images = [image for prompt_images in images_per_prompt for image in prompt_images]
        if flat_images:
            vision = self.image_processor(flat_images, max_num_tiles=max_num_tiles)
            data["pixel_values"] = vision["pixel_values"]
            tile_counts = vision["num_tiles"].tolist()
            if all(images_per_prompt):
                first_image_rows = _first_image_rows(images_per_prompt)
                data["sam_pixel_values"] = vision["sam_pixel_values"][first_image_rows]
        expanded = self._expand_image_placeholders(texts, images_per_prompt, tile_counts)
        encoded = self.tokenizer(expanded, add_special_tokens=add_special_tokens)
        _check_lengths_stack(encoded["input_ids"], padding, max_length)
        encoded = self.tokenizer.pad(
            encoded,
            padding=padding,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=True,
            return_tensors="pt",
        )
        data["input_ids"] = encoded["input_ids"]
        if return_attention_mask:
            data["attention_mask"] = encoded["attention_mask"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _images_per_prompt(self, images: Any, texts: list[str]) -> list[list[Any]]:
        placeholder_counts = [prompt.count(IMAGE_PLACEHOLDER) for prompt in texts]
        if images is None:
            if any(placeholder_counts):
                raise ValueError(
                    f"The prompts have {sum(placeholder_counts)} {IMAGE_PLACEHOLDER} placeholder(s) but no images "
                    "were given."
                )
            return [[] for _ in texts]
        if isinstance(images, (list, tuple)) and images and all(isinstance(item, (list, tuple)) for item in images):
            if len(images) != len(texts):
                raise ValueError(f"Got {len(images)} image lists for {len(texts)} prompts; give one list per prompt.")
            per_prompt = [list(item) for item in images]
        else:
            flat = list(images) if isinstance(images, (list, tuple)) else [images]
            if not flat:
                raise ValueError("Got an empty list of images; pass images=None for text-only prompts.")
            if sum(placeholder_counts) == 0 and len(flat) == len(texts):
                per_prompt = [[image] for image in flat]
            else:
                per_prompt, start = [], 0
                for count in placeholder_counts:
                    per_prompt.append(flat[start : start + count])
                    start += count
                if start != len(flat):
                    raise ValueError(
                        f"The prompts have {sum(placeholder_counts)} {IMAGE_PLACEHOLDER} placeholder(s) but "
                        f"{len(flat)} image(s) were given; give one image per placeholder."
                    )
        for index, (count, prompt_images) in enumerate(zip(placeholder_counts, per_prompt)):
            if count and count != len(prompt_images):
                raise ValueError(
                    f"Prompt {index} has {count} {IMAGE_PLACEHOLDER} placeholder(s) but {len(prompt_images)} "
                    "image(s); give one image per placeholder."
                )
            if not count and len(prompt_images) > 1:
                raise ValueError(
                    f"Prompt {index} has {len(prompt_images)} images and no {IMAGE_PLACEHOLDER} placeholder; "
                    "mark where each image goes with a placeholder."
                )
        return per_prompt

    def _expand_image_placeholders(
        self, texts: list[str], images_per_prompt: list[list[Any]], tile_counts: list[int]
    ) -> list[str]:
        expanded, image_index = [], 0
        for prompt in texts:
            pieces = prompt.split(IMAGE_PLACEHOLDER)
            out = [pieces[0]]
            for piece in pieces[1:]:
                num_context = tile_counts[image_index] * self.image_seq_length
                out.append(IMAGE_START_TOKEN + IMAGE_CONTEXT_TOKEN * num_context + IMAGE_END_TOKEN + piece)
                image_index += 1
            expanded.append("".join(out))
        return expanded

    def build_training_example(
        self,
        prompt: str,
        target: str,
        images: Any = None,
        max_num_tiles: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training example: the chat-formatted prompt + assistant `target`, with labels on the target only.

        `prompt` is the user's text (no template); `target` comes from `format_target`. Returns 1-D `input_ids`,
        `labels` (prompt and image positions are -100) and, with images, `pixel_values` and `sam_pixel_values`.
        """
        if not isinstance(target, str) or not target:
            raise ValueError(f"target must be a non-empty string, got {target!r}.")
        image_list = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        prompt_text = self.format_prompt(prompt, num_images=len(image_list))
        inputs = self(images=image_list or None, text=prompt_text, max_num_tiles=max_num_tiles)
        prompt_ids = inputs["input_ids"][0]
        target_ids = self.tokenizer(target + END_OF_TURN, add_special_tokens=False, return_tensors="pt")["input_ids"][
            0
        ]
        example = {
            "input_ids": torch.cat([prompt_ids, target_ids]),
            "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), target_ids]),
        }
        for key in ("pixel_values", "sam_pixel_values"):
            if key in inputs:
                example[key] = inputs[key]
        return example

    def pad(
        self, sequences: Sequence[torch.Tensor], padding_side: str, padding_value: int | None = None
    ) -> torch.Tensor:
        """Pad 1-D id sequences into a (batch, length) tensor; the pad token id unless `padding_value` is given."""
        _check_padding_side(padding_side)
        if not sequences:
            raise ValueError("Got no sequences to pad.")
        value = self.tokenizer.pad_token_id if padding_value is None else padding_value
        length = max(len(sequence) for sequence in sequences)
        batch = torch.full((len(sequences), length), value, dtype=sequences[0].dtype)
        for row, sequence in enumerate(sequences):
            if padding_side == "left":
                batch[row, length - len(sequence) :] = sequence
            else:
                batch[row, : len(sequence)] = sequence
        return batch

    @property
    def model_input_names(self) -> list[str]:
        """The inputs `PerceptioForConditionalGeneration.forward` takes from this processor."""
        return ["input_ids", "attention_mask", "pixel_values", "sam_pixel_values"]


def _text_first(conversation: Any) -> Any:
    """A copy of a conversation (or a batch of them) whose turns list their text before their images; a text followed
    by an image ends with a newline, as the template ends an image, so the two stay apart."""
    if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
        return [_text_first(single) for single in conversation]
    if not isinstance(conversation, (list, tuple)):
        return conversation
    return [_turn_text_first(message) for message in conversation]


def _turn_text_first(message: Any) -> Any:
    """One turn with its text items moved before its other items (a turn whose content is a string is kept)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    texts = [item for item in content if isinstance(item, dict) and item.get("type") == "text"]
    others = [item for item in content if not (isinstance(item, dict) and item.get("type") == "text")]
    if texts and others and not texts[-1].get("text", "").endswith("\n"):
        texts[-1] = {**texts[-1], "text": f"{texts[-1].get('text', '')}\n"}
    return {**message, "content": [*texts, *others]}


def _as_prompt_list(text: Any) -> list[str]:
    if text is None:
        raise ValueError("text is required: pass a prompt string or a list of prompt strings.")
    texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
    if texts is None:
        raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}.")
    if not texts:
        raise ValueError("text is an empty list; pass at least one prompt.")
    for index, prompt in enumerate(texts):
        _check_prompt(prompt, index)
    return texts


def _check_prompt(prompt: Any, index: int) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"Prompt {index} must be a string, got {type(prompt).__name__}.")
    if not prompt.strip():
        raise ValueError(f"Prompt {index} is empty; write a question or an instruction.")


def _check_padding_side(padding_side: str) -> str:
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}.")
    return padding_side


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_padding(padding: Any, max_length: Any, pad_to_multiple_of: Any) -> None:
    if not isinstance(padding, (bool, str)) or padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}.")
    if padding == "max_length" and not _is_positive_int(max_length):
        raise ValueError(f"padding='max_length' needs max_length, a positive integer; got {max_length!r}.")
    if padding != "max_length" and max_length is not None:
        raise ValueError(
            f"max_length applies with padding='max_length' only (truncation is not supported); got "
            f"padding={padding!r}."
        )
    if pad_to_multiple_of is not None and not _is_positive_int(pad_to_multiple_of):
        raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}.")


def _check_lengths_stack(input_ids: list[list[int]], padding: bool | str, max_length: int | None) -> None:
    """A `ValueError` when the padded prompts would not stack into one (batch, length) tensor."""
    lengths = [len(ids) for ids in input_ids]
    if padding == "max_length" and max(lengths) > max_length:
        longest = lengths.index(max(lengths))
        raise ValueError(
            f"Prompt {longest} has {lengths[longest]} tokens with its image tokens, more than max_length "
            f"{max_length}; raise max_length."
        )
    if padding in (False, "do_not_pad") and len(set(lengths)) > 1:
        raise ValueError(
            f"padding={padding!r} leaves the prompts at their lengths {lengths}, which do not stack into one tensor; "
            "pad them (padding=True)."
        )


def _tile_limit(max_num_tiles: int | None, max_patches: int | None) -> int | None:
    """`max_num_tiles`, given under its own name or as InternVL's `max_patches`."""
    if max_num_tiles is not None and max_patches is not None:
        raise ValueError("Give max_num_tiles or max_patches (InternVL's name for it), not both.")
    return max_patches if max_num_tiles is None else max_num_tiles


def _first_image_rows(images_per_prompt: list[list[Any]]) -> list[int]:
    rows, start = [], 0
    for prompt_images in images_per_prompt:
        rows.append(start)
        start += len(prompt_images)
    return rows


# `save_pretrained` then copies this file and the ones it imports into the folder and writes an `auto_map`, so that
# `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` finds the processor where `perceptio` is not
# imported (and, without trust_remote_code, says so) instead of falling back to the bare tokenizer.
PerceptioProcessor.register_for_auto_class()

__all__ = ["PerceptioProcessor"]
