"""The lmms-eval adapter of Perceptio: lmms-eval's `lmms` interface over `model.predict` and a scoring forward.

lmms-eval sends `Instance` requests whose `args` are
`(context, generation_kwargs, doc_to_visual, doc_id, task, split)` for `generate_until` and
`(context, continuation_or_doc_to_target, doc_to_visual, doc_id, task, split)` for `loglikelihood`; the visuals come
from `doc_to_visual(self.task_dict[task][split][doc_id])`. Answers are the text after Perceptio's spatial tokens
(`PerceptioPrediction.text`), cut at the task's stop strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm

from ...checkpoint_loading import load_perceptio_checkpoint


DEFAULT_MAX_NEW_TOKENS = 128


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def truncate_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (empty stop strings are ignored)."""
    cut = len(text)
    for stop in stop_strings:
        if stop:
            position = text.find(stop)
            if position != -1:
                cut = min(cut, position)
    return text[:cut]


class PerceptioLmms(lmms):
    """Perceptio for lmms-eval (a "simple" model: prompts are plain text plus the document's images).

    Args:
        pretrained: a Perceptio checkpoint folder (save_pretrained or `perceptio export`).
        device: torch device; "cuda" when available, else "cpu".
        dtype: "auto", "float32", "bfloat16" or "float16".
        batch_size: requests per `generate` call.
        max_new_tokens: generation length when a task does not set `max_new_tokens`.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"Unknown model_args {sorted(unknown)}; perceptio accepts pretrained, device, dtype, batch_size, "
                "max_new_tokens."
            )
        self.batch_size_per_call = _positive_int(batch_size, "batch_size")
        self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        self.model, self.processor = load_perceptio_checkpoint(
            pretrained, device=device or _default_device(), dtype=dtype
        )

    @property
    def batch_size(self) -> int:
        """Requests answered per `predict` call (lmms-eval reads it)."""
        return self.batch_size_per_call

    @property
    def device(self) -> torch.device:
        """The device the model runs on (lmms-eval reads it)."""
        return self.model.device

    def _document(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(
                f"lmms-eval request for task {task!r}, split {split!r}, doc {doc_id!r} has no document in task_dict."
            ) from error

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._document(task, split, doc_id)) or []
        images = []
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise ValueError(
                    f"Task {task!r} doc {doc_id!r} gives a {type(visual).__name__} visual; perceptio reads images only."
                )
            images.append(visual.convert("RGB"))
        return images

    def _inputs(
        self, contexts: Sequence[str], visuals: Sequence[list[Image.Image]], continuations: Sequence[str] = ()
    ):
        """Processor inputs of chat-formatted prompts (plus an optional continuation each) and their images."""
        prompts = [
            self.processor.format_prompt(context, num_images=len(images)) for context, images in zip(contexts, visuals)
        ]
        texts = [prompt + continuation for prompt, continuation in zip(prompts, continuations)] or prompts
        images = [list(images) for images in visuals] if any(visuals) else None
        return self.processor(images=images, text=texts), prompts

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, when the task sets a temperature) answers, cut at each task's `until` strings."""
        answers: list[str] = []
        for start in tqdm(
            range(0, len(requests), self.batch_size), desc="Perceptio responding", disable=self.rank != 0
        ):
            chunk = requests[start : start + self.batch_size]
            # One generate call per run of requests with the same image count and generation settings.
            groups: list[list[tuple[Instance, list[Image.Image], dict, tuple]]] = []
            for request in chunk:
                context, generation_kwargs, doc_to_visual, doc_id, task, split = request.args
                images = self._visuals(doc_to_visual, task, split, doc_id)
                settings = dict(generation_kwargs or {})
                key = (len(images), repr(sorted((k, v) for k, v in settings.items() if k != "until")))
                if groups and groups[-1][0][3] == key:
                    groups[-1].append((request, images, settings, key))
                else:
                    groups.append([(request, images, settings, key)])
            for group in groups:
                answers.extend(self._generate_group(group))
        return answers

    def _generate_group(self, group: list[tuple]) -> list[str]:
        contexts = [request.args[0] for request, _, _, _ in group]
        visuals = [images for _, images, _, _ in group]
        settings = group[0][2]
        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        inputs, _ = self._inputs(contexts, visuals)
        inputs = inputs.to(self.model.device)
        sizes = [self.processor.image_sizes(images[0])[0] if images else None for images in visuals]
        predictions = self.model.predict_from_inputs(
            inputs,
            processor=self.processor,
            original_sizes=sizes if all(size is not None for size in sizes) else None,
            **self._generation_kwargs(settings),
        )
        return [truncate_at_stop_strings(prediction.text, until) for prediction in predictions]

    def _generation_kwargs(self, settings: dict) -> dict[str, Any]:
        temperature = float(settings.get("temperature", 0) or 0)
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(settings.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(settings.get("num_beams") or 1),
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            kwargs["temperature"] = temperature
            if settings.get("top_p") is not None:
                kwargs["top_p"] = float(settings["top_p"])
        return kwargs

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per request: the summed log-probability of the continuation after the prompt, and whether greedy
        decoding would produce exactly that continuation."""
        results = []
        for request in tqdm(requests, desc="Perceptio scoring", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self._document(task, split, doc_id))
            if not isinstance(continuation, str) or not continuation:
                raise ValueError(f"Task {task!r} doc {doc_id!r}: the continuation must be a non-empty string.")
            images = self._visuals(doc_to_visual, task, split, doc_id)
            full, _ = self._inputs([context], [images], [continuation])
            prompt_only, _ = self._inputs([context], [images])
            prompt_length = prompt_only["input_ids"].shape[1]
            full = full.to(self.model.device)
            logits = (
                self.model(
                    input_ids=full["input_ids"],
                    attention_mask=full["attention_mask"],
                    pixel_values=full.get("pixel_values"),
                )
                .logits[0, prompt_length - 1 : -1]
                .float()
            )
            continuation_ids = full["input_ids"][0, prompt_length:]
            log_probs = torch.log_softmax(logits, dim=-1)
            total = float(log_probs.gather(-1, continuation_ids[:, None]).sum())
            results.append((total, bool((logits.argmax(-1) == continuation_ids).all())))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("perceptio does not implement multi-round generation; use single-turn tasks.")


def _positive_int(value: int | str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.") from error
    if number <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return number
