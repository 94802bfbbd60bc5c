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
other weight frozen: the decoder learns to read the `[SEG]` prompts the language model now writes, while the text
answers and depth blocks stay exactly as the main stage left them.

Ablations train with the same data, steps and seed:

- `full`: the recipe as described.
- `no-depth-tokens`: no sample carries a depth block.
- `no-seg`: no sample carries `[SEG]` tokens or masks.
- `depth-lm-only`: depth blocks are learned by language-model cross-entropy alone (marker, token, count and
  reconstruction weights 0).
- `no-seg-attribute-loss`: the `[SEG]` attribute heads are built (so the initialisation is the same) but
  `loss_seg_attribute` is weighted 0.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import TrainingArguments

from ..data.scene_rendering import metric_depth_to_inverse_depth, validate_num_objects
from ..data.seg_attributes import (
    SEG_ATTRIBUTE_COLUMN,
    add_seg_attribute_column,
    seg_attribute_classes,
    validate_seg_attribute_target,
)
from ..data.synthetic_dataset import build_synthetic_dataset
from ..data.synthetic_tasks import DEFAULT_TASK_CONFIG, TASK_NAMES, without_depth_block
from ..data.task_weights import validate_task_weights
from ..models.perceptio import (
    PerceptioConfig,
    PerceptioDepthTokenizerConfig,
    PerceptioForConditionalGeneration,
    PerceptioImageProcessor,
    PerceptioProcessor,
)
from ..models.perceptio.loss_perceptio import loss_weight_fields
from ..models.perceptio.vision_stem_perceptio import stem_patch_size
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
from .pretraining_loop import validate_schedule
from .projector_from_probes import ProjectorProbeResult, fit_projector_from_probes, token_cell_size
from .recipe_compute import recipe_device, subnormals_flushed, torch_threads
from .seg_attribute_accuracy import seg_attribute_accuracy
from .seg_prompt_targets import add_seg_prompt_column
from .trainer_perceptio import PerceptioTrainer
from .vision_pretraining import (
    PatchLabelledScenes,
    VisionPretrainingResult,
    check_marked_share,
    checked_tallies,
    pretrain_vision_tower,
    render_patch_labelled_scenes,
)


logger = logging.getLogger(__name__)


ABLATIONS = ("full", "no-depth-tokens", "no-seg", "depth-lm-only", "no-seg-attribute-loss")
# The answer tasks of the reading stage: a word or a number that only the image can give.
READING_TASKS = ("vqa_colour", "vqa_shape", "vqa_count")
RECIPE_TASK_WEIGHTS = {
    "referring": 0.3,
    "relative_depth": 0.25,
    "vqa_count": 0.15,
    "vqa_colour": 0.15,
    "vqa_shape": 0.15,
}
# Saved next to the model (`output_dir/dataset`) for `perceptio eval synthetic`; the training split stays in the cache.
EVALUATION_SPLITS = ("validation", "test")
GROUNDING_EVAL_SCENES = 200
VISION_EVAL_SCENES = 200
# Channels per attention head of the language model when the recipe does not set its head count.
DEFAULT_TEXT_HEAD_CHANNELS = 48
DEPTH_LOSS_WEIGHT_FIELDS = loss_weight_fields("depth")


@dataclass
class SyntheticTinyRecipe:
    """Every setting of the recipe; the defaults are the shipped checkpoint's."""

    seed: int = 0
    # Float reductions, and so every trained weight, depend on the thread count: the same seed and count give the
    # same checkpoint. The embedded checkpoint was trained with 2.
    num_threads: int = 2
    render_processes: int | None = None
    image_size: int = 128
    num_train: int = 10000
    num_validation: int = 64
    num_test: int = 300
    task_weights: dict[str, float] = field(default_factory=lambda: dict(RECIPE_TASK_WEIGHTS))
    depth_image_size: int = 64
    depth_hidden_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    depth_codebook_dim: int = 32
    depth_num_codes: int = 64
    depth_tokenizer_steps: int = 600
    vision_pretraining_scenes: int = 12000
    vision_pretraining_steps: int = 2500
    vision_pretraining_learning_rate: float = 2e-3
    # The share of the vision tower's (and the projector probes') scenes with points marked as relative-depth questions
    # mark them, whose patches learn the marked point's letter. At 0.5 the image tokens tell a marked point's letter
    # far better, yet relative-depth answers did not improve (docs/training.md), so it is off.
    vision_marked_share: float = 0.0
    # Tallies (names of `TALLY_GROUPS`) the vision tower's patches and the projector's probes learn to say: how many
    # objects share their object's attributes, or how many the scene holds, as count questions ask (see
    # `vision_pretraining`).
    vision_tally_probes: tuple[str, ...] = ()
    # Train the vision tower's patches to say their row and column in the patch grid too (see `vision_pretraining`):
    # without it the tower keeps a patch's column only in part. With the projector's position probes every image
    # token then says its row and column exactly, yet through the recipe no layout question gained and shape answers
    # fell (docs/training.md), so it is off.
    vision_position_probes: bool = False
    freeze_vision_tower: bool = True
    # After vision pretraining, start the projector from linear probes of each token cell's attributes and depth bin
    # (see `projector_from_probes`), fitted in `projector_probe_steps` on the first `projector_probe_scenes` of the
    # vision pretraining's scenes, labelled per token cell.
    projector_from_probes: bool = True
    projector_probe_scenes: int = 1000
    projector_probe_steps: int = 600
    # Probes of each token cell's row and column as well, so every image token also says where its cell is (see
    # `projector_from_probes`). Through the recipe it cost shape answers and helped no layout question
    # (docs/training.md), so it is off.
    projector_position_probes: bool = False
    # The trainable vision tower's peak rate in the reading and main stages; None: `learning_rate`, as the rest.
    vision_tower_learning_rate: float | None = None
    # Widths of the recipe's SAM2 (see `tiny_sam2_config`): its Hiera's first stage, and its feature pyramid, prompt
    # encoder and mask decoder; and the stride of Hiera's patches (4: an 8 x 8 image embedding, 2: 16 x 16).
    sam2_backbone_hidden_size: int = 12
    sam2_hidden_size: int = 32
    sam2_patch_stride: int = 4
    grounding_scenes: int = 3000
    grounding_steps: int = 2500
    grounding_learning_rate: float = 2e-3
    grounding_image_encoder_learning_rate: float = 5e-4
    grounding_weight_decay: float = 0.1
    # "constant" or "cosine" (`LEARNING_RATE_SCHEDULES`): how both of the grounding stage's rates follow its steps.
    grounding_schedule: str = "constant"
    grounding_prompts_per_image: int = 4
    freeze_grounding_encoder: bool = True
    mask_bce_weight: float = 1.0
    mask_dice_weight: float = 2.0
    seg_attribute_loss_weight: float = 1.0
    # What the `[SEG]` attribute heads ask of each `[SEG]` state (`SEG_ATTRIBUTE_TARGETS`): "named", the attributes
    # its phrase names; "referred", the referred object's own attributes and its nearness and column ranks.
    seg_attribute_target: str = "referred"
    seg_prompt_loss_weight: float = 0.0
    mask_decoder_steps: int = 2000
    mask_decoder_learning_rate: float = 1e-3
    text_hidden_size: int = 192
    text_intermediate_size: int = 512
    text_num_layers: int = 4
    # None: one head per `DEFAULT_TEXT_HEAD_CHANNELS` of `text_hidden_size`.
    text_num_attention_heads: int | None = None
    vision_hidden_size: int = 64
    vision_patch_size: int = 8
    vision_num_layers: int = 4
    vision_stem_channels: list[int] | None = field(default_factory=lambda: [32, 64])
    # Phases of (objects per scene, steps), or (objects per scene, steps, tasks) for a phase on some reading tasks only.
    reading_curriculum: tuple[tuple[int, int] | tuple[int, int, tuple[str, ...]], ...] = (
        (1, 100, ("vqa_colour",)),
        (1, 200),
        (2, 400),
    )
    reading_curriculum_scenes: int = 4500
    # Zero counts are rare in the mixture; the curriculum's scenes can ask about absent attributes more often.
    reading_count_random_query_share: float = DEFAULT_TASK_CONFIG.count_random_query_share
    reading_steps: int = 500
    reading_tasks: tuple[str, ...] = READING_TASKS
    question_before_image: bool = True
    train_steps: int = 3200
    batch_size: int = 16
    learning_rate: float = 1e-3
    lm_loss_reduction: str = "segment"
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
            "grounding_prompts_per_image",
            "text_hidden_size",
            "text_intermediate_size",
            "text_num_layers",
            "vision_hidden_size",
            "vision_patch_size",
            "vision_num_layers",
            "projector_probe_scenes",
            "projector_probe_steps",
            "train_steps",
            "batch_size",
            "logging_steps",
            "num_threads",
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
        if self.vision_stem_channels is not None and (
            not self.vision_stem_channels or stem_patch_size(self.vision_stem_channels) != self.vision_patch_size
        ):
            raise ValueError(
                f"vision_stem_channels {self.vision_stem_channels!r} must hold log2(vision_patch_size) - 1 widths "
                f"(each stem convolution halves the resolution; vision_patch_size is {self.vision_patch_size})."
            )
        rates = (
            "learning_rate",
            "grounding_learning_rate",
            "grounding_image_encoder_learning_rate",
            "vision_pretraining_learning_rate",
            "mask_decoder_learning_rate",
        )
        if not all(getattr(self, name) > 0 for name in rates) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{', '.join(rates)} must be > 0 and warmup_ratio in [0, 1).")
        for name in (
            "reading_steps",
            "reading_curriculum_scenes",
            "vision_pretraining_steps",
            "vision_pretraining_scenes",
            "mask_decoder_steps",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        heads = self.text_num_attention_heads
        if heads is not None and (
            not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or self.text_hidden_size % heads
        ):
            raise ValueError(
                f"text_num_attention_heads must be None or a positive integer dividing text_hidden_size "
                f"({self.text_hidden_size}), got {heads!r}."
            )
        if self.render_processes is not None and (
            not isinstance(self.render_processes, int)
            or isinstance(self.render_processes, bool)
            or self.render_processes < 1
        ):
            raise ValueError(f"render_processes must be a positive integer or None, got {self.render_processes!r}.")
        self.reading_curriculum = tuple(self._validated_reading_phase(phase) for phase in self.reading_curriculum)
        if not 0.0 <= self.reading_count_random_query_share <= 1.0:
            raise ValueError(
                f"reading_count_random_query_share must be in [0, 1], got {self.reading_count_random_query_share!r}."
            )
        if self.reading_curriculum and not self.reading_curriculum_scenes:
            raise ValueError("reading_curriculum_scenes must be > 0 when reading_curriculum has phases.")
        if self.vision_pretraining_steps and not self.vision_pretraining_scenes:
            raise ValueError("vision_pretraining_scenes must be > 0 when vision_pretraining_steps is.")
        if self.vision_tower_learning_rate is not None and (
            isinstance(self.vision_tower_learning_rate, bool)
            or not isinstance(self.vision_tower_learning_rate, (int, float))
            or not self.vision_tower_learning_rate > 0
        ):
            raise ValueError(
                f"vision_tower_learning_rate must be a positive number or None, got {self.vision_tower_learning_rate!r}."
            )
        if self.vision_tower_learning_rate is not None and self.freeze_vision_tower:
            raise ValueError(
                "vision_tower_learning_rate sets the rate of a trainable vision tower; freeze_vision_tower keeps it "
                "fixed. Set one of them."
            )
        if self.freeze_vision_tower and not self.vision_pretraining_steps:
            raise ValueError(
                "freeze_vision_tower keeps the pretrained vision tower fixed after its stage; with "
                "vision_pretraining_steps 0 it would freeze random weights. Set vision_pretraining_steps > 0."
            )
        check_marked_share(self.vision_marked_share, "vision_marked_share")
        if not isinstance(self.question_before_image, bool):
            raise ValueError(f"question_before_image must be True or False, got {self.question_before_image!r}.")
        self.vision_tally_probes = checked_tallies(self.vision_tally_probes, "vision_tally_probes")
        if self.vision_tally_probes and not self.vision_pretraining_steps:
            raise ValueError(
                "vision_tally_probes trains the vision tower's pretraining stage on object counts; with "
                "vision_pretraining_steps 0 there is none. Set vision_pretraining_steps > 0."
            )
        if not isinstance(self.vision_position_probes, bool):
            raise ValueError(f"vision_position_probes must be True or False, got {self.vision_position_probes!r}.")
        if self.vision_position_probes and not self.vision_pretraining_steps:
            raise ValueError(
                "vision_position_probes trains the vision tower's pretraining stage on where each patch is; with "
                "vision_pretraining_steps 0 there is none. Set vision_pretraining_steps > 0."
            )
        if not isinstance(self.projector_from_probes, bool):
            raise ValueError(f"projector_from_probes must be True or False, got {self.projector_from_probes!r}.")
        if not isinstance(self.projector_position_probes, bool):
            raise ValueError(
                f"projector_position_probes must be True or False, got {self.projector_position_probes!r}."
            )
        if self.projector_position_probes and not self.projector_from_probes:
            raise ValueError("projector_position_probes adds probes to projector_from_probes's; set that too.")
        if self.projector_from_probes and not self.vision_pretraining_steps:
            raise ValueError(
                "projector_from_probes reads the attributes a pretrained vision tower has learned; with "
                "vision_pretraining_steps 0 there is none. Set vision_pretraining_steps > 0."
            )
        validate_task_weights(self.task_weights, TASK_NAMES, default=0.0, where="task_weights")
        unknown = sorted(set(self.reading_tasks) - set(self.task_weights))
        if (self.reading_steps or self.reading_curriculum) and (not self.reading_tasks or unknown):
            raise ValueError(
                f"reading_tasks must name tasks of task_weights {sorted(self.task_weights)}; got {self.reading_tasks!r}."
            )
        for phase in self.reading_curriculum:
            if len(phase) == 3 and not set(phase[2]) <= set(self.reading_tasks):
                raise ValueError(
                    f"reading_curriculum phase {phase!r}: its tasks must be reading_tasks {self.reading_tasks!r}."
                )
        if not self.grounding_weight_decay >= 0:
            raise ValueError(f"grounding_weight_decay must be >= 0, got {self.grounding_weight_decay!r}.")
        # Building the SAM2 configuration refuses widths it cannot take.
        tiny_sam2_config(self.sam2_backbone_hidden_size, self.sam2_hidden_size, self.sam2_patch_stride)
        validate_schedule(self.grounding_schedule, "grounding_schedule")
        if self.mask_bce_weight < 0 or self.mask_dice_weight < 0:
            raise ValueError("mask_bce_weight and mask_dice_weight must be >= 0.")
        validate_seg_attribute_target(self.seg_attribute_target)
        for name in ("seg_attribute_loss_weight", "seg_prompt_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")

    @staticmethod
    def _validated_reading_phase(phase) -> tuple:
        """A curriculum phase as (objects per scene, steps) or (objects per scene, steps, tasks), checked."""
        if (
            not isinstance(phase, (tuple, list))
            or len(phase) not in (2, 3)
            or not all(isinstance(value, int) and not isinstance(value, bool) for value in phase[:2])
            or phase[1] <= 0
        ):
            raise ValueError(
                f"reading_curriculum phases must be (objects per scene, steps > 0) ints, optionally with a tuple of "
                f"tasks, got {phase!r}."
            )
        try:
            validate_num_objects(phase[0])
        except ValueError as error:
            raise ValueError(f"reading_curriculum phase {phase!r}: {error}") from error
        if len(phase) == 2:
            return tuple(phase)
        tasks = phase[2]
        if isinstance(tasks, str) or not isinstance(tasks, (tuple, list)) or not tasks:
            raise ValueError(f"reading_curriculum phase {phase!r}: its tasks must be a non-empty tuple of task names.")
        return (phase[0], phase[1], tuple(tasks))

    @property
    def num_render_processes(self) -> int:
        """Processes that render the recipe's scenes: `render_processes`, or one per CPU core. Each scene follows
        from the seed and its index alone, so the data do not depend on it."""
        return self.render_processes or os.cpu_count() or 1

    @property
    def attention_heads(self) -> int:
        """The language model's attention heads: `text_num_attention_heads`, or one per `DEFAULT_TEXT_HEAD_CHANNELS`
        of `text_hidden_size` when it is None."""
        return self.text_num_attention_heads or max(1, self.text_hidden_size // DEFAULT_TEXT_HEAD_CHANNELS)

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


def parse_recipe_override(text: str) -> tuple[str, Any]:
    """`FIELD=VALUE` -> (field, JSON-decoded value), for experiments that vary a `SyntheticTinyRecipe` field; an
    unknown field or a value that is not JSON is a `ValueError`."""
    name, separator, value = text.partition("=")
    names = [recipe_field.name for recipe_field in fields(SyntheticTinyRecipe)]
    if not separator or name not in names:
        raise ValueError(f"{text!r} is not FIELD=VALUE with FIELD one of: {', '.join(names)}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"the value of {name} must be JSON (true, 4, [32,64]); got {value!r}") from error


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


def reading_curriculum_split(recipe: SyntheticTinyRecipe, num_objects: int, cache_dir: Path) -> Dataset:
    """A curriculum phase's data: `recipe.reading_curriculum_scenes` questions of the reading tasks (equal shares)
    on scenes of exactly `num_objects` objects, without depth blocks; `recipe.reading_count_random_query_share` of
    the count questions name attributes drawn at random."""
    dataset = build_synthetic_dataset(
        recipe.reading_curriculum_scenes,
        0,
        0,
        image_size=recipe.image_size,
        seed=recipe.seed,
        tasks=dict.fromkeys(recipe.reading_tasks, 1.0),
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
    """The reading stage: each `reading_curriculum` phase (on its tasks' rows alone when it names tasks), then
    `reading_steps` on the full scenes' reading rows.

    Each phase has its own warmup and cosine schedule. Log entries carry `objects_per_scene` (0: the full scenes).
    """
    log = []
    for num_objects, steps, *only in (*recipe.reading_curriculum, (0, recipe.reading_steps)):
        if not steps:
            continue
        if num_objects:
            rows = reading_curriculum_split(recipe, num_objects, output_dir / "dataset_cache")
        else:
            rows = reading_split(recipe, train_split)
        name = f"reading-{num_objects}-objects" if num_objects else "reading"
        if only:
            rows = rows.filter(lambda task: task in only[0], input_columns="task", desc="The phase's tasks")
            name = f"{name}-{'-'.join(only[0])}"
        phase_log = train_recipe_model(recipe, model, processor, rows, output_dir / name, ablation, steps)
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
) -> list[dict[str, Any]]:
    """Train every trainable weight of the tiny model (the depth tokenizer, and SAM2 as the recipe freezes it, stay
    fixed) on `train_split` for `max_steps` (default `recipe.train_steps`); with `prompt_embedding` (the grounding
    stage's) and `recipe.seg_prompt_loss_weight` > 0, also toward its prompts (`loss_seg_prompt`)."""
    if ablation == "depth-lm-only":
        for name in DEPTH_LOSS_WEIGHT_FIELDS:
            setattr(model.config, name, 0.0)
    if ablation == "no-seg-attribute-loss":
        model.config.seg_attribute_loss_weight = 0.0
    max_steps = recipe.train_steps if max_steps is None else max_steps
    train_split = add_depth_code_column(ablate(train_split, ablation), model.depth_tokenizer)
    train_split = add_seg_targets(recipe, model, train_split, prompt_embedding)
    return run_recipe_trainer(recipe, model, processor, train_split, output_dir, max_steps, recipe.learning_rate)


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
    output_dir: Path,
) -> list[dict[str, Any]]:
    """The mask-decoder stage: `text_hidden_fcs` and SAM2's mask decoder alone train on the referring rows for
    `recipe.mask_decoder_steps` at `recipe.mask_decoder_learning_rate`; every other weight stays as the main stage
    left it, so the text answers and depth blocks do not change.

    The main stage keeps SAM2 frozen (its prompts are still learning what to carry); here the decoder learns to read
    the `[SEG]` prompts the language model now writes. `train_split` is the split the main stage trained on (an
    ablation's own), so each `[SEG]` state is the one generation produces. Returns the stage's log, empty when no
    referring row has a mask (the `no-seg` ablation): then nothing trains.
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
    try:
        return run_recipe_trainer(
            recipe, model, processor, rows, output_dir, recipe.mask_decoder_steps, recipe.mask_decoder_learning_rate
        )
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


def run_synthetic_tiny_recipe(
    output_dir: str | Path,
    recipe: SyntheticTinyRecipe | None = None,
    ablation: str = "full",
) -> dict[str, Any]:
    """Run the whole recipe; save `output_dir/model` (model + processor), `output_dir/dataset` (the validation and
    test splits, for `perceptio eval synthetic`) and `output_dir/recipe_summary.json`.

    Returns the summary: settings, timings, the depth tokenizer's evaluation, SAM2's grounding gate before and after
    its pretraining, how well the `[SEG]` states carry their phrase on the test split (`seg_attribute_accuracy`,
    beside the majority prior), and the reading-stage, main-stage and mask-decoder-stage training logs.

    It computes with `recipe.num_threads` torch threads whatever `OMP_NUM_THREADS` says: the same seed and thread
    count give the same weights, another count other weights.
    """
    recipe = recipe if recipe is not None else SyntheticTinyRecipe()
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}.")
    with subnormals_flushed(), torch_threads(recipe.num_threads):
        return _run_recipe(Path(output_dir), recipe, ablation)


def _run_recipe(output_dir: Path, recipe: SyntheticTinyRecipe, ablation: str) -> dict[str, Any]:
    output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    dataset = render_recipe_scenes(recipe, output_dir / "dataset_cache")
    DatasetDict({split: dataset[split] for split in EVALUATION_SPLITS}).save_to_disk(str(output_dir / "dataset"))
    timings["dataset_s"] = time.perf_counter() - started
    tokenizer_started = time.perf_counter()
    depth_tokenizer, tokenizer_evaluation = train_recipe_tokenizer(
        recipe, dataset["train"], output_dir / "depth_tokenizer"
    )
    timings["depth_tokenizer_s"] = time.perf_counter() - tokenizer_started
    processor = build_recipe_processor(recipe)
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
    model_started = time.perf_counter()
    reading_log = train_recipe_reading_stage(recipe, model, processor, dataset["train"], output_dir, ablation)
    timings["reading_s"] = time.perf_counter() - model_started
    log = train_recipe_model(
        recipe,
        model,
        processor,
        dataset["train"],
        output_dir / "trainer",
        ablation,
        prompt_embedding=grounding.prompt_embedding,
    )
    timings["model_s"] = time.perf_counter() - model_started
    mask_decoder_started = time.perf_counter()
    mask_decoder_log = (
        train_recipe_mask_decoder_stage(
            recipe, model, processor, ablate(dataset["train"], ablation), output_dir / "mask-decoder"
        )
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
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "timings": timings,
        "depth_tokenizer_evaluation": tokenizer_evaluation.to_dict(),
        "vision_pretraining": asdict(vision) if vision is not None else None,
        "projector_probes": asdict(projector) if projector is not None else None,
        "grounding_pretraining": grounding.summary(),
        "seg_attribute_accuracy": asdict(seg_attributes) if seg_attributes is not None else None,
        "reading_log": reading_log,
        "training_log": log,
        "mask_decoder_log": mask_decoder_log,
    }
    (output_dir / "recipe_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
