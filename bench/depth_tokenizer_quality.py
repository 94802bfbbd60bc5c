"""Quality benchmark of the depth tokenizer on depth maps the project renders itself.

Renders synthetic scenes with `perceptio.data.scene_rendering.render_scene` (exact metric depth), converts them to
relative inverse depth with `metric_depth_to_inverse_depth` (the tokenizer's convention), trains a tokenizer with
`train_depth_tokenizer` and evaluates decode(encode(d)) against d on held-out scenes.

Targets: pair-order accuracy of the reconstruction >= 95% (Aurora's ground-truth codes: 95.7%) and
>= 50% of the codebook in use.

Config used by default (chosen so the run fits in about 15 minutes on 2 shared CPU cores): the default token
layout (10x10 grid, N = 100 codes, K = 128) on 80x80 maps: image_size 80, hidden_channels [32, 64, 128] (three
stride-2 4x4 convolutions), 2 residual blocks, codebook_dim 64, EMA decay 0.99, commitment 0.25, dead codes
revived after 20 unused steps; 2400 training scenes + 200 held-out scenes, batch 32, AdamW lr 1e-3 (cosine), 800 steps.
Pair-order accuracy: 1000 random point pairs per held-out map whose normalised inverse depths differ by > 0.05.

    python bench/depth_tokenizer_quality.py --output-dir runs/depth_tokenizer_bench
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from perceptio.data.scene_rendering import metric_depth_to_inverse_depth, render_scene
from perceptio.models.perceptio.configuration_perceptio_depth_tokenizer import PerceptioDepthTokenizerConfig
from perceptio.trainers.depth_tokenizer_trainer import train_depth_tokenizer


PAIR_ORDER_TARGET = 0.95
CODEBOOK_USAGE_TARGET = 0.5


def rendered_inverse_depth(num_scenes: int, image_size: int, first_seed: int) -> np.ndarray:
    """(num_scenes, image_size, image_size) relative inverse depth of consecutive scene seeds."""
    maps = [
        metric_depth_to_inverse_depth(render_scene(seed, image_size=image_size).depth)
        for seed in tqdm(range(first_seed, first_seed + num_scenes), desc="Rendering scenes")
    ]
    return np.stack(maps).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/depth_tokenizer_bench")
    parser.add_argument("--train-scenes", type=int, default=2400)
    parser.add_argument("--eval-scenes", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=80)
    parser.add_argument("--hidden-channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--codebook-dim", type=int, default=64)
    parser.add_argument("--num-codes", type=int, default=128)
    parser.add_argument("--dead-code-threshold-steps", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    maps = rendered_inverse_depth(args.train_scenes + args.eval_scenes, args.image_size, first_seed=args.seed)
    config = PerceptioDepthTokenizerConfig(
        image_size=args.image_size,
        hidden_channels=args.hidden_channels,
        codebook_dim=args.codebook_dim,
        num_codes=args.num_codes,
        dead_code_threshold_steps=args.dead_code_threshold_steps,
    )
    result = train_depth_tokenizer(
        args.output_dir,
        depth_maps=maps,
        config=config,
        eval_fraction=args.eval_scenes / len(maps),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=50,
        logging_steps=100,
        save_steps=args.max_steps,
        seed=args.seed,
        dataloader_drop_last=True,
    )
    evaluation = result.evaluation
    elapsed = time.perf_counter() - started
    pair_order_passed = evaluation.pair_order_accuracy >= PAIR_ORDER_TARGET
    usage_passed = evaluation.codebook_usage >= CODEBOOK_USAGE_TARGET
    print(
        f"\nheld-out scenes: {evaluation.num_maps}, grid {config.grid_size}x{config.grid_size}, K = {config.num_codes}"
    )
    print(
        f"pair-order accuracy {evaluation.pair_order_accuracy:.2%} (target >= {PAIR_ORDER_TARGET:.0%}): "
        f"{'PASS' if pair_order_passed else 'FAIL'}"
    )
    print(
        f"codebook usage {evaluation.codebook_usage:.2%} (target >= {CODEBOOK_USAGE_TARGET:.0%}): "
        f"{'PASS' if usage_passed else 'FAIL'}"
    )
    print(f"wall time {elapsed:.0f} s")
    return 0 if pair_order_passed and usage_passed else 1


if __name__ == "__main__":
    sys.exit(main())
