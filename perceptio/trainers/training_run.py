"""Training from a `PerceptioTrainingConfig` as a library call: model and processor, what trains, the task mixture,
`PerceptioTrainer`. `perceptio train --config FILE` parses the YAML into that config and calls `train_perceptio`; a
notebook calls the same functions.
"""

from __future__ import annotations


# No loss reaches these (the best mask is picked by argmax IoU; no mask prompts are given): they stay frozen, since
# trainable parameters without gradients break DDP with find_unused_parameters=False.
OBJECTIVE_UNREACHED_MODULES = (
    "grounding_encoder.mask_decoder.pred_obj_score_head",
    "grounding_encoder.prompt_encoder.mask_embed",
)


def train_perceptio(config, resume_from_checkpoint: str | bool | None = None):
    """Build model, data and trainer from a `PerceptioTrainingConfig`, train, and save model and processor.

    Returns the trainer (its `state.log_history` holds every logged loss component).
    """
    from perceptio.trainers.collator_perceptio import PerceptioDataCollator
    from perceptio.trainers.trainer_perceptio import PerceptioTrainer, validated_module_learning_rates

    training_args = config.training
    model, processor = load_model_and_processor(config.model)
    for name, value in config.loss.overrides().items():
        setattr(model.config, name, value)
    model.config.check_spatial_tokens()
    base_model = model
    model = prepare_trainable_parameters(model, config.model)
    # Checked here too, so that a misspelt module fails before the training data is built.
    validated_module_learning_rates(model, config.model.module_learning_rates)
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
        module_learning_rates=config.model.module_learning_rates,
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
    for name in OBJECTIVE_UNREACHED_MODULES:
        model.get_submodule(name).requires_grad_(False)
    return model


def build_train_dataset(data_args, model):
    """The weighted task mixture of `data_args`, with depth codes cached when asked, and the `[SEG]` attribute labels
    of the synthetic scenes when the model has attribute heads (`label_seg_attributes`)."""
    from datasets import load_from_disk

    from perceptio.data.synthetic_dataset import build_synthetic_dataset
    from perceptio.trainers.data_mixture import (
        add_depth_code_column,
        mix_task_datasets,
        split_by_task,
        validate_task_weights,
    )

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
        if model.seg_attribute_heads is not None:
            synthetic = label_seg_attributes(synthetic, model.config.seg_attribute_classes)
        task_datasets.update(split_by_task(synthetic))
    for task, path in data_args.dataset_paths.items():
        if task in task_datasets:
            raise ValueError(f"task {task!r} is both a synthetic task and a data.dataset_paths entry.")
        task_datasets[task] = load_from_disk(path)
    task_datasets = with_common_seg_attribute_column(task_datasets)
    weights = validate_task_weights(data_args.task_weights, task_datasets, default=1.0, where="data.task_weights")
    if data_args.cache_depth_codes and model.depth_tokenizer is not None:
        task_datasets = {
            task: dataset
            if "depth_codes" in dataset.column_names
            else add_depth_code_column(dataset, model.depth_tokenizer)
            for task, dataset in task_datasets.items()
        }
    if data_args.streaming:
        task_datasets = {task: dataset.to_iterable_dataset() for task, dataset in task_datasets.items()}
    return mix_task_datasets(
        task_datasets, weights, seed=data_args.mixture_seed, stopping_strategy=data_args.stopping_strategy
    )


def label_seg_attributes(synthetic, head_classes: list[int]):
    """The synthetic rows with their `seg_attributes` column, the targets of the model's `[SEG]` attribute heads:
    named or referred attributes (`SEG_ATTRIBUTE_TARGETS`), whichever the heads' classes are sized for.

    Raises:
        ValueError: the heads' classes are those of no target, so no labels could train them.
    """
    from perceptio.data.seg_attributes import add_seg_attribute_column, seg_attribute_target_for_classes

    return add_seg_attribute_column(synthetic, seg_attribute_target_for_classes(head_classes))


def with_common_seg_attribute_column(task_datasets: dict) -> dict:
    """When some task datasets carry `seg_attributes`, give the others an empty one (unlabelled `[SEG]`s, which the
    attribute loss skips), so that the mixture's datasets share their columns."""
    from perceptio.data.seg_attributes import SEG_ATTRIBUTE_COLUMN, SEG_ATTRIBUTE_FEATURE

    if not any(SEG_ATTRIBUTE_COLUMN in dataset.column_names for dataset in task_datasets.values()):
        return task_datasets
    return {
        task: dataset
        if SEG_ATTRIBUTE_COLUMN in dataset.column_names
        else dataset.add_column(SEG_ATTRIBUTE_COLUMN, [[]] * len(dataset), feature=SEG_ATTRIBUTE_FEATURE)
        for task, dataset in task_datasets.items()
    }
