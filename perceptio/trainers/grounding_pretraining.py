"""Promptable-segmentation pretraining of a from-scratch SAM2 on rendered scenes.

Perceptio starts from a released SAM2 and only learns to prompt it with `[SEG]` states. The tiny recipe has no
SAM2 checkpoint of its size, so it first trains its SAM2 the way SAM itself is trained: a point inside an object in,
that object's mask out, with the model's own mask losses (`PerceptioForConditionalGeneration.mask_losses`: the best
candidate's BCE + Dice and the IoU head's regression). Rendered scenes give exact instance masks for this, as they
give exact depth to the depth tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.scene_rendering import render_scene
from ..modeling_perceptio import PerceptioForConditionalGeneration
from ..processing import PerceptioImageProcessor


@dataclass
class InstanceSegmentationScenes:
    """Rendered scenes as SAM2 inputs: `sam_pixel_values` (S, 3, size, size) and each scene's instance masks
    (objects, size, size) at the SAM2 input size."""

    sam_pixel_values: torch.Tensor
    instance_masks: list[torch.Tensor]

    def __len__(self) -> int:
        return self.sam_pixel_values.shape[0]


@dataclass
class GroundingPretrainingResult:
    """The training log (step, loss) and the held-out mean IoU of single-point prompts before and after."""

    log: list[dict[str, float]]
    initial_point_prompt_iou: float
    point_prompt_iou: float


SCENE_STREAMS = {"train": 0, "eval": 1}


def render_instance_scenes(
    num_scenes: int, image_processor: PerceptioImageProcessor, seed: int, stream: str = "train"
) -> InstanceSegmentationScenes:
    """Render `num_scenes` scenes of `stream` ("train" or "eval", disjoint) from `seed` at the SAM2 input size, with
    their exact instance masks."""
    if not isinstance(num_scenes, int) or num_scenes <= 0:
        raise ValueError(f"num_scenes must be a positive integer, got {num_scenes!r}.")
    if stream not in SCENE_STREAMS:
        raise ValueError(f"stream must be one of {sorted(SCENE_STREAMS)}, got {stream!r}.")
    size = image_processor.sam_image_size
    rng = np.random.default_rng([seed, SCENE_STREAMS[stream]])
    images, masks = [], []
    for _ in tqdm(range(num_scenes), desc=f"Rendering {stream} scenes for SAM2"):
        scene = render_scene(int(rng.integers(2**63 - 1)), size)
        images.append(image_processor.sam_view(scene.image))
        masks.append(torch.from_numpy(scene.instance_masks))
    return InstanceSegmentationScenes(torch.from_numpy(np.stack(images)), masks)


def sample_point_prompts(
    scenes: InstanceSegmentationScenes, scene_indices: list[int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each scene, one random object and one random pixel inside it: points (B, 2) as (x, y) in SAM2 input
    pixels, and that object's mask (B, size, size)."""
    points, targets = [], []
    for index in scene_indices:
        masks = scenes.instance_masks[index]
        visible = torch.nonzero(masks.flatten(1).any(-1)).flatten()
        chosen = masks[visible[torch.randint(len(visible), (1,), generator=generator)].item()]
        pixels = torch.nonzero(chosen)
        row, column = pixels[torch.randint(len(pixels), (1,), generator=generator)].flatten().tolist()
        points.append(torch.tensor([column, row], dtype=torch.float32))
        targets.append(chosen)
    return torch.stack(points), torch.stack(targets)


def point_prompt_candidates(
    model: PerceptioForConditionalGeneration, sam_pixel_values: torch.Tensor, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM2's output for one positive point per image, as the model decodes `[SEG]` (its three candidates, or its
    single mask when `config.sam2_multimask_output` is False): logits (B, C, h, w) and predicted IoU (B, C)."""
    sam = model.grounding_encoder
    image_embeddings = model.sam_image_embeddings(sam_pixel_values)
    batch_size = points.shape[0]
    labels = torch.ones(batch_size, 1, 1, dtype=torch.int32, device=points.device)
    sparse, dense = sam.prompt_encoder(points.view(batch_size, 1, 1, 2).to(model.dtype), labels, None, None)
    mask_logits, iou_scores = model.run_mask_decoder(image_embeddings, sparse, dense)
    return mask_logits[:, 0], iou_scores[:, 0]


@torch.no_grad()
def point_prompt_iou(
    model: PerceptioForConditionalGeneration, scenes: InstanceSegmentationScenes, seed: int, batch_size: int = 32
) -> float:
    """Mean IoU over `scenes` of the candidate SAM2 ranks best for one random point inside one random object."""
    generator = torch.Generator().manual_seed(seed)
    ious = []
    for start in range(0, len(scenes), batch_size):
        indices = list(range(start, min(start + batch_size, len(scenes))))
        points, targets = sample_point_prompts(scenes, indices, generator)
        logits, scores = point_prompt_candidates(model, scenes.sam_pixel_values[indices], points)
        best = logits[torch.arange(len(indices)), scores.argmax(-1)]
        predicted = torch.nn.functional.interpolate(
            best[:, None], size=targets.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0] > 0
        intersection = (predicted & targets).flatten(1).sum(-1).float()
        union = (predicted | targets).flatten(1).sum(-1).float().clamp_min(1.0)
        ious.append(intersection / union)
    return torch.cat(ious).mean().item()


def pretrain_grounding_encoder(
    model: PerceptioForConditionalGeneration,
    train_scenes: InstanceSegmentationScenes,
    eval_scenes: InstanceSegmentationScenes,
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    logging_steps: int = 50,
) -> GroundingPretrainingResult:
    """Train `model.grounding_encoder` (all of SAM2) on single-point prompts; the rest of the model is untouched."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("logging_steps", logging_steps)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}.")
    sam = model.grounding_encoder
    initial_iou = point_prompt_iou(model, eval_scenes, seed)
    optimizer = torch.optim.AdamW(sam.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    sam.train()
    log: list[dict[str, float]] = []
    progress = tqdm(range(steps), desc="Pretraining SAM2 on point prompts")
    for step in progress:
        indices = torch.randint(len(train_scenes), (batch_size,), generator=generator).tolist()
        points, targets = sample_point_prompts(train_scenes, indices, generator)
        logits, scores = point_prompt_candidates(model, train_scenes.sam_pixel_values[indices], points)
        loss = sum(model.mask_losses(logits, scores, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % logging_steps == 0 or step + 1 == steps:
            log.append({"step": step + 1, "loss": loss.item()})
            progress.set_postfix(loss=f"{loss.item():.3f}")
    sam.eval()
    return GroundingPretrainingResult(log, initial_iou, point_prompt_iou(model, eval_scenes, seed))
