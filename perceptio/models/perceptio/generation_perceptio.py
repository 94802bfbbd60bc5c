"""Perceptio generation: the spatial-token grammar, `[SEG]` hidden-state capture and `predict`.

`model.generate` stays transformers' own generation loop; this module only adds a `LogitsProcessor` (the grammar)
and two hooks (the `[SEG]` states) around it, then turns the generated tokens into masks and a depth map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .spatial_vocabulary_perceptio import PerceptioSpatialVocabulary


class PerceptioSpatialGrammarLogitsProcessor(LogitsProcessor):
    r"""
    Masks the logits so that every generated sequence obeys Perceptio's spatial grammar:

    - depth codes `<DEPTH_k>` appear only inside a depth block;
    - after `<DEPTH_START>` come exactly `num_depth_tokens` codes, then `<DEPTH_END>` (nothing else, not even EOS);
    - at most `max_depth_blocks` depth blocks per sequence (one per image; 0 forbids depth blocks);
    - `[SEG]` only before the first depth block;
    - neither `[SEG]` nor a depth block after a prompt without an image: there is nothing to segment or measure, and
      a text-only request (lmms-eval sends some) must come back as text.

    The rules are the vocabulary's (`forbidden_next_tokens`, `grammar_states`); a segmentation-only vocabulary has no
    depth tokens, so its sequences are `[SEG]`s and text. The state of each row is recomputed from its generated ids
    at every step (vectorised), so the processor holds no per-row memory and stays correct when beam search reorders
    rows. Only ids after `prompt_length` are read, so spatial tokens quoted in a prompt do not count.

    Args:
        vocabulary (`PerceptioSpatialVocabulary`): the spatial token ids; its N must be fixed when it has depth.
        prompt_length: length of the (padded) prompt; generated ids start there.
        max_depth_blocks: depth blocks allowed per sequence.
        prompts_with_images: per prompt, whether it holds an image; `None` when every prompt does. Rows are
            prompts × copies (beams, `num_return_sequences`), consecutive as `generate` expands them.
    """

    def __init__(
        self,
        vocabulary: PerceptioSpatialVocabulary,
        prompt_length: int,
        max_depth_blocks: int = 1,
        prompts_with_images: Sequence[bool] | torch.Tensor | None = None,
    ):
        if vocabulary.num_depth_tokens is None:
            raise ValueError(
                "The grammar needs N, the codes per depth block, which this vocabulary does not fix; "
                "use vocabulary.with_num_depth_tokens(N)."
            )
        for name, value in (("prompt_length", prompt_length), ("max_depth_blocks", max_depth_blocks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        self.vocabulary = vocabulary
        self.prompt_length = prompt_length
        self.max_depth_blocks = max_depth_blocks
        self.prompts_with_images = None if prompts_with_images is None else _as_prompt_flags(prompts_with_images)
        self._forbidden_table: torch.Tensor | None = None

    @classmethod
    def from_config(
        cls,
        config,
        prompt_length: int,
        max_depth_blocks: int | None = None,
        prompts_with_images: Sequence[bool] | torch.Tensor | None = None,
    ):
        """The grammar of a `PerceptioConfig`; no depth blocks when the checkpoint has no depth tokenizer."""
        vocabulary = config.spatial_vocabulary
        if vocabulary is None:
            raise ValueError(
                "The config has no spatial token ids (seg_token_id and the depth ids are None); the spatial grammar "
                "needs them: build the config with the processor's spatial_vocabulary.config_fields()."
            )
        if max_depth_blocks is None:
            max_depth_blocks = 1 if config.has_depth_tokenizer else 0
        return cls(vocabulary, prompt_length, max_depth_blocks, prompts_with_images)

    def _forbidden_tokens(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """(num_states, vocab) table: which tokens each grammar state forbids (built once per vocabulary size)."""
        if self._forbidden_table is not None and self._forbidden_table.shape[1] == vocab_size:
            return self._forbidden_table.to(device)
        self._forbidden_table = self.vocabulary.forbidden_next_tokens(vocab_size).to(device)
        return self._forbidden_table

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] < self.prompt_length:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} positions, fewer than prompt_length {self.prompt_length}."
            )
        without_image = None
        if self.prompts_with_images is not None:
            without_image = ~self._rows_with_images(input_ids.shape[0], input_ids.device)
        state = self.vocabulary.grammar_states(
            input_ids[:, self.prompt_length :], self.max_depth_blocks, without_image
        )
        forbidden = self._forbidden_tokens(scores.shape[-1], scores.device)[state]
        return scores.masked_fill(forbidden, float("-inf"))

    def _rows_with_images(self, num_rows: int, device: torch.device) -> torch.Tensor:
        """`prompts_with_images` per row: each prompt's flag repeated for its consecutive copies."""
        num_prompts = self.prompts_with_images.shape[0]
        if num_rows % num_prompts:
            raise ValueError(
                f"Got {num_rows} rows for {num_prompts} prompts in prompts_with_images; rows must be the prompts' "
                "consecutive copies (a whole number per prompt)."
            )
        if self.prompts_with_images.device != device:
            # Moved once: copying the flags to the device at every step would wait on the host each time.
            self.prompts_with_images = self.prompts_with_images.to(device)
        return self.prompts_with_images.repeat_interleave(num_rows // num_prompts)


def _as_prompt_flags(prompts_with_images: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """A 1-D bool tensor of per-prompt flags, or a `ValueError` saying what is accepted."""
    flags = torch.as_tensor(prompts_with_images)
    if flags.dtype != torch.bool or flags.ndim != 1 or not flags.numel():
        raise ValueError(
            "prompts_with_images must be a non-empty 1-D sequence or tensor of bools (one per prompt), got "
            f"{prompts_with_images!r}."
        )
    return flags


# `[SEG]` states the hooks keep per row while generating. A row that generates more gets all of its states from one
# teacher-forced forward after generation instead: the same states, one extra forward.
SEG_STATE_CAPACITY = 32
# The model attribute where `generate`'s capture keeps its buffers from one call to the next.
SEG_BUFFERS_ATTRIBUTE = "_perceptio_seg_capture_buffers"


class PerceptioSegStateCapture:
    """Forward hooks that keep the last-layer hidden state at each generated position whose *input* token is `[SEG]`.

    A pre-hook on the model records the step's `input_ids`; a hook on the language model's final norm writes the rows
    at generated `[SEG]` inputs, in order, into a buffer of `capacity` slots per row and counts them, so no layer's
    full hidden states are stored. Each step is tensor work on the model's device (no host read, no branch on token
    values): a decoding step neither syncs nor breaks a `torch.compile` graph here. The first forward is the prompt
    (its `[SEG]`s are ignored), each later one-token forward a generated token (the KV cache feeds one per step); a
    longer forward (a teacher-forced sequence, no cache) counts its positions from `prompt_length` on. Read the states
    after generation with `states_of_row`.

    With `reuse_buffers` (as `generate` uses it) the buffer stays on the model for the next call of the same shape, as
    transformers' static cache does: a compiled decoding step, and its CUDA graph, then sees the same tensors in every
    call instead of recording again.
    """

    def __init__(
        self,
        model,
        seg_token_id: int,
        prompt_length: int,
        capacity: int = SEG_STATE_CAPACITY,
        reuse_buffers: bool = False,
    ):
        for name, value in (("prompt_length", prompt_length), ("capacity", capacity)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if not isinstance(reuse_buffers, bool):
            raise ValueError(f"reuse_buffers must be True or False, got {reuse_buffers!r}.")
        self.model = model
        self.seg_token_id = seg_token_id
        self.prompt_length = prompt_length
        self.capacity = capacity
        self.reuse_buffers = reuse_buffers
        # (rows, capacity + 1, d): the extra last slot takes every position that is not a kept `[SEG]`.
        self.states: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self._host_counts: list[int] | None = None
        self._step_input_ids: torch.Tensor | None = None
        self._saw_prompt = False
        self._handles: list[Any] = []

    def __enter__(self) -> PerceptioSegStateCapture:
        self._handles = [
            self.model.register_forward_pre_hook(self._remember_input_ids, with_kwargs=True),
            self.model.model.language_model.norm.register_forward_hook(self._keep_seg_rows),
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _remember_input_ids(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._step_input_ids = input_ids

    def _keep_seg_rows(self, module, inputs, output: torch.Tensor) -> None:
        input_ids = self._step_input_ids
        if input_ids is None or output.shape[:2] != input_ids.shape:
            return
        rows, length, hidden_size = output.shape
        if self.states is None:
            self.states, self.counts = self._zeroed_buffers(output)
        elif self.states.shape[0] != rows:
            raise ValueError(
                f"The [SEG] capture holds {self.states.shape[0]} rows but a forward fed {rows}; use one capture per "
                "generate call."
            )
        if self._saw_prompt and length == 1:
            generated = torch.ones(1, dtype=torch.bool, device=input_ids.device)
        else:
            generated = torch.arange(length, device=input_ids.device) >= self.prompt_length
        self._saw_prompt = True
        self._host_counts = None
        is_seg = (input_ids == self.seg_token_id) & generated
        slots = self.counts[:, None] + is_seg.cumsum(1) - 1
        slots = torch.where(is_seg, slots.clamp(max=self.capacity), self.capacity)
        index = slots[..., None].expand(-1, -1, hidden_size)
        self.states.scatter_(1, index, output.detach().to(self.states.dtype))
        self.counts += is_seg.sum(1)

    def _zeroed_buffers(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffer and the counts (zeroed) for a forward's `output`. Made at the first forward (the prompt, which
        transformers never compiles), so compiled decoding steps only write into them; marked static so CUDA graphs
        may replay those writes."""
        rows, _, hidden_size = output.shape
        shape = (rows, self.capacity + 1, hidden_size)
        kept = getattr(self.model, SEG_BUFFERS_ATTRIBUTE, None) if self.reuse_buffers else None
        if (
            kept is not None
            and kept[0].shape == shape
            and (kept[0].dtype, kept[0].device) == (output.dtype, output.device)
        ):
            kept[1].zero_()
            return kept
        states = output.new_zeros(shape)
        counts = torch.zeros(rows, dtype=torch.long, device=output.device)
        torch._dynamo.mark_static_address(states)
        torch._dynamo.mark_static_address(counts)
        if self.reuse_buffers:
            setattr(self.model, SEG_BUFFERS_ATTRIBUTE, (states, counts))
        return states, counts

    def states_of_row(self, row: int, num_seg: int) -> torch.Tensor | None:
        """The (num_seg, d) states kept for `row`, or `None` when the hooks did not keep exactly `num_seg` of them
        (more `[SEG]`s than `capacity`, or rows the hooks could not follow). Reads the counts from the device once; a
        copy, since a reused buffer is written again by the next `generate`."""
        if self.states is None:
            return None
        if self._host_counts is None:
            self._host_counts = self.counts.tolist()
        if not 0 <= row < len(self._host_counts):
            raise ValueError(f"row must lie in [0, {len(self._host_counts)}), got {row!r}.")
        if num_seg > self.capacity or self._host_counts[row] != num_seg:
            return None
        return self.states[row, :num_seg].clone()


def decoding_kwargs(static_cache: bool = False, compile: bool = False) -> dict[str, Any]:
    """`generate` keyword arguments for a decoding mode: transformers' dynamic cache (`{}`, the default), its static
    cache (`cache_implementation="static"`), or the static cache with the decoding step under `torch.compile`.

    transformers compiles the decoding step by itself when the cache is static and the model is on an accelerator, so
    `compile=False` turns that off (`disable_compile`) and `compile=True` turns it on on every device (on CPU it is
    slow to start; tests use it). Compiling needs the static cache: its fixed shapes let one graph serve every step.
    The grammar and the `[SEG]` capture give the same tokens, masks and depth in every mode.
    """
    for name, value in (("static_cache", static_cache), ("compile", compile)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}.")
    if compile and not static_cache:
        raise ValueError("compile=True needs static_cache=True: the compiled decoding step needs the static cache.")
    if not static_cache:
        return {}
    if not compile:
        return {"cache_implementation": "static", "disable_compile": True}
    from transformers import CompileConfig

    compile_config = CompileConfig()
    compile_config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": compile_config}


class PerceptioGenerationMixin:
    r"""
    Adds Perceptio's generation features to `PerceptioForConditionalGeneration`:

    - `generate(...)`: transformers' `generate` with the spatial grammar on by default (`spatial_grammar=False`
      switches it off); a prompt without image tokens gets neither `[SEG]` nor a depth block. With
      `return_dict_in_generate=True` the output also carries `seg_hidden_states`: per row, the last-layer states
      (num_seg, d) at the generated `[SEG]` tokens that were fed back to the model, in order.
    - `predict(images, prompts, processor=None, **generate_kwargs)`: generation, masks and depth in one call.
    - `generate` stops at the checkpoint's `generation_config.eos_token_id`, as transformers' does (a converted
      Sa2VA checkpoint lists its template's stop words there, e.g. InternLM2's `<|im_end|>`); `predict` stops there
      and at the tokenizer's EOS (`stop_token_ids`).

    A `[SEG]`'s state is the model's last hidden state where it reads that token. The last generated token (a
    `[SEG]` cut off by `max_new_tokens`) is never read, so it has no state and gets no mask, as in Sa2VA; the
    prediction flags it (`seg_truncated`). Under beam search, whose rows are reordered, the states come from one
    teacher-forced forward of the tokens generation fed, so they are the same states.
    """

    def generate(self, *args, spatial_grammar: bool = True, **kwargs):
        """`GenerationMixin.generate` plus the spatial grammar and, for dict outputs, the `[SEG]` hidden states.

        The `[SEG]` states need `input_ids`; a prompt given only as `inputs_embeds` gets the grammar (its output
        holds only new tokens, and with no ids to show which prompts hold images, all may segment) but no
        `seg_hidden_states`.
        """
        if not isinstance(spatial_grammar, bool):
            raise ValueError(f"spatial_grammar must be True or False, got {spatial_grammar!r}.")
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        prompt_length = 0 if input_ids is None else input_ids.shape[1]
        if spatial_grammar:
            # The processor expands each image into image-context tokens: a prompt without them has no image.
            prompts_with_images = None if input_ids is None else (input_ids == self.config.image_token_id).any(-1)
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            processors.append(
                PerceptioSpatialGrammarLogitsProcessor.from_config(
                    self.config, prompt_length, prompts_with_images=prompts_with_images
                )
            )
            kwargs["logits_processor"] = processors
        capture_seg = kwargs.get("return_dict_in_generate", False) and self.config.seg_token_id is not None
        if input_ids is None or not capture_seg:
            return super().generate(*args, **kwargs)
        capture = PerceptioSegStateCapture(
            self, self.config.seg_token_id, prompt_length, SEG_STATE_CAPACITY, reuse_buffers=True
        )
        with capture:
            output = super().generate(*args, **kwargs)
        output.seg_hidden_states = self._seg_states_of_generation(output.sequences, capture, input_ids, kwargs)
        return output

    def predict(
        self,
        images: Any,
        prompts: str | Sequence[str],
        processor=None,
        mask_threshold: float = 0.0,
        **generate_kwargs,
    ) -> list:
        r"""
        Answer each prompt about its image: text, one mask per `[SEG]`, the depth map of the depth block.

        Args:
            images: one image or a list (one per prompt); anything `PerceptioProcessor` accepts.
            prompts: the user's question(s), plain text (the chat template is applied here).
            processor (`PerceptioProcessor`, *optional*): defaults to `self.processor`, which `from_pretrained`
                does not set: assign `model.processor = processor` once, or pass it here.
            mask_threshold (`float`, defaults to 0.0): mask-logit threshold of the boolean masks.
            generate_kwargs: passed to `generate` (`max_new_tokens`, `do_sample`, `num_beams`, `spatial_grammar`…).

        Returns:
            `list[PerceptioPrediction]`, one per prompt (× `num_return_sequences`). Masks and depth are at the
            original image size; depth is in the tokenizer's normalised [-1, 1] space (larger = nearer), or `None`
            when there is no complete depth block (`depth_truncated` tells a block cut by `max_new_tokens`).
        """
        processor = self._resolve_processor(processor)
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        if not isinstance(prompts, (str, list, tuple)):
            raise ValueError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}.")
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(image_list) != len(prompt_list) or not prompt_list:
            raise ValueError(
                f"Got {len(image_list)} image(s) and {len(prompt_list)} prompt(s); give one image per prompt "
                "(at least one)."
            )
        inputs = processor(images=image_list, text=[processor.format_prompt(prompt) for prompt in prompt_list])
        original_sizes = processor.image_sizes(image_list)
        return self.predict_from_inputs(
            inputs,
            processor=processor,
            original_sizes=original_sizes,
            mask_threshold=mask_threshold,
            **generate_kwargs,
        )

    @torch.no_grad()
    def predict_from_inputs(
        self,
        inputs,
        processor=None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        mask_threshold: float = 0.0,
        **generate_kwargs,
    ) -> list:
        """`predict` on processor outputs (`input_ids`, `attention_mask`, `pixel_values`, `sam_pixel_values`).

        `original_sizes` ((height, width) per prompt, `processor.image_sizes(images)`) is the size masks and depth
        come back at; it may be `None` only when no sample has a `[SEG]` or a depth block. A `[SEG]` without
        `sam_pixel_values` raises a `ValueError`.
        """
        processor = self._resolve_processor(processor)
        if "input_ids" not in inputs:
            raise ValueError("inputs must contain input_ids (use the processor's output).")
        for reserved in ("return_dict_in_generate", "input_ids"):
            if reserved in generate_kwargs:
                raise ValueError(f"{reserved} is set by predict; do not pass it.")
        tokenizer = processor.tokenizer
        generate_kwargs.setdefault("eos_token_id", self.stop_token_ids(tokenizer))
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        inputs = {key: self._on_model_device(value) for key, value in inputs.items()}
        sam_pixel_values = inputs.get("sam_pixel_values")
        generation_inputs = {key: value for key, value in inputs.items() if key != "sam_pixel_values"}
        output = self.generate(**generation_inputs, return_dict_in_generate=True, **generate_kwargs)
        prompt_length = inputs["input_ids"].shape[1]
        generated = output.sequences[:, prompt_length:]
        copies = generated.shape[0] // inputs["input_ids"].shape[0]
        num_depth_tokens = self.config.num_depth_tokens
        stops = generate_kwargs["eos_token_id"]
        parsed = [processor.parse_generation(row, num_depth_tokens, stops) for row in generated]
        seg_states = output.seg_hidden_states
        self._check_seg_states_match(parsed, seg_states)
        masks = self._masks_of_generation(seg_states, sam_pixel_values, copies)
        depth_maps = self._depth_maps_of_generation(parsed)
        sizes = None if original_sizes is None else [size for size in original_sizes for _ in range(copies)]
        return processor.post_process_generation(
            generated,
            original_sizes=sizes,
            mask_logits=None if masks is None else masks.mask_logits,
            mask_scores=None if masks is None else masks.mask_scores,
            depth_maps=depth_maps,
            mask_threshold=mask_threshold,
            num_depth_tokens=num_depth_tokens,
            stop_token_ids=stops,
        )

    def stop_token_ids(self, tokenizer) -> list[int] | None:
        """The ids `predict` stops at: the tokenizer's EOS and every `eos_token_id` of the checkpoint's
        `generation_config` (where a converted Sa2VA checkpoint keeps its template's stop words); `None` if neither
        names one."""
        configured = self.generation_config.eos_token_id
        configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
        stops = [token for token in [tokenizer.eos_token_id, *configured] if token is not None]
        return list(dict.fromkeys(stops)) or None

    def _on_model_device(self, value):
        """A processor output on the model's device; floating tensors (pixels) in the model's dtype."""
        if not torch.is_tensor(value):
            return value
        return value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)

    def _resolve_processor(self, processor):
        processor = processor if processor is not None else getattr(self, "processor", None)
        if processor is None:
            raise ValueError(
                "predict needs a PerceptioProcessor: pass processor=... or set model.processor = "
                "AutoProcessor.from_pretrained(path, trust_remote_code=True)."
            )
        for method in ("post_process_generation", "parse_generation", "image_sizes", "format_prompt"):
            if not callable(getattr(processor, method, None)):
                raise ValueError(
                    f"processor must be a PerceptioProcessor (it lacks {method}); got {type(processor).__name__}."
                )
        return processor

    def _seg_states_of_generation(
        self, sequences: torch.LongTensor, capture: PerceptioSegStateCapture, input_ids: torch.Tensor, kwargs: dict
    ) -> list[torch.Tensor]:
        """Per row, the states at its generated `[SEG]`s but the last token: captured by the hooks, or teacher-forced
        where the hooks could not follow the rows (beam search reorders them)."""
        prompt_length = input_ids.shape[1]
        # The last token is never fed back: a [SEG] there has no state.
        read = sequences[:, prompt_length:-1]
        num_beams = kwargs.get("num_beams") or getattr(kwargs.get("generation_config"), "num_beams", None)
        num_beams = num_beams or self.generation_config.num_beams or 1
        num_seg = (read == self.config.seg_token_id).sum(-1).tolist()
        states: list[torch.Tensor | None] = [None] * read.shape[0]
        if num_beams == 1:
            for row, count in enumerate(num_seg):
                states[row] = capture.states_of_row(row, count)
        missing = [row for row, value in enumerate(states) if value is None]
        if missing:
            forced = self.teacher_forced_seg_states(sequences, input_ids, kwargs, missing)
            for row, value in zip(missing, forced):
                states[row] = value
        return states

    @torch.no_grad()
    def teacher_forced_seg_states(
        self, sequences: torch.LongTensor, input_ids: torch.Tensor, inputs: dict, rows: Sequence[int]
    ) -> list[torch.Tensor]:
        """Last-layer states at the generated `[SEG]`s of `rows`, from one forward of the ids generation fed: the
        prompt and every generated token but the last (which is never read, so a `[SEG]` there has no state).

        `inputs` holds the prompt's `attention_mask` and `pixel_values`; rows may be expanded copies of the prompts
        (beams, `num_return_sequences`), whose tiles are looked up from the prompt they copy.
        """
        prompt_length = input_ids.shape[1]
        copies = sequences.shape[0] // input_ids.shape[0]
        sources = [row // copies for row in rows]
        prompt_mask = inputs.get("attention_mask")
        if prompt_mask is None:
            prompt_mask = torch.ones_like(input_ids)
        fed = sequences[list(rows), :-1]
        read_length = fed.shape[1] - prompt_length
        attention_mask = torch.cat([prompt_mask[sources], prompt_mask.new_ones(len(rows), read_length)], dim=1)
        pixel_values = self._tiles_of_prompts(input_ids, inputs.get("pixel_values"), sources)
        # Room for every fed token to be a [SEG], so each row's states are kept.
        with PerceptioSegStateCapture(self, self.config.seg_token_id, prompt_length, capacity=read_length) as capture:
            self(input_ids=fed, attention_mask=attention_mask, pixel_values=pixel_values, logits_to_keep=1)
        num_seg = (fed[:, prompt_length:] == self.config.seg_token_id).sum(-1).tolist()
        return [capture.states_of_row(index, count) for index, count in enumerate(num_seg)]

    def _tiles_of_prompts(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, sources: Sequence[int]
    ) -> torch.Tensor | None:
        if pixel_values is None:
            return None
        tiles = ((input_ids == self.config.image_token_id).sum(-1) // self.config.image_seq_length).tolist()
        starts = [sum(tiles[:index]) for index in range(len(tiles))]
        indices = [tile for source in sources for tile in range(starts[source], starts[source] + tiles[source])]
        return pixel_values[indices]

    def _check_seg_states_match(self, parsed: list, seg_states: list[torch.Tensor]) -> None:
        for row, (sample, states) in enumerate(zip(parsed, seg_states)):
            if sample.num_seg_tokens != states.shape[0]:
                raise ValueError(
                    f"Sample {row}: {sample.num_seg_tokens} [SEG] token(s) before end of text but {states.shape[0]} "
                    "generated; text after the end-of-turn token is not parsed, so generate with an eos token."
                )

    def _masks_of_generation(self, seg_states: list[torch.Tensor], sam_pixel_values: torch.Tensor | None, copies: int):
        with_seg = [row for row, states in enumerate(seg_states) if states.shape[0]]
        if not with_seg:
            return None
        if sam_pixel_values is None:
            raise ValueError(
                f"Samples {with_seg} generated [SEG] tokens but no sam_pixel_values were given, so no mask can be "
                "decoded; pass each sample's image (PerceptioProcessor returns sam_pixel_values) or generate with "
                "spatial_grammar on a prompt that does not ask for segmentation."
            )
        sam_pixel_values = sam_pixel_values.to(self.device).repeat_interleave(copies, dim=0)
        return self.predict_masks(seg_states, sam_pixel_values)

    def _depth_maps_of_generation(self, parsed: list) -> list[torch.Tensor | None]:
        with_depth = [row for row, sample in enumerate(parsed) if sample.depth_codes is not None]
        depth_maps: list[torch.Tensor | None] = [None] * len(parsed)
        if not with_depth:
            return depth_maps
        tokenizer = self.require_depth_tokenizer()
        codes = torch.tensor([parsed[row].depth_codes for row in with_depth], device=self.device)
        for row, depth in zip(with_depth, tokenizer.decode(codes)):
            depth_maps[row] = depth
        return depth_maps


__all__ = [
    "PerceptioGenerationMixin",
    "PerceptioSegStateCapture",
    "PerceptioSpatialGrammarLogitsProcessor",
    "decoding_kwargs",
]
