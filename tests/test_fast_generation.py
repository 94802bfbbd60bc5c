"""Fast decoding: the static cache and the compiled decoding step give the default cache's tokens, masks and depth;
the grammar and the `[SEG]` capture do no host read per step (they trace whole under `torch.compile(fullgraph=True)`);
bf16 loading keeps the depth tokenizer in float32; `perceptio predict` and the pipeline pass the modes through."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from test_generation import ForceScript, images, spatial_script  # noqa: E402  (the shared scripted generation)
from test_predict_command import predict_command

from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.models.perceptio import generation_perceptio
from perceptio.models.perceptio.generation_perceptio import PerceptioSpatialGrammarLogitsProcessor, decoding_kwargs
from perceptio.models.perceptio.pipeline_perceptio import PerceptioSpatialPipeline
from perceptio.models.perceptio.spatial_vocabulary_perceptio import PerceptioSpatialVocabulary


pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZES = [(48, 72), (40, 40)]


def traced_whole(**overrides) -> dict:
    """`decoding_kwargs(compile=True)` with dynamo's eager backend and `fullgraph=True`: the decoding step is traced
    as one graph (any host read or graph break raises) without inductor's code generation, which takes ~40 s on CPU."""
    kwargs = decoding_kwargs(static_cache=True, compile=True)
    kwargs["compile_config"].backend = "eager"
    kwargs["compile_config"].fullgraph = True
    return {**kwargs, **overrides}


def scripted_generation(model, processor, num_seg=(2, 1), depth=(True, False), calls=1, **kwargs):
    """Predictions of a batch of two prompts (different image sizes, so left padding) with scripted spatial tokens,
    and the rows whose `[SEG]` states had to be teacher-forced instead of captured during generation; `calls` runs
    it that many times on the same model (the last predictions are returned)."""
    model = copy.deepcopy(model)
    forced_rows = []
    teacher_forced = model.teacher_forced_seg_states

    def counting(sequences, input_ids, inputs, rows):
        forced_rows.extend(rows)
        return teacher_forced(sequences, input_ids, inputs, rows)

    model.teacher_forced_seg_states = counting
    image_list = images(SIZES)
    inputs = processor(images=image_list, text=[processor.format_prompt(p) for p in ("Segment.", "Where?")])
    scripts = [spatial_script(model, processor, count, with_depth) for count, with_depth in zip(num_seg, depth)]
    for _ in range(calls):
        force = ForceScript(inputs["input_ids"].shape[1], scripts)
        predictions = model.predict_from_inputs(
            inputs,
            processor=processor,
            original_sizes=processor.image_sizes(image_list),
            logits_processor=[force],
            max_new_tokens=max(map(len, scripts)) + 2,
            **kwargs,
        )
    return predictions, forced_rows


def assert_same_predictions(first, second):
    for one, other in zip(first, second, strict=True):
        assert one.token_ids == other.token_ids and one.text == other.text
        assert one.depth_codes == other.depth_codes
        assert len(one.masks) == len(other.masks) > 0
        assert all(np.array_equal(a, b) for a, b in zip(one.masks, other.masks))
        np.testing.assert_allclose(one.mask_scores, other.mask_scores, rtol=1e-5, atol=1e-6)
        assert (one.depth is None) == (other.depth is None)
        if one.depth is not None:
            np.testing.assert_allclose(one.depth, other.depth, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tiny_pair):
    predictions, forced = scripted_generation(*tiny_pair)
    assert not forced and predictions[0].depth is not None and predictions[1].depth is None
    return predictions


def test_static_cache_gives_the_same_tokens_masks_and_depth(tiny_pair, reference):
    predictions, forced = scripted_generation(*tiny_pair, **decoding_kwargs(static_cache=True))
    assert not forced, "the hooks must capture the [SEG] states under the static cache"
    assert_same_predictions(predictions, reference)


def test_compiled_decoding_step_traces_whole_and_gives_the_same_predictions(tiny_pair, reference):
    torch._dynamo.reset()
    # Twice on one model: the second call reuses the compiled step and the capture's buffers.
    predictions, forced = scripted_generation(*tiny_pair, calls=2, **traced_whole())
    assert not forced, "the hooks must capture the [SEG] states inside the compiled step"
    assert_same_predictions(predictions, reference)


@pytest.mark.slow
def test_inductor_compiled_decoding_gives_the_same_predictions(tiny_pair, reference):
    torch._dynamo.reset()
    predictions, forced = scripted_generation(*tiny_pair, **decoding_kwargs(static_cache=True, compile=True))
    assert not forced
    assert_same_predictions(predictions, reference)


def test_more_seg_than_the_capture_holds_are_teacher_forced_to_the_same_states(tiny_pair, reference, monkeypatch):
    monkeypatch.setattr(generation_perceptio, "SEG_STATE_CAPACITY", 1)
    predictions, forced = scripted_generation(*tiny_pair)
    assert forced == [0], "only the row with 2 [SEG]s overflows a capacity of 1"
    assert_same_predictions(predictions, reference)


def test_seg_states_of_one_generate_survive_the_next(tiny_pair):
    model, processor = copy.deepcopy(tiny_pair[0]), tiny_pair[1]
    inputs = processor(images=images(SIZES[:1]), text=[processor.format_prompt("Segment.")])
    prompt_length = inputs["input_ids"].shape[1]
    inputs = {key: value for key, value in inputs.items() if key != "sam_pixel_values"}

    def seg_states(num_seg, lead):
        # `lead` text tokens first, so the second call's [SEG]s are at other positions, with other states.
        script = [*processor.tokenizer("a cube", add_special_tokens=False)["input_ids"][:lead]]
        force = ForceScript(prompt_length, [script + spatial_script(model, processor, num_seg, False)])
        output = model.generate(**inputs, logits_processor=[force], max_new_tokens=12, return_dict_in_generate=True)
        return output.seg_hidden_states[0]

    first = seg_states(2, lead=0)
    kept = first.clone()
    second = seg_states(3, lead=1)
    assert getattr(model, generation_perceptio.SEG_BUFFERS_ATTRIBUTE)[0].shape[0] == 1, "the buffer stays on the model"
    assert first.shape[0] == 2 and second.shape[0] == 3
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


def grammar_cases():
    vocabulary = PerceptioSpatialVocabulary(
        seg=3, depth_start=4, depth_end=5, depth_code_offset=10, num_depth_codes=6, num_depth_tokens=3
    )
    prefixes = [[], [3, 3], [3, 4, 10, 11], [4, 10, 11, 12], [4, 10, 11, 12, 5, 7], [7, 8, 9, 1, 2, 0]]
    return vocabulary, prefixes


@pytest.mark.parametrize("prompts_with_images", [None, [True, False]])
def test_grammar_step_traces_whole_without_host_reads(prompts_with_images):
    vocabulary, prefixes = grammar_cases()
    prompt_length = 2
    grammar = PerceptioSpatialGrammarLogitsProcessor(vocabulary, prompt_length, 1, prompts_with_images)
    torch._dynamo.reset()
    # fullgraph: a `.item()`, `.tolist()` or branch on a tensor value in the step would raise instead of syncing.
    compiled = torch.compile(grammar.__call__, fullgraph=True, backend="eager", dynamic=True)
    generator = torch.Generator().manual_seed(0)
    for prefix in prefixes:
        rows = [[1, 2, *prefix], [2, 1, *prefix[::-1]]]
        input_ids = torch.tensor(rows)
        scores = torch.randn(2, 20, generator=generator)
        expected = grammar(input_ids, scores)
        torch.testing.assert_close(compiled(input_ids, scores), expected, rtol=0, atol=0)
        assert torch.isinf(expected).any()


def test_seg_capture_step_traces_whole_without_host_reads(tiny_pair):
    model = tiny_pair[0]
    seg, prompt_length = model.config.seg_token_id, 3
    norm = model.model.language_model.norm
    hidden = torch.randn(2, 1, model.config.text_config.hidden_size)
    capture = generation_perceptio.PerceptioSegStateCapture(model, seg, prompt_length, capacity=2)
    with capture:
        # The prompt forward, eager as in generate: it allocates the buffer.
        capture._remember_input_ids(model, (), {"input_ids": torch.tensor([[seg, 1, 2], [1, 2, 2]])})
        norm(torch.randn(2, prompt_length, hidden.shape[-1]))

        def step(input_ids, states):
            capture._remember_input_ids(model, (), {"input_ids": input_ids})
            return norm(states)

        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="eager")
        outputs = [compiled(torch.tensor([[seg], [7]]), hidden), compiled(torch.tensor([[seg], [seg]]), 2 * hidden)]
    assert capture.states_of_row(1, 1) is not None and capture.states_of_row(0, 1) is None
    torch.testing.assert_close(capture.states_of_row(0, 2), torch.stack([outputs[0][0, 0], outputs[1][0, 0]]))
    torch.testing.assert_close(capture.states_of_row(1, 1), outputs[1][1])


class NormOnly(torch.nn.Module):
    """The module path the `[SEG]` capture hooks into (`model.model.language_model.norm`), with nothing else."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.language_model = torch.nn.Module()
        self.model.language_model.norm = torch.nn.Identity()

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.norm(hidden)


def test_grammar_and_capture_steps_run_on_the_meta_device():
    """On the meta device a tensor has no values: any host read (`.item()`, `.tolist()`, `bool()`, `nonzero`,
    boolean indexing) raises. So the per-step work of the grammar and the capture runs without one."""
    vocabulary, prefixes = grammar_cases()
    meta = torch.device("meta")
    grammar = PerceptioSpatialGrammarLogitsProcessor(vocabulary, 2, 1, [True, False])
    for prefix in prefixes:
        input_ids = torch.tensor([[1, 2, *prefix]] * 2, device=meta)
        assert grammar(input_ids, torch.empty(2, 20, device=meta)).device == meta
    model, seg = NormOnly(), vocabulary.seg
    with generation_perceptio.PerceptioSegStateCapture(model, seg, prompt_length=3, capacity=2) as capture:
        model(input_ids=torch.full((2, 3), seg, device=meta), hidden=torch.empty(2, 3, 8, device=meta))
        for _ in range(3):
            model(input_ids=torch.full((2, 1), seg, device=meta), hidden=torch.empty(2, 1, 8, device=meta))
    assert capture.states.device == meta and capture.states.shape == (2, 3, 8)


def test_decoding_kwargs_modes_and_errors():
    assert decoding_kwargs() == {}
    assert decoding_kwargs(static_cache=True) == {"cache_implementation": "static", "disable_compile": True}
    compiled = decoding_kwargs(static_cache=True, compile=True)
    assert compiled["cache_implementation"] == "static" and compiled["compile_config"]._compile_all_devices
    with pytest.raises(ValueError, match="needs static_cache=True"):
        decoding_kwargs(compile=True)
    with pytest.raises(ValueError, match="static_cache must be True or False"):
        decoding_kwargs(static_cache="yes")


def test_capture_arguments_are_checked(tiny_pair):
    with pytest.raises(ValueError, match="capacity must be a non-negative integer"):
        generation_perceptio.PerceptioSegStateCapture(tiny_pair[0], 3, 0, capacity=-1)


def test_bf16_loading_keeps_the_depth_tokenizer_in_float32_and_attention_passes_through(biased_checkpoint):
    model, processor = load_perceptio_checkpoint(biased_checkpoint, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.grounding_encoder.dtype == torch.bfloat16
    assert model.depth_tokenizer.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    image = images([(40, 70)])[0]
    (prediction,) = model.predict([image], ["Segment the cube."], processor=processor, max_new_tokens=22)
    assert len(prediction.masks) == 1 and prediction.depth is not None
    full, _ = load_perceptio_checkpoint(biased_checkpoint, dtype="float32", attn_implementation="eager")
    configs = (full.config, full.config.text_config, full.config.vision_config, full.config.sam2_config)
    assert {config._attn_implementation for config in configs} == {"eager"}
    codes = torch.tensor([prediction.depth_codes])
    # Bit-equal to the float32 checkpoint's decoding: the tokenizer's weights never went through bf16.
    assert torch.equal(model.depth_tokenizer.decode(codes), full.depth_tokenizer.decode(codes))


def test_predict_static_cache_and_compile_flags_give_the_same_prediction(biased_checkpoint, tmp_path, monkeypatch):
    image_file = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(image_file)
    default = predict_command(biased_checkpoint, image_file, tmp_path / "default", "--attn-implementation", "eager")
    static = predict_command(biased_checkpoint, image_file, tmp_path / "static", "--static-cache")
    asked = []

    def spy(static_cache=False, compile=False):
        asked.append((static_cache, compile))
        return traced_whole() if compile else decoding_kwargs(static_cache, compile)

    monkeypatch.setattr(generation_perceptio, "decoding_kwargs", spy)
    torch._dynamo.reset()
    compiled = predict_command(biased_checkpoint, image_file, tmp_path / "compiled", "--compile", "--dtype", "float32")
    assert asked == [(True, True)], "--compile implies the static cache"
    for result in (static, compiled):
        assert result["token_ids"] == default["token_ids"] and result["depth_codes"] == default["depth_codes"]
        assert result["mask_areas"] == default["mask_areas"] and result["num_masks"] == 1


def test_pipeline_static_cache_field_gives_the_same_prediction(tiny_pair, reference):
    model, processor = tiny_pair
    image = images(SIZES)[0]
    script = spatial_script(model, processor, 2, True)

    def pipe_prediction(**fields):
        pipe = PerceptioSpatialPipeline(
            model=copy.deepcopy(model),
            processor=processor,
            tokenizer=processor.tokenizer,
            image_processor=processor.image_processor,
            **fields,
        )
        prompt_length = processor(images=[image], text=[processor.format_prompt("Segment.")])["input_ids"].shape[1]
        force = ForceScript(prompt_length, [script])
        return pipe, pipe(image, prompt="Segment.", logits_processor=[force], max_new_tokens=len(script) + 2)

    (_, default), (pipe, static) = pipe_prediction(), pipe_prediction(static_cache=True)
    assert pipe._forward_params["cache_implementation"] == "static"
    assert static.token_ids == default.token_ids and static.depth_codes == default.depth_codes
    assert all(np.array_equal(a, b) for a, b in zip(static.masks, default.masks)) and len(static.masks) == 2
