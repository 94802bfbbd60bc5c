"""The `synthetic-tiny` recipe: a tiny Perceptio trained end to end on CPU on rendered 3D scenes.

One call (or `perceptio train --recipe synthetic-tiny --output-dir DIR`) renders the synthetic dataset, distils a
depth tokenizer on its exact depth, pretrains the tiny SAM2 on point prompts over rendered instance masks (the
stand-in for a released SAM2 checkpoint), trains a tiny Perceptio with `PerceptioTrainer` on the task mixture
(referring segmentation, HardBLINK-style relative depth, VQA) with the SAM2 image encoder frozen, as Sa2VA keeps it,
and saves the result. Everything follows from `seed`.

Ablations (DESIGN.md §9 and issue 7) train with the same data, steps and seed:

- `full`: the recipe as described.
- `no-depth-tokens`: no sample carries a depth block.
- `no-seg`: no sample carries `[SEG]` tokens or masks.
- `depth-lm-only`: depth blocks are learned by language-model cross-entropy alone (marker, token, count and
  reconstruction weights 0).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import TrainingArguments

from ..data.scene_rendering import metric_depth_to_inverse_depth
from ..data.synthetic_dataset import DEFAULT_TASK_WEIGHTS, build_synthetic_dataset
from ..modeling_perceptio import PerceptioConfig, PerceptioDepthTokenizerConfig, PerceptioForConditionalGeneration
from ..processing import PerceptioImageProcessor, PerceptioProcessor
from ..tiny_models import tiny_sam2_config, train_tiny_tokenizer
from .collator_perceptio import PerceptioDataCollator
from .data_mixture import add_depth_code_column
from .depth_tokenizer_trainer import train_depth_tokenizer
from .grounding_pretraining import GroundingPretrainingResult, pretrain_grounding_encoder, render_instance_scenes
from .trainer_perceptio import PerceptioTrainer

ABLATIONS = ("full", "no-depth-tokens", "no-seg", "depth-lm-only")
# Saved next to the model (`output_dir/dataset`) for `perceptio eval synthetic`; the training split stays in the cache.
EVALUATION_SPLITS = ("validation", "test")
GROUNDING_EVAL_SCENES = 200
DEPTH_LOSS_WEIGHT_FIELDS = (
    "depth_marker_loss_weight",
    "depth_token_loss_weight",
    "depth_count_loss_weight",
    "depth_recon_loss_weight",
)


@dataclass
class SyntheticTinyRecipe:
    """Every setting of the recipe; the defaults are the shipped checkpoint's."""

    seed: int = 0
    image_size: int = 128
    num_train: int = 6000
    num_validation: int = 64
    num_test: int = 300
    task_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    depth_image_size: int = 64
    depth_hidden_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    depth_codebook_dim: int = 32
    depth_num_codes: int = 64
    depth_tokenizer_steps: int = 600
    grounding_scenes: int = 2000
    grounding_steps: int = 400
    grounding_learning_rate: float = 2e-3
    mask_bce_weight: float = 1.0
    mask_dice_weight: float = 2.0
    text_hidden_size: int = 192
    text_intermediate_size: int = 512
    text_num_layers: int = 4
    vision_hidden_size: int = 64
    vision_patch_size: int = 8
    train_steps: int = 1400
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    logging_steps: int = 25

    def __post_init__(self):
        positive = (
            "image_size",
            "num_train",
            "num_test",
            "depth_image_size",
            "depth_codebook_dim",
            "depth_num_codes",
            "depth_tokenizer_steps",
            "grounding_scenes",
            "grounding_steps",
            "text_hidden_size",
            "text_intermediate_size",
            "text_num_layers",
            "vision_hidden_size",
            "vision_patch_size",
            "train_steps",
            "batch_size",
            "logging_steps",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.image_size % self.vision_patch_size or (self.image_size // self.vision_patch_size) % 2:
            raise ValueError(
                f"image_size ({self.image_size}) must be an even multiple of vision_patch_size "
                f"({self.vision_patch_size}) so InternVL's pixel shuffle tiles the patch grid."
            )
        if not self.learning_rate > 0 or not self.grounding_learning_rate > 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("learning_rate and grounding_learning_rate must be > 0 and warmup_ratio in [0, 1).")
        if self.mask_bce_weight < 0 or self.mask_dice_weight < 0:
            raise ValueError("mask_bce_weight and mask_dice_weight must be >= 0.")

    @property
    def image_seq_length(self) -> int:
        """Image tokens per tile: the patch grid after InternVL's 2× pixel shuffle."""
        return (self.image_size // self.vision_patch_size // 2) ** 2

    def depth_tokenizer_config(self) -> PerceptioDepthTokenizerConfig:
        """The depth tokenizer of the recipe: a (depth_image_size / 8)² code grid, so N = 64 by default."""
        return PerceptioDepthTokenizerConfig(
            image_size=self.depth_image_size,
            hidden_channels=list(self.depth_hidden_channels),
            num_residual_blocks=1,
            codebook_dim=self.depth_codebook_dim,
            num_codes=self.depth_num_codes,
            dead_code_threshold_steps=20,
        )


def build_recipe_processor(recipe: SyntheticTinyRecipe) -> PerceptioProcessor:
    """The tiny tokenizer with one tile of the rendered size and a 128-pixel SAM2 view."""
    image_processor = PerceptioImageProcessor(
        tile_size=recipe.image_size, max_num_tiles=1, sam_image_size=tiny_sam2_config().prompt_encoder_config.image_size
    )
    return PerceptioProcessor(
        image_processor=image_processor,
        tokenizer=train_tiny_tokenizer(),
        num_depth_codes=recipe.depth_num_codes,
        image_seq_length=recipe.image_seq_length,
    )


def build_recipe_model(
    recipe: SyntheticTinyRecipe, processor: PerceptioProcessor, depth_tokenizer
) -> PerceptioForConditionalGeneration:
    """A randomly initialised Perceptio of the recipe's size that embeds the trained depth tokenizer.

    Its SAM2 decodes one mask per `[SEG]` (no candidates to rank with an IoU head trained from scratch) and its mask
    loss leans on Dice: with BCE-heavy weights a from-scratch decoder settles on empty masks, objects being a few
    percent of the image.
    """
    ids = processor.spatial_ids
    sam2_config = tiny_sam2_config()
    sam2_config.mask_decoder_config.dynamic_multimask_via_stability = False
    heads = max(1, recipe.text_hidden_size // 48)
    config = PerceptioConfig(
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(processor.tokenizer),
            "hidden_size": recipe.text_hidden_size,
            "intermediate_size": recipe.text_intermediate_size,
            "num_hidden_layers": recipe.text_num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": recipe.vision_hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 4 * recipe.vision_hidden_size,
            "image_size": recipe.image_size,
            "patch_size": recipe.vision_patch_size,
        },
        image_seq_length=recipe.image_seq_length,
        image_token_id=ids.image_context,
        tie_word_embeddings=False,
        sam2_config=sam2_config,
        sam2_multimask_output=False,
        mask_bce_weight=recipe.mask_bce_weight,
        mask_dice_weight=recipe.mask_dice_weight,
        depth_tokenizer_config=depth_tokenizer.config,
        seg_token_id=ids.seg,
        depth_start_token_id=ids.depth_start,
        depth_end_token_id=ids.depth_end,
        depth_code_token_offset=ids.depth_code_offset,
        num_depth_codes=ids.num_depth_codes,
        num_depth_tokens=depth_tokenizer.config.num_tokens,
    )
    torch.manual_seed(recipe.seed)
    model = PerceptioForConditionalGeneration(config)
    model.depth_tokenizer.load_state_dict(depth_tokenizer.state_dict())
    return model


def ablate(dataset: Dataset, ablation: str) -> Dataset:
    """The training split as an ablation sees it (targets without depth blocks or without `[SEG]`)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}.")
    if ablation == "no-depth-tokens":
        return dataset.map(lambda row: {"use_depth_block": False}, desc="No depth blocks")
    if ablation == "no-seg":
        return dataset.map(lambda row: {"masks": []}, desc="No [SEG]")
    return dataset


def train_recipe_tokenizer(recipe: SyntheticTinyRecipe, train_split: Dataset, output_dir: Path):
    """Distil the recipe's depth tokenizer on the exact inverse depth of the training scenes."""
    depth = np.stack([metric_depth_to_inverse_depth(np.asarray(row)) for row in train_split["depth"]])
    result = train_depth_tokenizer(
        output_dir,
        depth_maps=depth,
        config=recipe.depth_tokenizer_config(),
        max_steps=recipe.depth_tokenizer_steps,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        logging_steps=recipe.logging_steps,
        save_steps=recipe.depth_tokenizer_steps,
        seed=recipe.seed,
        eval_fraction=0.05,
        lr_scheduler_type="cosine",
    )
    return result.tokenizer, result.evaluation


def pretrain_recipe_grounding(
    recipe: SyntheticTinyRecipe, model: PerceptioForConditionalGeneration, processor: PerceptioProcessor
) -> GroundingPretrainingResult:
    """Train the model's SAM2 on point prompts over freshly rendered scenes, then freeze its image encoder."""
    train_scenes = render_instance_scenes(recipe.grounding_scenes, processor.image_processor, recipe.seed, "train")
    eval_scenes = render_instance_scenes(GROUNDING_EVAL_SCENES, processor.image_processor, recipe.seed, "eval")
    result = pretrain_grounding_encoder(
        model,
        train_scenes,
        eval_scenes,
        steps=recipe.grounding_steps,
        batch_size=recipe.batch_size,
        learning_rate=recipe.grounding_learning_rate,
        seed=recipe.seed,
        logging_steps=recipe.logging_steps,
    )
    model.grounding_encoder.vision_encoder.requires_grad_(False)
    return result


def train_recipe_model(
    recipe: SyntheticTinyRecipe,
    model: PerceptioForConditionalGeneration,
    processor: PerceptioProcessor,
    train_split: Dataset,
    output_dir: Path,
    ablation: str = "full",
) -> list[dict[str, Any]]:
    """Train every weight of the tiny model (except the frozen depth tokenizer) on the task mixture."""
    if ablation == "depth-lm-only":
        for name in DEPTH_LOSS_WEIGHT_FIELDS:
            setattr(model.config, name, 0.0)
    train_split = add_depth_code_column(ablate(train_split, ablation), model.depth_tokenizer)
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=recipe.train_steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=int(recipe.warmup_ratio * recipe.train_steps),
        weight_decay=0.0,
        logging_steps=recipe.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = PerceptioTrainer(
        model=model,
        args=arguments,
        train_dataset=train_split,
        data_collator=PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer),
    )
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def run_synthetic_tiny_recipe(
    output_dir: str | Path,
    recipe: SyntheticTinyRecipe | None = None,
    ablation: str = "full",
) -> dict[str, Any]:
    """Run the whole recipe; save `output_dir/model` (model + processor), `output_dir/dataset` (the validation and
    test splits, for `perceptio eval synthetic`) and `output_dir/recipe_summary.json`.

    Returns the summary: settings, timings, the depth tokenizer's evaluation, SAM2's point-prompt IoU before and after
    its pretraining, and the training log.
    """
    recipe = recipe if recipe is not None else SyntheticTinyRecipe()
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    dataset: DatasetDict = build_synthetic_dataset(
        recipe.num_train,
        recipe.num_validation,
        recipe.num_test,
        image_size=recipe.image_size,
        seed=recipe.seed,
        tasks=recipe.task_weights,
        cache_dir=str(output_dir / "dataset_cache"),
    )
    DatasetDict({split: dataset[split] for split in EVALUATION_SPLITS}).save_to_disk(str(output_dir / "dataset"))
    timings["dataset_s"] = time.perf_counter() - started
    tokenizer_started = time.perf_counter()
    depth_tokenizer, tokenizer_evaluation = train_recipe_tokenizer(recipe, dataset["train"], output_dir / "depth_tokenizer")
    timings["depth_tokenizer_s"] = time.perf_counter() - tokenizer_started
    processor = build_recipe_processor(recipe)
    model = build_recipe_model(recipe, processor, depth_tokenizer)
    grounding_started = time.perf_counter()
    grounding = pretrain_recipe_grounding(recipe, model, processor)
    timings["grounding_s"] = time.perf_counter() - grounding_started
    model_started = time.perf_counter()
    log = train_recipe_model(recipe, model, processor, dataset["train"], output_dir / "trainer", ablation)
    timings["model_s"] = time.perf_counter() - model_started
    timings["total_s"] = time.perf_counter() - started
    model.eval()
    model.save_pretrained(output_dir / "model")
    processor.save_pretrained(output_dir / "model")
    summary = {
        "recipe": asdict(recipe),
        "ablation": ablation,
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "timings": timings,
        "depth_tokenizer_evaluation": tokenizer_evaluation.to_dict(),
        "grounding_pretraining": asdict(grounding),
        "training_log": log,
    }
    (output_dir / "recipe_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
