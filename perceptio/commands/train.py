"""`perceptio train`: train Perceptio with `PerceptioTrainer` from a YAML configuration, or run a named recipe.

Runs unchanged under `accelerate launch` / DeepSpeed: the Trainer reads the distributed environment itself.
"""

from __future__ import annotations

import argparse


EXAMPLE = """example:
  perceptio train --config examples/configs/tiny-cpu.yaml
  perceptio train --config examples/configs/perceptio-8b-lora.yaml --resume
  accelerate launch --num_processes 8 -m perceptio.cli train --config examples/configs/perceptio-8b-lora.yaml
  perceptio train --recipe synthetic-tiny --output-dir runs/synthetic-tiny      # the embedded checkpoint's recipe
  perceptio train --recipe synthetic-tiny --ablation no-depth-tokens --output-dir runs/ablation-no-depth
"""
RECIPES = ("synthetic-tiny",)


OBJECTIVE_UNREACHED_MODULES = (
    "grounding_encoder.mask_decoder.pred_obj_score_head",
    "grounding_encoder.prompt_encoder.mask_embed",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio train` to the command's subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="Train Perceptio (full objective: LM, masks, depth tokens) from a YAML configuration.",
        description="Train Perceptio with PerceptioTrainer. The YAML file has sections training (TrainingArguments), "
        "model, data and loss; see examples/configs/.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML configuration file (sections: training, model, data, loss)")
    source.add_argument("--recipe", choices=RECIPES, help="a complete named recipe (data, tokenizer, model, training)")
    parser.add_argument("--output-dir", help="with --recipe: where the recipe writes its data, model and summary")
    parser.add_argument(
        "--ablation", default="full", help="with --recipe: full, no-depth-tokens, no-seg or depth-lm-only"
    )
    parser.add_argument("--train-steps", type=int, help="with --recipe: override the recipe's training steps")
    parser.add_argument("--seed", type=int, default=0, help="with --recipe: the seed everything follows from")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="resume from CHECKPOINT, or from the latest in output_dir",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `perceptio train` with the parsed arguments; returns the exit status."""
    if args.recipe is not None:
        return run_recipe(args)
    from perceptio.trainers.training_config import load_training_config

    train_perceptio(load_training_config(args.config), resume_from_checkpoint=args.resume)
    return 0


def run_recipe(args: argparse.Namespace) -> int:
    """Run the named recipe end to end and print where its model and summary are."""
    from dataclasses import replace

    from perceptio.trainers.synthetic_recipe import SyntheticTinyRecipe, run_synthetic_tiny_recipe

    if args.output_dir is None:
        raise ValueError("--recipe needs --output-dir (where the recipe writes its data, model and summary).")
    if args.resume is not None:
        raise ValueError("--resume applies to --config runs; a recipe reruns from its seed.")
    recipe = SyntheticTinyRecipe(seed=args.seed)
    if args.train_steps is not None:
        recipe = replace(recipe, train_steps=args.train_steps)
    summary = run_synthetic_tiny_recipe(args.output_dir, recipe, ablation=args.ablation)
    print(
        f"Recipe {args.recipe} ({args.ablation}) done in {summary['timings']['total_s'] / 60:.1f} min; model in "
        f"{args.output_dir}/model, summary in {args.output_dir}/recipe_summary.json. Evaluate it with "
        f"`perceptio eval synthetic --model {args.output_dir}/model --data {args.output_dir}/dataset`."
    )
    return 0


def train_perceptio(config, resume_from_checkpoint: str | bool | None = None):
    """Build model, data and trainer from a `PerceptioTrainingConfig`, train, and save model and processor.

    Returns the trainer (its `state.log_history` holds every logged loss component).
    """
    from perceptio.trainers.collator_perceptio import PerceptioDataCollator
    from perceptio.trainers.trainer_perceptio import PerceptioTrainer

    training_args = config.training
    model, processor = load_model_and_processor(config.model)
    for name, value in config.loss.overrides().items():
        setattr(model.config, name, value)
    model.config.check_spatial_tokens()
    base_model = model
    model = prepare_trainable_parameters(model, config.model)
    with training_args.main_process_first(desc="building the training data"):
        train_dataset = build_train_dataset(config.data, base_model)
    collator = PerceptioDataCollator(
        processor, depth_tokenizer=base_model.depth_tokenizer, max_num_tiles=config.model.max_num_tiles
    )
    trainer = PerceptioTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    return trainer


def load_model_and_processor(model_args):
    """The model and processor named by `model_args` ("tiny" builds a random tiny Perceptio)."""
    import torch

    from perceptio import PerceptioForConditionalGeneration, PerceptioProcessor
    from perceptio.tiny_models import build_tiny_perceptio
    from perceptio.trainers.training_config import TINY_MODEL

    if model_args.model_name_or_path == TINY_MODEL:
        model, processor = build_tiny_perceptio(seed=model_args.tiny_seed)
        if model_args.dtype not in ("auto", "float32"):
            model = model.to(getattr(torch, model_args.dtype))
        return model, processor
    dtype = "auto" if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    model = PerceptioForConditionalGeneration.from_pretrained(model_args.model_name_or_path, dtype=dtype)
    processor = PerceptioProcessor.from_pretrained(model_args.model_name_or_path)
    return model, processor


def prepare_trainable_parameters(model, model_args):
    """Apply the LoRA preset, or freeze what full fine-tuning keeps fixed (vision tower, SAM2 image encoder)."""
    from perceptio.trainers.peft_presets import PerceptioLoraPreset, apply_perceptio_lora

    if model_args.use_lora:
        preset = PerceptioLoraPreset(r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout)
        return apply_perceptio_lora(model, preset)
    if model_args.freeze_vision_tower:
        model.model.vision_tower.requires_grad_(False)
    if model_args.freeze_sam2_image_encoder:
        model.grounding_encoder.vision_encoder.requires_grad_(False)
    # No loss reaches these (the best mask is picked by argmax IoU; no mask prompts are given); trainable parameters
    # without gradients would break DDP with find_unused_parameters=False.
    for name in OBJECTIVE_UNREACHED_MODULES:
        model.get_submodule(name).requires_grad_(False)
    return model


def build_train_dataset(data_args, model):
    """The weighted task mixture of `data_args`, with depth codes cached when asked."""
    from datasets import load_from_disk

    from perceptio.data.synthetic_dataset import build_synthetic_dataset
    from perceptio.trainers.data_mixture import add_depth_code_column, mix_task_datasets, split_by_task

    task_datasets = {}
    if data_args.synthetic_num_train:
        synthetic = build_synthetic_dataset(
            data_args.synthetic_num_train,
            0,
            0,
            image_size=data_args.synthetic_image_size,
            seed=data_args.synthetic_seed,
            cache_dir=data_args.cache_dir,
        )["train"]
        task_datasets.update(split_by_task(synthetic))
    for task, path in data_args.dataset_paths.items():
        if task in task_datasets:
            raise ValueError(f"task {task!r} is both a synthetic task and a data.dataset_paths entry.")
        task_datasets[task] = load_from_disk(path)
    unknown = sorted(set(data_args.task_weights) - set(task_datasets))
    if unknown:
        raise ValueError(f"data.task_weights names tasks without data: {unknown}; tasks are {sorted(task_datasets)}.")
    if data_args.cache_depth_codes and model.depth_tokenizer is not None:
        task_datasets = {
            task: dataset
            if "depth_codes" in dataset.column_names
            else add_depth_code_column(dataset, model.depth_tokenizer)
            for task, dataset in task_datasets.items()
        }
    if data_args.streaming:
        task_datasets = {task: dataset.to_iterable_dataset() for task, dataset in task_datasets.items()}
    weights = {task: float(data_args.task_weights.get(task, 1.0)) for task in task_datasets}
    return mix_task_datasets(
        task_datasets, weights, seed=data_args.mixture_seed, stopping_strategy=data_args.stopping_strategy
    )
