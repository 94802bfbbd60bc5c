"""Promptable-segmentation pretraining of a from-scratch SAM2 on rendered scenes, with prompts that stand in for `[SEG]`.

Perceptio starts from a released SAM2 and only learns to prompt it with `[SEG]` states. The tiny recipe has no SAM2
checkpoint of its size, so it first trains its SAM2 to segment the object a prompt describes. The prompt is built the
way a `[SEG]` prompt is (`PerceptioForConditionalGeneration.seg_prompt_embeddings`): an embedding appended to an
empty point, here the sum of learned embeddings of the attributes of a phrase that picks out one object ("the red
cube", "the sphere"), as the referring expressions do. A point prompt locates; a
`[SEG]` must select by what the sentence says, so attributes are the closer rehearsal.

Several objects of each image are prompted in every step (as SAM trains), so a mask that ignores its prompt (the
foreground of the scene) is penalised on every image. The image encoder trains with a lower learning rate and weight
decay, which keeps its features from growing until they drown the prompt in the decoder's attention. The losses are
the model's own mask losses (`PerceptioForConditionalGeneration.mask_losses`).

The held-out gate measures both halves of "the mask follows the prompt": the IoU of each mask with its own object,
and the IoU between the masks of two different objects of one scene (a prompt-blind decoder scores 1.0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.scene_rendering import render_scenes
from ..data.seg_attributes import SEG_ATTRIBUTES, not_named_ids
from ..models.perceptio import PerceptioForConditionalGeneration, PerceptioImageProcessor
from ..models.perceptio.loss_perceptio import mask_iou
from .pretraining_loop import run_pretraining_steps, validate_schedule


SCENE_STREAMS = {"train": 0, "eval": 1}
# Objects smaller than this many pixels at the SAM2 input size are not prompted: a few pixels give no usable target.
MIN_PROMPTED_PIXELS = 20
EVAL_PROMPTS_PER_IMAGE = 2
# Attribute prompts start on the scale of a freshly initialised `[SEG]` projection's output (norm about 1.5), so the
# decoder learns prompts of the size the language model will give it.
ATTRIBUTE_EMBEDDING_STD = 0.25


@dataclass
class InstanceSegmentationScenes:
    """Rendered scenes as SAM2 inputs: `sam_pixel_values` (S, 3, size, size), each scene's instance masks
    (objects, size, size) at the SAM2 input size and each object's attribute ids (objects, 3) as colour, shape, size
    indices into `SEG_ATTRIBUTES`."""

    sam_pixel_values: torch.Tensor
    instance_masks: list[torch.Tensor]
    object_attributes: list[torch.Tensor]

    def __len__(self) -> int:
        return self.sam_pixel_values.shape[0]

    def first(self, count: int) -> InstanceSegmentationScenes:
        """The first `count` scenes (all of them when there are fewer)."""
        return InstanceSegmentationScenes(
            self.sam_pixel_values[:count], self.instance_masks[:count], self.object_attributes[:count]
        )

    def promptable_objects(self, index: int) -> torch.Tensor:
        """Objects of scene `index` that are visible and whose attributes no other object of the scene shares."""
        masks, attributes = self.instance_masks[index], self.object_attributes[index]
        visible = masks.flatten(1).sum(-1) >= MIN_PROMPTED_PIXELS
        same = (attributes[:, None] == attributes[None]).all(-1)
        unique = same.sum(-1) == 1
        return torch.nonzero(visible & unique).flatten()


@dataclass
class GroundingGate:
    """Held-out figures of attribute prompts: mean IoU with the prompted object, and mean IoU between the masks of two
    different objects of one scene (lower is better: 1.0 when the mask ignores the prompt)."""

    prompt_iou: float
    two_object_overlap: float
    image_embedding_norm: float


@dataclass
class GroundingPretrainingResult:
    """The training log (step, loss), the held-out gate before and after the stage, the gate after it on as many
    training scenes as are held out (where that beats the held-out gate, SAM2 has learned its scenes rather than how
    to follow a prompt), and the attribute prompts SAM2 was trained with (the targets of `loss_seg_prompt`, see
    `seg_prompt_targets`)."""

    log: list[dict[str, float]]
    initial: GroundingGate
    final: GroundingGate
    training: GroundingGate
    prompt_embedding: AttributePromptEmbedding

    def summary(self) -> dict[str, Any]:
        """The log and gates, for a JSON summary."""
        gates = {name: asdict(getattr(self, name)) for name in ("initial", "final", "training")}
        return {"log": self.log, **gates}


class AttributePromptEmbedding(nn.Module):
    """An object's prompt: the sum of learned embeddings of the attributes a phrase names (colour, shape, size), of
    SAM2's decoder width. An attribute the phrase leaves out has id `len(vocabulary)`, whose embedding is zero."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.tables = nn.ModuleList(
            nn.Embedding(len(names) + 1, hidden_size, padding_idx=len(names)) for names in SEG_ATTRIBUTES.values()
        )
        for table in self.tables:
            nn.init.normal_(table.weight[:-1], std=ATTRIBUTE_EMBEDDING_STD)

    def forward(self, attribute_ids: torch.LongTensor) -> torch.Tensor:
        """(..., 3) colour, shape, size ids -> (..., hidden_size) prompts."""
        return sum(table(attribute_ids[..., column]) for column, table in enumerate(self.tables))


UNSPECIFIED_IDS = torch.tensor(not_named_ids())
# The non-empty subsets of (colour, shape, size) a phrase can name, as boolean rows.
ATTRIBUTE_SUBSETS = torch.tensor(
    [[bool(bits >> column & 1) for column in range(len(SEG_ATTRIBUTES))] for bits in range(1, 8)]
)


def unique_phrase_ids(attributes: torch.LongTensor, visible: torch.Tensor, target: int, generator) -> torch.LongTensor:
    """The attribute ids (3,) of a random phrase that names object `target` and no other visible object, as "the red
    cube" or "the sphere" do; attributes left out of the phrase are `UNSPECIFIED_IDS`."""
    same = attributes[visible] == attributes[target]
    # A subset picks out the target alone when exactly one visible object agrees on every attribute it names.
    agreeing = (same[None] | ~ATTRIBUTE_SUBSETS[:, None]).all(-1).sum(-1)
    subsets = ATTRIBUTE_SUBSETS[agreeing == 1]
    subset = subsets[torch.randint(len(subsets), (1,), generator=generator)].flatten()
    return torch.where(subset, attributes[target], UNSPECIFIED_IDS)


def render_instance_scenes(
    num_scenes: int,
    image_processor: PerceptioImageProcessor,
    seed: int,
    stream: str = "train",
    processes: int = 1,
) -> InstanceSegmentationScenes:
    """Render `num_scenes` scenes of `stream` ("train" or "eval", disjoint) from `seed` at the SAM2 input size, with
    their exact instance masks and their objects' attributes (by `processes` worker processes; the same scenes)."""
    if not isinstance(num_scenes, int) or num_scenes <= 0:
        raise ValueError(f"num_scenes must be a positive integer, got {num_scenes!r}.")
    if stream not in SCENE_STREAMS:
        raise ValueError(f"stream must be one of {sorted(SCENE_STREAMS)}, got {stream!r}.")
    size = image_processor.sam_image_size
    rng = np.random.default_rng([seed, SCENE_STREAMS[stream]])
    images, masks, attributes = [], [], []
    seeds = [int(rng.integers(2**63 - 1)) for _ in range(num_scenes)]
    scenes = render_scenes(seeds, size, processes)
    for scene in tqdm(scenes, total=num_scenes, desc=f"Rendering {stream} scenes for SAM2"):
        images.append(image_processor.sam_view(scene.image))
        masks.append(torch.from_numpy(scene.instance_masks))
        attributes.append(torch.tensor([object_attribute_ids(obj) for obj in scene.objects], dtype=torch.long))
    return InstanceSegmentationScenes(torch.from_numpy(np.stack(images)), masks, attributes)


def object_attribute_ids(scene_object) -> tuple[int, int, int]:
    """A rendered object's colour, shape and size as indices into `SEG_ATTRIBUTES`."""
    return tuple(names.index(getattr(scene_object, attribute)) for attribute, names in SEG_ATTRIBUTES.items())


def sample_attribute_prompts(
    scenes: InstanceSegmentationScenes, scene_indices: list[int], prompts_per_image: int, generator: torch.Generator
) -> tuple[torch.LongTensor, torch.Tensor]:
    """For each scene, `prompts_per_image` promptable objects (distinct while the scene has enough, then drawn
    again), each named by a random phrase that picks it out alone: attribute ids (B, K, 3) and the objects' masks
    (B, K, size, size).

    Scenes without a promptable object are not accepted: filter them with `InstanceSegmentationScenes.promptable_objects`.
    """
    attribute_ids, targets = [], []
    for index in scene_indices:
        candidates = scenes.promptable_objects(index)
        if len(candidates) == 0:
            raise ValueError(f"Scene {index} has no visible object with unique attributes to prompt.")
        order = candidates[torch.randperm(len(candidates), generator=generator)]
        chosen = order[torch.arange(prompts_per_image) % len(order)]
        attributes, masks = scenes.object_attributes[index], scenes.instance_masks[index]
        visible = masks.flatten(1).any(-1)
        attribute_ids.append(
            torch.stack([unique_phrase_ids(attributes, visible, int(target), generator) for target in chosen])
        )
        targets.append(masks[chosen])
    return torch.stack(attribute_ids), torch.stack(targets)


def attribute_prompt_candidates(
    model: PerceptioForConditionalGeneration,
    prompt_embedding: AttributePromptEmbedding,
    sam_pixel_values: torch.Tensor,
    attribute_ids: torch.LongTensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM2's output for K attribute prompts per image, decoded exactly as `[SEG]` prompts are: logits
    (B, K, C, h, w), predicted IoU (B, K, C) and the image embedding (B, D, h', w') they attended to."""
    image_embeddings = model.sam_image_embeddings(sam_pixel_values.to(model.device))
    sparse, dense = model.seg_prompt_embeddings(prompt_embedding(attribute_ids.to(model.device)))
    mask_logits, iou_scores = model.run_mask_decoder(image_embeddings, sparse, dense)
    return mask_logits, iou_scores, image_embeddings[-1]


def evaluable_scenes(scenes: InstanceSegmentationScenes, min_objects: int) -> list[int]:
    """Indices of the scenes with at least `min_objects` promptable objects."""
    return [index for index in range(len(scenes)) if len(scenes.promptable_objects(index)) >= min_objects]


@torch.no_grad()
def grounding_gate(
    model: PerceptioForConditionalGeneration,
    prompt_embedding: AttributePromptEmbedding,
    scenes: InstanceSegmentationScenes,
    seed: int,
    batch_size: int = 32,
) -> GroundingGate:
    """Prompt two different objects of every held-out scene that has two: their masks' IoU with their own objects, and
    with each other."""
    indices = evaluable_scenes(scenes, EVAL_PROMPTS_PER_IMAGE)
    if not indices:
        raise ValueError("No held-out scene has two promptable objects; render more evaluation scenes.")
    generator = torch.Generator().manual_seed(seed)
    own, overlap, norms = [], [], []
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        attribute_ids, targets = sample_attribute_prompts(scenes, batch, EVAL_PROMPTS_PER_IMAGE, generator)
        logits, scores, image_embedding = attribute_prompt_candidates(
            model, prompt_embedding, scenes.sam_pixel_values[batch], attribute_ids
        )
        best = logits.gather(2, scores.argmax(-1)[..., None, None, None].expand(-1, -1, 1, *logits.shape[-2:]))
        predicted = nn.functional.interpolate(best[:, :, 0], size=targets.shape[-2:], mode="bilinear") > 0
        targets = targets.to(predicted.device)
        # The gate scores two empty masks 0, where the evaluation scores them 1.
        own.append(mask_iou(predicted, targets, empty_iou=0.0).flatten())
        overlap.append(mask_iou(predicted[:, 0], predicted[:, 1], empty_iou=0.0))
        norms.append(image_embedding.norm(dim=1).mean((-2, -1)))
    return GroundingGate(
        prompt_iou=torch.cat(own).mean().item(),
        two_object_overlap=torch.cat(overlap).mean().item(),
        image_embedding_norm=torch.cat(norms).mean().item(),
    )


def pretrain_grounding_encoder(
    model: PerceptioForConditionalGeneration,
    train_scenes: InstanceSegmentationScenes,
    eval_scenes: InstanceSegmentationScenes,
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    image_encoder_learning_rate: float = 5e-4,
    weight_decay: float = 0.1,
    prompts_per_image: int = 4,
    seed: int = 0,
    logging_steps: int = 50,
    schedule: str = "constant",
) -> GroundingPretrainingResult:
    """Train `model.grounding_encoder` (all of SAM2) on attribute prompts; the rest of the model is untouched.

    In the main stage `[SEG]` states take the attribute embeddings' place; the result keeps the embeddings, whose
    prompts can teach the `[SEG]` prompts where to go (`loss_seg_prompt`).
    """
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("prompts_per_image", prompts_per_image),
        ("logging_steps", logging_steps),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not learning_rate > 0 or not image_encoder_learning_rate > 0:
        raise ValueError(
            f"learning_rate and image_encoder_learning_rate must be > 0, got {learning_rate!r} and "
            f"{image_encoder_learning_rate!r}."
        )
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    validate_schedule(schedule)
    sam = model.grounding_encoder
    torch.manual_seed(seed)
    prompt_embedding = AttributePromptEmbedding(sam.config.mask_decoder_config.hidden_size).to(model.device)
    initial = grounding_gate(model, prompt_embedding, eval_scenes, seed)
    image_encoder = list(sam.vision_encoder.parameters())
    image_encoder_ids = {id(parameter) for parameter in image_encoder}
    rest = [parameter for parameter in sam.parameters() if id(parameter) not in image_encoder_ids]
    optimizer = torch.optim.AdamW(
        [
            {"params": image_encoder, "lr": image_encoder_learning_rate},
            {"params": rest + list(prompt_embedding.parameters()), "lr": learning_rate},
        ],
        weight_decay=weight_decay,
    )
    trainable = evaluable_scenes(train_scenes, 1)
    generator = torch.Generator().manual_seed(seed)

    def step_loss() -> torch.Tensor:
        indices = [trainable[i] for i in torch.randint(len(trainable), (batch_size,), generator=generator).tolist()]
        attribute_ids, targets = sample_attribute_prompts(train_scenes, indices, prompts_per_image, generator)
        logits, scores, _ = attribute_prompt_candidates(
            model, prompt_embedding, train_scenes.sam_pixel_values[indices], attribute_ids
        )
        targets = targets.to(logits.device).flatten(0, 1)
        return sum(model.mask_losses(logits.flatten(0, 1), scores.flatten(0, 1), targets).values())

    sam.train()
    log = run_pretraining_steps(
        step_loss, optimizer, steps, logging_steps, "Pretraining SAM2 on attribute prompts", schedule
    )
    sam.eval()
    final = grounding_gate(model, prompt_embedding, eval_scenes, seed)
    training = grounding_gate(model, prompt_embedding, train_scenes.first(len(eval_scenes)), seed)
    return GroundingPretrainingResult(log, initial, final, training, prompt_embedding.requires_grad_(False))
