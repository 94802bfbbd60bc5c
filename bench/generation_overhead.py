"""Generation benchmark of Perceptio against transformers' plain InternVL on the same weights.

Three measurements, each on the tiny test config and on a ~100M-parameter config defined here, in one run:

1. generation overhead: `PerceptioForConditionalGeneration.generate` with the spatial grammar on and `[SEG]` capture
   on (`return_dict_in_generate=True`, as `predict` runs it) vs `InternVLForConditionalGeneration.generate` loaded with
   the same state dict, same prompt, same number of new tokens (greedy, min = max new tokens). Target <= 1.05x.
2. mask stage: `predict_masks` for 8 `[SEG]` states on one image vs 1 (SAM2 image embedding once, one mask-decoder
   call). Target <= 1.5x.
3. batching: `predict_from_inputs` on 8 prompts of different lengths (left padded), one 64-px image each, as one
   batch vs 8 one-by-one calls, `--batch-new-tokens` new tokens (64: about a depth block plus a short answer).
   Target >= 3x throughput on CPU at the ~100M config. Prefill gains nothing from batching on a CPU (it is compute
   bound either way), decoding gains a lot, so the ratio grows with the number of new tokens.

Times are medians of `--repeats` runs after a warm-up, with the two sides of each comparison interleaved so that
load from other processes hits both alike.

    python bench/generation_overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import InternVLConfig, InternVLForConditionalGeneration

from perceptio.models.perceptio.configuration_perceptio import PerceptioConfig
from perceptio.models.perceptio.modeling_perceptio import PerceptioForConditionalGeneration
from perceptio.tiny_models import build_tiny_perceptio, build_tiny_processor, tiny_perceptio_config


OVERHEAD_TARGET = 1.05
MASK_STAGE_TARGET = 1.5
BATCH_SPEEDUP_TARGET = 3.0
MANY_SEG = 8
BATCH_SIZE = 8
# ~100M parameters: a 16-layer, 768-wide Qwen2 text model (≈98M with embeddings) and a 4-layer, 256-wide vision tower.
MEDIUM_TEXT_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
}
MEDIUM_VISION_CONFIG = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
}


def medium_perceptio(seed: int):
    """A randomly initialised ~100M-parameter Perceptio with the tiny processor (64-px tiles, 128-px SAM2 input)."""
    processor = build_tiny_processor()
    config_dict = tiny_perceptio_config(len(processor.tokenizer), processor.spatial_vocabulary).to_dict()
    for name, sizes in (("text_config", MEDIUM_TEXT_CONFIG), ("vision_config", MEDIUM_VISION_CONFIG)):
        # Per-layer settings are derived from the layer count again when absent.
        config_dict[name].pop("layer_types", None)
        config_dict[name].update(sizes)
    torch.manual_seed(seed)
    model = PerceptioForConditionalGeneration(PerceptioConfig(**config_dict)).eval()
    return model, processor


def plain_internvl(model: PerceptioForConditionalGeneration) -> InternVLForConditionalGeneration:
    """transformers' InternVL with the Perceptio model's InternVL weights (everything but SAM2, fcs, depth)."""
    config = model.config
    plain_config = InternVLConfig(
        text_config=config.text_config.to_dict(),
        vision_config=config.vision_config.to_dict(),
        image_token_id=config.image_token_id,
        image_seq_length=config.image_seq_length,
        downsample_ratio=config.downsample_ratio,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    plain = InternVLForConditionalGeneration(plain_config).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    extra_modules = ("grounding_encoder.", "text_hidden_fcs.", "depth_tokenizer.")
    if missing or any(not key.startswith(extra_modules) for key in unexpected):
        raise RuntimeError(f"State dicts differ beyond Perceptio's extra modules: missing {missing[:5]}.")
    return plain


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of two functions run alternately (after one warm-up call each)."""
    first(), second()
    times_first, times_second = [], []
    for _ in range(repeats):
        times_first.append(median_seconds(first, 1))
        times_second.append(median_seconds(second, 1))
    return statistics.median(times_first), statistics.median(times_second)


def bench_image() -> np.ndarray:
    """A 48x72 random image (two tiles and a thumbnail at the tiny processor's settings)."""
    return np.random.default_rng(0).integers(0, 256, size=(48, 72, 3), dtype=np.uint8)


def generation_overhead(model, processor, new_tokens: int, repeats: int) -> tuple[float, float]:
    plain = plain_internvl(model)
    inputs = processor(images=[bench_image()], text=[processor.format_prompt("Describe the scene.")])
    inputs = {key: value for key, value in inputs.items() if key != "sam_pixel_values"}
    common = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    plain_output = plain.generate(**inputs, **common)
    ours = model.generate(**inputs, **common, return_dict_in_generate=True)
    if plain_output.shape != ours.sequences.shape:
        raise RuntimeError("The two models generated different numbers of tokens.")
    return interleaved_medians(
        lambda: plain.generate(**inputs, **common),
        lambda: model.generate(**inputs, **common, return_dict_in_generate=True),
        repeats,
    )


@torch.no_grad()
def mask_stage(model, processor, repeats: int) -> tuple[float, float]:
    inputs = processor(images=[bench_image()], text=[processor.format_prompt("Segment.")])
    hidden_size = model.config.text_config.hidden_size
    states = torch.randn(MANY_SEG, hidden_size, generator=torch.Generator().manual_seed(0))
    sam_pixel_values = inputs["sam_pixel_values"]
    return interleaved_medians(
        lambda: model.predict_masks([states[:1]], sam_pixel_values),
        lambda: model.predict_masks([states], sam_pixel_values),
        repeats,
    )


def batching(model, processor, new_tokens: int, repeats: int) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(BATCH_SIZE)]
    prompts = [
        processor.format_prompt(f"Question {index}: what is in the image{'?' * (index % 3 + 1)}")
        for index in range(BATCH_SIZE)
    ]
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def one_batch():
        inputs = processor(images=images, text=prompts)
        model.predict_from_inputs(inputs, processor=processor, original_sizes=processor.image_sizes(images), **common)

    def one_by_one():
        for image, prompt in zip(images, prompts):
            inputs = processor(images=[image], text=[prompt])
            model.predict_from_inputs(
                inputs, processor=processor, original_sizes=processor.image_sizes([image]), **common
            )

    return interleaved_medians(one_by_one, one_batch, repeats)


def report(name: str, model, processor, new_tokens: int, batch_new_tokens: int, repeats: int) -> dict[str, float]:
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(
        f"\n== {name}: {parameters / 1e6:.1f}M parameters, {new_tokens} new tokens ({batch_new_tokens} for "
        f"batching), median of {repeats} runs =="
    )
    plain_time, ours_time = generation_overhead(model, processor, new_tokens, repeats)
    overhead = ours_time / plain_time
    print(
        f"generation: InternVL {plain_time * 1e3:.1f} ms, Perceptio {ours_time * 1e3:.1f} ms -> overhead "
        f"{overhead:.3f}x (target <= {OVERHEAD_TARGET}x)"
    )
    one_time, many_time = mask_stage(model, processor, repeats)
    mask_ratio = many_time / one_time
    print(
        f"mask stage: 1 [SEG] {one_time * 1e3:.1f} ms, {MANY_SEG} [SEG] {many_time * 1e3:.1f} ms -> "
        f"{mask_ratio:.2f}x (target <= {MASK_STAGE_TARGET}x)"
    )
    sequential_time, batch_time = batching(model, processor, batch_new_tokens, repeats)
    speedup = sequential_time / batch_time
    print(
        f"batching: {BATCH_SIZE} one-by-one {sequential_time:.2f} s, one batch of {BATCH_SIZE} {batch_time:.2f} s -> "
        f"throughput {speedup:.2f}x (target >= {BATCH_SPEEDUP_TARGET}x)"
    )
    return {"overhead": overhead, "mask_ratio": mask_ratio, "batch_speedup": speedup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on shared cores)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement at the ~100M config")
    parser.add_argument("--tiny-repeats", type=int, default=15, help="runs per measurement at the tiny config")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens of the overhead measurement")
    parser.add_argument("--batch-new-tokens", type=int, default=64, help="new tokens of the batching measurement")
    parser.add_argument("--skip-medium", action="store_true", help="only the tiny config")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    configs = [("tiny", lambda: build_tiny_perceptio(seed=0), args.tiny_repeats)]
    if not args.skip_medium:
        configs.append(("~100M", lambda: medium_perceptio(seed=0), args.repeats))
    results = {}
    for name, build, repeats in tqdm(configs, desc="Configs"):
        model, processor = build()
        with torch.no_grad():
            results[name] = report(name, model, processor, args.new_tokens, args.batch_new_tokens, repeats)
    print("\nsummary (ratios):")
    for name, values in results.items():
        print(
            f"  {name}: overhead {values['overhead']:.3f}x, mask 8 vs 1 {values['mask_ratio']:.2f}x, "
            f"batch 8 vs sequential {values['batch_speedup']:.2f}x"
        )


if __name__ == "__main__":
    main()
