"""The `synthetic-tiny` recipe: a tiny Perceptio trained end to end on CPU on rendered 3D scenes.

One call (or `perceptio train --recipe synthetic-tiny --output-dir DIR`) renders the synthetic dataset, distils a
depth tokenizer on its exact depth, pretrains the vision tower on dense patch labels (`vision_pretraining_steps`; a
stand-in for a pretrained InternViT, see `vision_pretraining`; `freeze_vision_tower` then keeps it fixed, as Sa2VA
keeps InternViT, or `vision_tower_learning_rate` trains it on at its own rate), starts the projector from probes of
the tower's tokens (`projector_from_probes`), with prompts that put the question before the image
(`question_before_image`), pretrains the tiny SAM2 on
attribute prompts over rendered instance masks (the stand-in for a released SAM2 checkpoint), trains a tiny
Perceptio with `PerceptioTrainer` on the task mixture (referring segmentation, HardBLINK-style relative depth, VQA)
with the SAM2 image encoder frozen, as Sa2VA keeps it, and saves the result. Everything follows from `seed`.

The main stage has two parts. A reading stage trains on the answer tasks alone (`reading_tasks`: short answers that
only the image can give, no depth blocks, no masks), so the language model learns to read image tokens before the
long depth blocks and `[SEG]`s of the mixture compete for it; then the whole mixture. The reading stage is a
curriculum (`reading_curriculum`): scenes of one object, where a question can only be about that object, then of two,
then the full scenes, where the question's phrase must first pick its object out among several. SAM2 (pretrained
on attribute prompts, see `grounding_pretraining`) stays frozen throughout when `freeze_grounding_encoder` is set, so
the mask can only follow the sentence through the `[SEG]` states the language model writes.

A last stage (`mask_decoder_steps`) trains only `text_hidden_fcs` and SAM2's mask decoder on the referring rows, every
other weight frozen: the decoder learns to read the `[SEG]` prompts the language model now writes (computed once per
row, `mask_decoder_stage`), while the text answers and depth blocks stay exactly as the main stage left them.

Ablations train with the same data, steps and seed:

- `full`: the recipe as described.
- `no-depth-tokens`: no sample carries a depth block.
- `no-seg`: no sample carries `[SEG]` tokens or masks.
- `depth-lm-only`: depth blocks are learned by language-model cross-entropy alone (marker, token, count and
  reconstruction weights 0).
- `no-seg-attribute-loss`: the `[SEG]` attribute heads are built (so the initialisation is the same) but
  `loss_seg_attribute` is weighted 0.

Ablations act from the main stage on, so the arms of one recipe share every stage before it: with a
`shared_stages_dir`, the first arm saves them and the others start their main stage from them
(`recipe_shared_stages`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import TrainingArguments

from ..data.scene_rendering import metric_depth_to_inverse_depth
from ..data.seg_attributes import (
    SEG_ATTRIBUTE_COLUMN,
    add_seg_attribute_column,
    seg_attribute_classes,
)
from ..data.synthetic_dataset import build_synthetic_dataset
from ..data.synthetic_tasks import DEFAULT_TASK_CONFIG, without_depth_block
from ..models.perceptio import (
    PerceptioConfig,
    PerceptioForConditionalGeneration,
    PerceptioImageProcessor,
    PerceptioProcessor,
)
from ..tiny_models import tiny_sam2_config, train_tiny_tokenizer
from .collator_perceptio import PerceptioDataCollator
from .data_mixture import add_depth_code_column, rows_with_masks
from .depth_tokenizer_trainer import train_depth_tokenizer
from .grounding_pretraining import (
    AttributePromptEmbedding,
    GroundingPretrainingResult,
    pretrain_grounding_encoder,
    render_instance_scenes,
)
from .mask_decoder_stage import MaskDecoderStageSettings, collect_seg_states, train_mask_decoder_on_seg_states
from .projector_from_probes import ProjectorProbeResult, fit_projector_from_probes, token_cell_size
from .recipe_compute import recipe_device, subnormals_flushed, torch_threads
from .recipe_shared_stages import PreMainStages, load_pre_main_stages, save_pre_main_stages
from .seg_attribute_accuracy import seg_attribute_accuracy
from .seg_prompt_targets import add_seg_prompt_column
from .synthetic_recipe_settings import (
    DEPTH_LOSS_WEIGHT_FIELDS,
    SyntheticTinyRecipe,
)
from .trainer_perceptio import PerceptioTrainer
from .vision_pretraining import (
    PatchLabelledScenes,
    VisionPretrainingResult,
    pretrain_vision_tower,
    render_patch_labelled_scenes,
)


logger = logging.getLogger(__name__)


ABLATIONS = ("full", "no-depth-tokens", "no-seg", "depth-lm-only", "no-seg-attribute-loss")
# Saved next to the model (`output_dir/dataset`) for `perceptio eval synthetic`; the training split stays in the cache.
EVALUATION_SPLITS = ("validation", "test")
GROUNDING_EVAL_SCENES = 200
VISION_EVAL_SCENES = 200


def build_recipe_processor(recipe: SyntheticTinyRecipe) -> PerceptioProcessor:
    """The tiny tokenizer with one tile of the rendered size and a 128-pixel SAM2 view."""
    image_processor = PerceptioImageProcessor(
        tile_size=recipe.image_size,
        max_num_tiles=1,
        sam_image_size=tiny_sam2_config().prompt_encoder_config.image_size,
    )
    return PerceptioProcessor(
        image_processor=image_processor,
        tokenizer=train_tiny_tokenizer(),
        num_depth_codes=recipe.depth_num_codes,
        image_seq_length=recipe.image_seq_length,
        text_before_images=recipe.question_before_image,
    )


def build_recipe_model(
    recipe: SyntheticTinyRecipe, processor: PerceptioProcessor, depth_tokenizer
) -> PerceptioForConditionalGeneration:
    """A randomly initialised Perceptio of the recipe's size that embeds the trained depth tokenizer.

    Its SAM2 decodes one mask per `[SEG]` (no candidates to rank with an IoU head trained from scratch) and its mask
    loss leans on Dice: with BCE-heavy weights a from-scratch decoder settles on empty masks, objects being a few
    percent of the image. With `seg_attribute_loss_weight` > 0 it has `seg_attribute_heads` for the labels of
    `seg_attribute_target`, so each `[SEG]` state learns to carry what its phrase names (or which object it refers to).
    """
    vocabulary = processor.spatial_vocabulary.with_num_depth_tokens(depth_tokenizer.config.num_tokens)
    sam2_config = tiny_sam2_config(recipe.sam2_backbone_hidden_size, recipe.sam2_hidden_size, recipe.sam2_patch_stride)
    sam2_config.mask_decoder_config.dynamic_multimask_via_stability = False
    heads = recipe.attention_heads
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
            "num_hidden_layers": recipe.vision_num_layers,
            "num_attention_heads": 4,
            "intermediate_size": 4 * recipe.vision_hidden_size,
            "image_size": recipe.image_size,
            "patch_size": recipe.vision_patch_size,
        },
        image_seq_length=recipe.image_seq_length,
        tie_word_embeddings=False,
        sam2_config=sam2_config,
        sam2_multimask_output=False,
        mask_bce_weight=recipe.mask_bce_weight,
        mask_dice_weight=recipe.mask_dice_weight,
        lm_loss_reduction=recipe.lm_loss_reduction,
        seg_attribute_classes=(
            seg_attribute_classes(recipe.seg_attribute_target) if recipe.seg_attribute_loss_weight else None
        ),
        seg_attribute_loss_weight=recipe.seg_attribute_loss_weight,
        seg_prompt_loss_weight=recipe.seg_prompt_loss_weight,
        vision_stem_channels=recipe.vision_stem_channels,
        depth_tokenizer_config=depth_tokenizer.config,
        **vocabulary.config_fields(),
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
    """Train the model's SAM2 on attribute prompts over freshly rendered scenes, then freeze its image encoder."""
    train_scenes = render_instance_scenes(
        recipe.grounding_scenes, processor.image_processor, recipe.seed, "train", recipe.num_render_processes
    )
    eval_scenes = render_instance_scenes(GROUNDING_EVAL_SCENES, processor.image_processor, recipe.seed, "eval")
    result = pretrain_grounding_encoder(
        model,
        train_scenes,
        eval_scenes,
        steps=recipe.grounding_steps,
        batch_size=recipe.batch_size,
        learning_rate=recipe.grounding_learning_rate,
        image_encoder_learning_rate=recipe.grounding_image_encoder_learning_rate,
        weight_decay=recipe.grounding_weight_decay,
        prompts_per_image=recipe.grounding_prompts_per_image,
        seed=recipe.seed,
        logging_steps=recipe.logging_steps,
        schedule=recipe.grounding_schedule,
    )
    model.grounding_encoder.vision_encoder.requires_grad_(False)
    return result


def render_recipe_vision_scenes(
    recipe: SyntheticTinyRecipe, processor: PerceptioProcessor, num_train: int, label_size: int
) -> tuple[PatchLabelledScenes, PatchLabelledScenes]:
    """The first `num_train` of the recipe's vision training scenes and its held-out ones, labelled per
    `label_size`-pixel square (`recipe.vision_marked_share` of them with marked points)."""
    image_processor = processor.image_processor
    share = recipe.vision_marked_share
    train_scenes = render_patch_labelled_scenes(
        num_train, image_processor, label_size, recipe.seed, "train", recipe.num_render_processes, share
    )
    eval_scenes = render_patch_labelled_scenes(
        VISION_EVAL_SCENES, image_processor, label_size, recipe.seed, "eval", marked_share=share
    )
    return train_scenes, eval_scenes


def pretrain_recipe_vision_tower(
    recipe: SyntheticTinyRecipe, model: PerceptioForConditionalGeneration, processor: PerceptioProcessor
) -> VisionPretrainingResult:
    """Train the model's vision tower on dense patch labels of freshly rendered scenes; with
    `recipe.freeze_vision_tower`, keep it fixed from then on."""
    result = pretrain_vision_tower(
        model,
        *render_recipe_vision_scenes(recipe, processor, recipe.vision_pretraining_scenes, recipe.vision_patch_size),
        steps=recipe.vision_pretraining_steps,
        learning_rate=recipe.vision_pretraining_learning_rate,
        seed=recipe.seed,
        logging_steps=recipe.logging_steps,
        tallies=recipe.vision_tally_probes,
        positions=recipe.vision_position_probes,
    )
    if recipe.freeze_vision_tower:
        model.model.vision_tower.requires_grad_(False)
    return result


def fit_recipe_projector(
    recipe: SyntheticTinyRecipe, model: PerceptioForConditionalGeneration, processor: PerceptioProcessor
) -> ProjectorProbeResult:
    """Start the projector from token-cell probes of the (pretrained) vision tower: fitted on the first
    `projector_probe_scenes` of the vision pretraining's scenes, scored on its held-out ones, both labelled per token
    cell."""
    return fit_projector_from_probes(
        model,
        *render_recipe_vision_scenes(recipe, processor, recipe.projector_probe_scenes, token_cell_size(model)),
        steps=recipe.projector_probe_steps,
        seed=recipe.seed,
        logging_steps=recipe.logging_steps,
        tallies=recipe.vision_tally_probes,
        positions=recipe.projector_position_probes,
    )


def render_recipe_scenes(recipe: SyntheticTinyRecipe, cache_dir: Path) -> DatasetDict:
    """The recipe's train/validation/test questions, cached by `datasets` in `cache_dir` (the same arguments give the
    same scenes, so a run's cache serves another with the recipe's data settings)."""
    return build_synthetic_dataset(
        recipe.num_train,
        recipe.num_validation,
        recipe.num_test,
        image_size=recipe.image_size,
        seed=recipe.seed,
        tasks=recipe.task_weights,
        num_proc=recipe.num_render_processes,
        cache_dir=str(cache_dir),
    )


def reading_split(recipe: SyntheticTinyRecipe, train_split: Dataset) -> Dataset:
    """The reading stage's data: the training rows of `recipe.reading_tasks`, without depth blocks."""
    tasks = set(recipe.reading_tasks)
    rows = train_split.filter(lambda task: task in tasks, input_columns="task", desc="Reading-stage rows")
    return rows.map(without_depth_block, desc="No depth blocks")


def reading_curriculum_split(
    recipe: SyntheticTinyRecipe, num_objects: int, cache_dir: Path, tasks: tuple[str, ...] | None = None
) -> Dataset:
    """A curriculum phase's data: `recipe.reading_curriculum_scenes` questions of `tasks` (default: the reading
    tasks; equal shares) on scenes of exactly `num_objects` objects, without depth blocks;
    `recipe.reading_count_random_query_share` of the count questions name attributes drawn at random."""
    dataset = build_synthetic_dataset(
        recipe.reading_curriculum_scenes,
        0,
        0,
        image_size=recipe.image_size,
        seed=recipe.seed,
        tasks=dict.fromkeys(tasks or recipe.reading_tasks, 1.0),
        num_proc=recipe.num_render_processes,
        cache_dir=str(cache_dir),
        num_objects=num_objects,
        task_config=replace(DEFAULT_TASK_CONFIG, count_random_query_share=recipe.reading_count_random_query_share),
    )
    return dataset["train"].map(without_depth_block, desc="No depth blocks")


def train_recipe_reading_stage(
    recipe: SyntheticTinyRecipe,
    model: PerceptioForConditionalGeneration,
    processor: PerceptioProcessor,
    train_split: Dataset,
    output_dir: Path,
    ablation: str = "full",
) -> list[dict[str, Any]]:
    """The reading stage: each `reading_curriculum` phase (on questions of its own tasks alone when it names tasks),
    then `reading_steps` on the full scenes' reading rows, all at `recipe.reading_rate`.

    Each phase has its own warmup and cosine schedule. Log entries carry `objects_per_scene` (0: the full scenes).
    """
    log = []
    for num_objects, steps, *only in (*recipe.reading_curriculum, (0, recipe.reading_steps)):
        if not steps:
            continue
        tasks = only[0] if only else None
        if num_objects:
            rows = reading_curriculum_split(recipe, num_objects, output_dir / "dataset_cache", tasks)
        else:
            rows = reading_split(recipe, train_split)
        name = f"reading-{num_objects}-objects" if num_objects else "reading"
        if tasks:
            name = f"{name}-{'-'.join(tasks)}"
        phase_log = train_recipe_model(
            recipe, model, processor, rows, output_dir / name, ablation, steps, learning_rate=recipe.reading_rate
        )
        log.extend({**entry, "objects_per_scene": num_objects} for entry in phase_log)
    return log


def train_recipe_model(
    recipe: SyntheticTinyRecipe,
    model: PerceptioForConditionalGeneration,
    processor: PerceptioProcessor,
    train_split: Dataset,
    output_dir: Path,
    ablation: str = "full",
    max_steps: int | None = None,
    prompt_embedding: AttributePromptEmbedding | None = None,
    learning_rate: float | None = None,
) -> list[dict[str, Any]]:
    """Train every trainable weight of the tiny model (the depth tokenizer, and SAM2 as the recipe freezes it, stay
    fixed) on `train_split` for `max_steps` (default `recipe.train_steps`) at `learning_rate` (default
    `recipe.learning_rate`); with `prompt_embedding` (the grounding stage's) and `recipe.seg_prompt_loss_weight` > 0,
    also toward its prompts (`loss_seg_prompt`)."""
    if ablation == "depth-lm-only":
        for name in DEPTH_LOSS_WEIGHT_FIELDS:
            setattr(model.config, name, 0.0)
    if ablation == "no-seg-attribute-loss":
        model.config.seg_attribute_loss_weight = 0.0
    max_steps = recipe.train_steps if max_steps is None else max_steps
    train_split = add_depth_code_column(ablate(train_split, ablation), model.depth_tokenizer)
    train_split = add_seg_targets(recipe, model, train_split, prompt_embedding)
    learning_rate = recipe.learning_rate if learning_rate is None else learning_rate
    return run_recipe_trainer(recipe, model, processor, train_split, output_dir, max_steps, learning_rate)


def vision_tower_rates(recipe: SyntheticTinyRecipe) -> dict[str, float]:
    """`PerceptioTrainer`'s `module_learning_rates` for `recipe.vision_tower_learning_rate` (empty without it)."""
    if recipe.vision_tower_learning_rate is None:
        return {}
    return {"model.vision_tower": recipe.vision_tower_learning_rate}


def run_recipe_trainer(
    recipe: SyntheticTinyRecipe,
    model: PerceptioForConditionalGeneration,
    processor: PerceptioProcessor,
    rows: Dataset,
    output_dir: Path,
    max_steps: int,
    learning_rate: float,
) -> list[dict[str, Any]]:
    """`PerceptioTrainer` on `rows` for `max_steps` at `learning_rate` (warmup, then cosine; a trainable vision tower
    at `recipe.vision_tower_learning_rate` when set); returns its log."""
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=int(recipe.warmup_ratio * max_steps),
        weight_decay=0.0,
        logging_steps=recipe.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=recipe_device().type == "cpu",
    )
    trainer = PerceptioTrainer(
        model=model,
        args=arguments,
        train_dataset=rows,
        data_collator=PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer),
        module_learning_rates=vision_tower_rates(recipe),
    )
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def train_recipe_mask_decoder_stage(
    recipe: SyntheticTinyRecipe,
    model: PerceptioForConditionalGeneration,
    processor: PerceptioProcessor,
    train_split: Dataset,
) -> list[dict[str, Any]]:
    """The mask-decoder stage: `text_hidden_fcs` and SAM2's mask decoder alone train on the referring rows for
    `recipe.mask_decoder_steps` at `recipe.mask_decoder_learning_rate` (warmup, then cosine, as the main stage);
    every other weight stays as the main stage left it, so the text answers and depth blocks do not change.

    The main stage keeps SAM2 frozen (its prompts are still learning what to carry); here the decoder learns to read
    the `[SEG]` prompts the language model now writes. `train_split` is the split the main stage trained on (an
    ablation's own), so each `[SEG]` state is the one generation produces; being frozen here, they are computed once
    (`mask_decoder_stage`). Returns the stage's log, empty when no referring row has a mask (the `no-seg` ablation):
    then nothing trains.
    """
    rows = referring_rows_with_masks(train_split)
    if not len(rows):
        logger.warning("No referring row of the training split has a mask: the mask-decoder stage trains nothing.")
        return []
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    model.requires_grad_(False)
    model.text_hidden_fcs.requires_grad_(True)
    model.grounding_encoder.mask_decoder.requires_grad_(True)
    rows = add_depth_code_column(rows, model.depth_tokenizer)
    collator = PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer)
    settings = MaskDecoderStageSettings(
        steps=recipe.mask_decoder_steps,
        learning_rate=recipe.mask_decoder_learning_rate,
        batch_size=recipe.batch_size,
        warmup_steps=int(recipe.warmup_ratio * recipe.mask_decoder_steps),
        logging_steps=recipe.logging_steps,
        seed=recipe.seed,
    )
    try:
        states = collect_seg_states(model, collator, rows, recipe.batch_size)
        return train_mask_decoder_on_seg_states(model, states, settings)
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in trainable)


def referring_rows_with_masks(split: Dataset) -> Dataset:
    """The referring rows of `split` that have at least one mask (a `no-seg` split has none)."""
    return rows_with_masks(split.filter(lambda task: task == "referring", input_columns="task", desc="Referring rows"))


def add_seg_targets(
    recipe: SyntheticTinyRecipe,
    model: PerceptioForConditionalGeneration,
    rows: Dataset,
    prompt_embedding: AttributePromptEmbedding | None,
) -> Dataset:
    """`rows` with the `[SEG]` targets the model trains on: `seg_attributes` for its attribute heads, and
    `seg_prompt_targets` from `prompt_embedding` while `recipe.seg_prompt_loss_weight` > 0."""
    if prompt_embedding is not None and recipe.seg_prompt_loss_weight > 0:
        # The grounding stage's prompts embed the attributes a phrase names, whatever the heads' target.
        with_named = add_seg_attribute_column(rows, "named")
        rows = add_seg_prompt_column(with_named, prompt_embedding).remove_columns(SEG_ATTRIBUTE_COLUMN)
    if model.seg_attribute_heads is not None:
        rows = add_seg_attribute_column(rows, recipe.seg_attribute_target)
    return rows


def reading_stage_ablation(recipe: SyntheticTinyRecipe, ablation: str) -> str:
    """The ablation the reading stage trains under: `ablation` where it changes the reading rows (`no-seg` and
    `no-seg-attribute-loss` with referring among `recipe.reading_tasks`), else `full`. The reading rows carry no depth
    blocks, so the depth ablations never act there, and every arm of a recipe shares the stages before the main one."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}.")
    acts_on_seg = ablation in ("no-seg", "no-seg-attribute-loss") and "referring" in recipe.reading_tasks
    return ablation if acts_on_seg else "full"


def run_synthetic_tiny_recipe(
    output_dir: str | Path,
    recipe: SyntheticTinyRecipe | None = None,
    ablation: str = "full",
    shared_stages_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the whole recipe; save `output_dir/model` (model + processor), `output_dir/dataset` (the validation and
    test splits, for `perceptio eval synthetic`) and `output_dir/recipe_summary.json`.

    Returns the summary: settings, timings, the depth tokenizer's evaluation, SAM2's grounding gate before and after
    its pretraining, how well the `[SEG]` states carry their phrase on the test split (`seg_attribute_accuracy`,
    beside the majority prior), and the reading-stage, main-stage and mask-decoder-stage training logs.

    With `shared_stages_dir`, the stages before the main stage are loaded from that folder when a run with the same
    recipe saved them there, and saved there otherwise (see `recipe_shared_stages`); the summary's
    `shared_stages` says which, and the loaded stages' timings are those of the run that trained them.

    It computes with `recipe.num_threads` torch threads whatever `OMP_NUM_THREADS` says: the same seed and thread
    count give the same weights, another count other weights.
    """
    recipe = recipe if recipe is not None else SyntheticTinyRecipe()
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}.")
    shared = Path(shared_stages_dir) if shared_stages_dir is not None else None
    with subnormals_flushed(), torch_threads(recipe.num_threads):
        return _run_recipe(Path(output_dir), recipe, ablation, shared)


def train_pre_main_stages(
    recipe: SyntheticTinyRecipe,
    processor: PerceptioProcessor,
    train_split: Dataset,
    output_dir: Path,
    reading_ablation: str,
) -> PreMainStages:
    """The stages before the main stage: the depth tokenizer, a new model, the vision tower's pretraining, the
    projector from probes, SAM2's grounding pretraining (then frozen, with `recipe.freeze_grounding_encoder`) and the
    reading stage."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    depth_tokenizer, tokenizer_evaluation = train_recipe_tokenizer(recipe, train_split, output_dir / "depth_tokenizer")
    timings["depth_tokenizer_s"] = time.perf_counter() - started
    model = build_recipe_model(recipe, processor, depth_tokenizer).to(recipe_device())
    vision_started = time.perf_counter()
    vision = pretrain_recipe_vision_tower(recipe, model, processor) if recipe.vision_pretraining_steps else None
    projector = fit_recipe_projector(recipe, model, processor) if recipe.projector_from_probes else None
    timings["vision_s"] = time.perf_counter() - vision_started
    grounding_started = time.perf_counter()
    grounding = pretrain_recipe_grounding(recipe, model, processor)
    timings["grounding_s"] = time.perf_counter() - grounding_started
    if recipe.freeze_grounding_encoder:
        model.grounding_encoder.requires_grad_(False)
    reading_started = time.perf_counter()
    reading_log = train_recipe_reading_stage(recipe, model, processor, train_split, output_dir, reading_ablation)
    timings["reading_s"] = time.perf_counter() - reading_started
    reports = {
        "depth_tokenizer_evaluation": tokenizer_evaluation.to_dict(),
        "vision_pretraining": asdict(vision) if vision is not None else None,
        "projector_probes": asdict(projector) if projector is not None else None,
        "grounding_pretraining": grounding.summary(),
        "reading_log": reading_log,
    }
    return PreMainStages(model, grounding.prompt_embedding, reports, timings)


def pre_main_stages(
    recipe: SyntheticTinyRecipe,
    processor: PerceptioProcessor,
    train_split: Dataset,
    output_dir: Path,
    reading_ablation: str,
    shared: Path | None,
) -> tuple[PreMainStages, bool]:
    """The stages before the main stage, loaded from `shared` when they are there, else trained (and saved there);
    with whether they were loaded.

    The run that saves them goes on from the saved copy too: SAM2's kernels round by where their tensors lie in
    memory, so a loaded model and the one it was saved from part in the last bits within a few mask-decoder steps,
    and every run that shares the folder must start its main stage from the same state, whichever run saved it.
    """
    stages = load_pre_main_stages(shared, recipe, reading_ablation) if shared is not None else None
    if stages is not None:
        logger.info("Starting the main stage from the stages saved in %s.", shared)
        return stages, True
    stages = train_pre_main_stages(recipe, processor, train_split, output_dir, reading_ablation)
    if shared is None:
        return stages, False
    save_pre_main_stages(shared, recipe, reading_ablation, stages, processor)
    return load_pre_main_stages(shared, recipe, reading_ablation), False


def _run_recipe(output_dir: Path, recipe: SyntheticTinyRecipe, ablation: str, shared: Path | None) -> dict[str, Any]:
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset = render_recipe_scenes(recipe, output_dir / "dataset_cache")
    DatasetDict({split: dataset[split] for split in EVALUATION_SPLITS}).save_to_disk(str(output_dir / "dataset"))
    timings = {"dataset_s": time.perf_counter() - started}
    processor = build_recipe_processor(recipe)
    reading_ablation = reading_stage_ablation(recipe, ablation)
    stages, loaded = pre_main_stages(recipe, processor, dataset["train"], output_dir, reading_ablation, shared)
    timings.update(stages.timings)
    model = stages.model.to(recipe_device())
    main_started = time.perf_counter()
    log = train_recipe_model(
        recipe,
        model,
        processor,
        dataset["train"],
        output_dir / "trainer",
        ablation,
        prompt_embedding=stages.prompt_embedding,
    )
    timings["model_s"] = stages.timings["reading_s"] + time.perf_counter() - main_started
    mask_decoder_started = time.perf_counter()
    mask_decoder_log = (
        train_recipe_mask_decoder_stage(recipe, model, processor, ablate(dataset["train"], ablation))
        if recipe.mask_decoder_steps
        else []
    )
    timings["mask_decoder_s"] = time.perf_counter() - mask_decoder_started
    timings["total_s"] = time.perf_counter() - started
    model.eval()
    seg_attributes = (
        seg_attribute_accuracy(model, processor, dataset["test"], recipe.batch_size)
        if model.seg_attribute_heads is not None
        else None
    )
    model.save_pretrained(output_dir / "model")
    processor.save_pretrained(output_dir / "model")
    summary = {
        "recipe": asdict(recipe),
        "ablation": ablation,
        "shared_stages": {"folder": str(shared), "loaded": loaded} if shared is not None else None,
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "timings": timings,
        **stages.reports,
        "seg_attribute_accuracy": asdict(seg_attributes) if seg_attributes is not None else None,
        "training_log": log,
        "mask_decoder_log": mask_decoder_log,
    }
    (output_dir / "recipe_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
