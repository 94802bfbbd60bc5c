"""Training-step time of the full Perceptio objective against LM + mask alone, on the same model and batch.

Both variants run the identical forward pass (LLM, vision tower, SAM2 mask path) and a backward + optimizer step:

- full: `model(**batch)` — loss_lm + loss_mask + loss_mask_iou + the four depth-token terms (including the soft-merged VQ-VAE
  decoding), as trained;
- LM + mask: the same call without `labels` (so the model computes `loss_mask` and `loss_mask_iou` from `gt_masks` but none of the depth
  terms), and `loss_lm` computed from the returned logits by the model's own `loss_function`: the depth losses are
  not just weighted 0 but never computed, and the model gets no extra code path.

The batch carries depth blocks in both cases, so sequence lengths are identical. Variants alternate step by step and
the median of each is reported, so machine load drifts affect both alike.

    python bench/training_step.py               # tiny config and ~100M config
    python bench/training_step.py --repeats 5 --configs tiny
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from tqdm.auto import tqdm
from training_objectives import full_objective, lm_and_mask_objective  # the script's folder is on sys.path

from perceptio.models.perceptio.configuration_perceptio_depth_tokenizer import PerceptioDepthTokenizerConfig
from perceptio.models.perceptio.modeling_perceptio import PerceptioForConditionalGeneration
from perceptio.tiny_models import build_tiny_perceptio, build_tiny_processor, tiny_perceptio_config
from perceptio.trainers.collator_perceptio import PerceptioDataCollator


TARGET_RATIO = 1.10
IMAGE_SIDE = 64
# ~100M parameters: a 12-layer, 768-wide Qwen2 text model; the real depth tokenizer's size (N = 100, K = 128).
MEDIUM_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
}
MEDIUM_NUM_DEPTH_CODES = 128


def medium_perceptio(seed: int = 0):
    """The ~100M-parameter configuration and its processor."""
    processor = build_tiny_processor(num_depth_codes=MEDIUM_NUM_DEPTH_CODES, max_num_tiles=1)
    config = tiny_perceptio_config(len(processor.tokenizer), processor.spatial_vocabulary)
    config.text_config.update(MEDIUM_TEXT)
    config.text_config.layer_types = ["full_attention"] * MEDIUM_TEXT["num_hidden_layers"]
    config.depth_tokenizer_config = PerceptioDepthTokenizerConfig()
    config.num_depth_tokens = config.depth_tokenizer_config.num_tokens
    torch.manual_seed(seed)
    return PerceptioForConditionalGeneration(config), processor


def benchmark_batch(model, processor, batch_size: int) -> dict:
    rng = np.random.default_rng(0)
    samples = []
    for index in range(batch_size):
        mask = np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
        mask[8 + index : 40 + index, 10:44] = 255
        samples.append(
            {
                "image": rng.integers(0, 256, size=(IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8),
                "prompt": "Segment the red cube and tell which point is closer.",
                "answer": "(A)",
                "masks": [mask],
                "depth": rng.uniform(1.0, 8.0, size=(IMAGE_SIDE, IMAGE_SIDE)).astype(np.float32),
                "use_depth_block": True,
            }
        )
    return PerceptioDataCollator(processor, model.depth_tokenizer, max_num_tiles=1)(samples)


def time_step(model, optimizer, objective, batch) -> float:
    start = time.perf_counter()
    loss = objective(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def measure(name: str, model, processor, batch_size: int, repeats: int) -> float:
    model.train()
    batch = benchmark_batch(model, processor, batch_size)
    # SGD with lr 0 keeps the weights (and so the work per step) fixed while still running the optimizer step.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    objectives = {"full": full_objective, "lm+mask": lm_and_mask_objective}
    for objective in objectives.values():
        time_step(model, optimizer, objective, batch)  # warm-up
    times = {label: [] for label in objectives}
    for _ in tqdm(range(repeats), desc=name):
        for label, objective in objectives.items():
            times[label].append(time_step(model, optimizer, objective, batch))
    full, base = statistics.median(times["full"]), statistics.median(times["lm+mask"])
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{name}: {parameters:.1f}M params, batch {batch_size} x {batch['input_ids'].shape[1]} tokens, "
        f"N={model.config.num_depth_tokens}, K={model.config.num_depth_codes} | full {full * 1e3:.1f} ms, "
        f"LM+mask {base * 1e3:.1f} ms (median of {repeats}) | ratio {full / base:.3f}x (target <= {TARGET_RATIO}x)"
    )
    return full / base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    if args.repeats <= 0 or args.batch_size <= 0:
        raise ValueError("--repeats and --batch-size must be positive.")
    builders = {"tiny": lambda: build_tiny_perceptio(seed=0, max_num_tiles=1), "medium": medium_perceptio}
    for name in args.configs:
        model, processor = builders[name]()
        measure(name, model, processor, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
