"""The synthetic-tiny recipe's settings: one dataclass whose defaults are the embedded checkpoint's, validated on
construction, and the `FIELD=VALUE` overrides that experiments vary it with. The stages that use them are in
`synthetic_recipe`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..data.scene_rendering import validate_num_objects
from ..data.seg_attributes import (
    validate_seg_attribute_target,
)
from ..data.synthetic_tasks import DEFAULT_TASK_CONFIG, TASK_NAMES
from ..data.task_weights import validate_task_weights
from ..models.perceptio import (
    PerceptioDepthTokenizerConfig,
)
from ..models.perceptio.loss_perceptio import loss_weight_fields
from ..models.perceptio.vision_stem_perceptio import stem_patch_size
from ..tiny_models import tiny_sam2_config
from .pretraining_loop import validate_schedule
from .vision_pretraining import (
    check_marked_share,
    checked_tallies,
)


# The answer tasks of the reading stage: a word or a number that only the image can give.
READING_TASKS = ("vqa_colour", "vqa_shape", "vqa_count")
RECIPE_TASK_WEIGHTS = {
    "referring": 0.3,
    "relative_depth": 0.25,
    "vqa_count": 0.15,
    "vqa_colour": 0.15,
    "vqa_shape": 0.15,
}

# Channels per attention head of the language model when the recipe does not set its head count.
DEFAULT_TEXT_HEAD_CHANNELS = 48
DEPTH_LOSS_WEIGHT_FIELDS = loss_weight_fields("depth")
# Settings that only the main stage and the stages after it read (the reading stage trains at `reading_rate`): runs
# that differ in these alone train the same stages before the main stage, so they can share them
# (`recipe_shared_stages`).
MAIN_STAGE_FIELDS = ("learning_rate", "train_steps", "mask_decoder_steps", "mask_decoder_learning_rate")


def check_optional_rate(value: Any, name: str) -> None:
    """A `ValueError` unless `value` is None or a positive number."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"{name} must be a positive number or None, got {value!r}.")


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
    # The reading stage's peak rate (each phase's); None: `learning_rate`, as the main stage. At 3e-4, with count
    # phases on scenes of three to five objects, the count answers read the image better after the reading stage, but
    # no better after the main stage (docs/training.md), so it is off.
    reading_learning_rate: float | None = None
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
        for name in ("vision_tower_learning_rate", "reading_learning_rate"):
            check_optional_rate(getattr(self, name), name)
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

    @property
    def reading_rate(self) -> float:
        """The reading stage's peak rate: `reading_learning_rate`, or `learning_rate` when that is None."""
        return self.learning_rate if self.reading_learning_rate is None else self.reading_learning_rate

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
