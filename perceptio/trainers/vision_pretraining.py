"""Dense pretraining of a from-scratch InternVL vision tower on rendered scenes, standing in for a pretrained InternViT.

Perceptio starts from InternVL, whose vision tower arrives pretrained: its patch features already say what is where.
The tiny recipe's vision tower starts from random weights, and a language model that must discover colour, shape and
depth through a handful of answer tokens per question learns to read its image very slowly. This stage gives the tower
what pretraining gives InternViT: every patch token is trained to say the colour, shape and size of the object it
shows (or that it shows none) and how near it is, and the mean of an object's patch tokens is trained to say its shape,
the attribute a single patch shows least of. On a share of the scenes (`marked_share`) points are marked as the
relative-depth questions mark them, and the patch under each marked point is trained to say its letter: a question
that names points by letter must find them among the image tokens. With `tallies` (names of `TALLY_GROUPS`), every
patch is also trained to say how many visible objects of the scene share its object's colour, its shape, its size and
shape, or its colour and shape, or how many objects the scene holds: a count question names objects by those
attributes, and a language model that sees only which attribute each image token shows cannot tell two tokens of one
object from tokens of two. With `positions`, every patch is also trained to say its row and its column in the patch
grid: nothing else in the stage asks where a patch is, and the layout questions (left of, the leftmost) need it. The
heads are linear probes, discarded after the stage, so the features must carry the attributes linearly, where the
language model's attention can read them.

The held-out probe accuracies (on foreground patches, per object for the pooled shape, on marked patches for the
letter, on every patch for the scene's object count and for the row and column) are the stage's gate, reported
before and after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.scene_rendering import (
    COLOUR_PALETTE,
    DEFAULT_SAMPLING_CONFIG,
    SHAPES,
    SIZE_NAMES,
    SceneRender,
    render_scenes,
)
from ..data.synthetic_tasks import POINT_LETTERS, make_relative_depth_sample
from ..models.perceptio import PerceptioForConditionalGeneration, PerceptioImageProcessor
from .pretraining_loop import run_pretraining_steps


SCENE_STREAMS = {"train": 2, "eval": 3}
# Which scenes carry marked points is drawn from its own stream, so the scenes themselves do not depend on the share.
MARKER_STREAM = 1
PATCH_ATTRIBUTES: dict[str, int] = {"colour": len(COLOUR_PALETTE), "shape": len(SHAPES), "size": len(SIZE_NAMES)}
NUM_DEPTH_BINS = 8
BACKGROUND = -1
# The marker probe's classes: one per point letter, then "no marked point here".
NUM_MARKER_CLASSES = len(POINT_LETTERS) + 1
# Objects covering fewer patches than this are left out of the pooled-shape objective: one patch shows no outline.
MIN_POOLED_PATCHES = 2
# The tally probes: for each, the attribute columns (of colour, shape, size) an object must share with the patch's own
# object to be counted, as the count questions group objects; "objects" counts every visible object of the scene.
TALLY_GROUPS: dict[str, tuple[int, ...]] = {
    "colour_tally": (0,),
    "shape_tally": (1,),
    "size_shape_tally": (1, 2),
    "colour_shape_tally": (0, 1),
    "object_tally": (),
}
# A tally's classes: 0 (a background patch, for the attribute tallies) to the most objects a scene holds.
NUM_TALLY_CLASSES = DEFAULT_SAMPLING_CONFIG.max_objects + 1
# The probes of where a patch (or token cell) lies in its square grid, each with one class per row (column).
POSITION_PROBES = ("row", "column")


@dataclass
class PatchLabelledScenes:
    """Rendered scenes as vision-tower inputs with per-patch labels.

    `pixel_values` (S, 3, H, W) as the processor normalises a tile; `patch_objects` (S, P) the index of the object
    most of each patch shows (`BACKGROUND` for none); `object_attributes` (S, max_objects, 3) each object's colour,
    shape and size ids (padding rows unused); `object_visible` (S, max_objects) whether the object shows any pixel (as
    the count questions count objects; False on padding rows); `patch_depth` (S, P) each patch's mean metric depth;
    `patch_markers` (S, P) the letter index (in `POINT_LETTERS`) of the marked point a patch holds (`BACKGROUND` for
    none).
    """

    pixel_values: torch.Tensor
    patch_objects: torch.LongTensor
    object_attributes: torch.LongTensor
    object_visible: torch.BoolTensor
    patch_depth: torch.Tensor
    patch_markers: torch.LongTensor

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def first(self, count: int) -> PatchLabelledScenes:
        """The first `count` scenes (all of them when there are fewer)."""
        return PatchLabelledScenes(*(getattr(self, field.name)[:count] for field in fields(self)))


def label_grid_side(scenes: PatchLabelledScenes) -> int:
    """The side of the square grid of patches (or token cells) `scenes` are labelled on."""
    return math.isqrt(scenes.patch_objects.shape[1])


def cell_position_targets(num_images: int, grid_side: int) -> dict[str, torch.Tensor]:
    """Each grid cell's row and column (num_images, grid_side ** 2), in the row-major order of the patches."""
    cells = torch.arange(grid_side**2).expand(num_images, -1)
    return {"row": cells // grid_side, "column": cells % grid_side}


def patch_majority(instance_ids: np.ndarray, patch_size: int) -> np.ndarray:
    """The most frequent value of each `patch_size`² patch of an (H, W) id map, row-major -> (P,)."""
    height, width = instance_ids.shape
    rows, columns = height // patch_size, width // patch_size
    patches = instance_ids.reshape(rows, patch_size, columns, patch_size).transpose(0, 2, 1, 3)
    patches = patches.reshape(rows * columns, -1)
    offset = patches - BACKGROUND
    counts = np.stack([(offset == value).sum(-1) for value in range(int(offset.max()) + 1)], -1)
    return counts.argmax(-1) + BACKGROUND


def marked_scene(
    scene: SceneRender, rng: np.random.Generator, patch_size: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """`scene`'s image with points marked as a relative-depth question marks them, and each patch's marker label
    (row-major, `BACKGROUND` where no marked point lies); None when no such point set fits on the scene."""
    sample = make_relative_depth_sample(scene, rng)
    if sample is None:
        return None
    columns = scene.image.shape[1] // patch_size
    labels = np.full((scene.image.shape[0] // patch_size) * columns, BACKGROUND)
    for (x, y), letter in zip(sample.meta["points"], sample.meta["letters"]):
        labels[(y // patch_size) * columns + x // patch_size] = POINT_LETTERS.index(letter)
    return sample.image, labels


def check_marked_share(share: float, name: str = "marked_share") -> None:
    """A share of marked scenes must be a number in [0, 1]; `name` is the setting the error names."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {share!r}.")


def render_patch_labelled_scenes(
    num_scenes: int,
    image_processor: PerceptioImageProcessor,
    patch_size: int,
    seed: int,
    stream: str = "train",
    processes: int = 1,
    marked_share: float = 0.0,
) -> PatchLabelledScenes:
    """Render `num_scenes` scenes of `stream` ("train" or "eval", disjoint) at the tile size, with patch labels (by
    `processes` worker processes; the same scenes). About `marked_share` of them carry marked points (see
    `marked_scene`)."""
    if not isinstance(num_scenes, int) or num_scenes <= 0:
        raise ValueError(f"num_scenes must be a positive integer, got {num_scenes!r}.")
    if stream not in SCENE_STREAMS:
        raise ValueError(f"stream must be one of {sorted(SCENE_STREAMS)}, got {stream!r}.")
    check_marked_share(marked_share)
    size = image_processor.tile_size
    if size % patch_size:
        raise ValueError(f"The tile size ({size}) must be a multiple of patch_size ({patch_size}).")
    rng = np.random.default_rng([seed, SCENE_STREAMS[stream]])
    marker_rng = np.random.default_rng([seed, SCENE_STREAMS[stream], MARKER_STREAM])
    pixel_values, patch_objects, attributes, visible, patch_depth, patch_markers = [], [], [], [], [], []
    vocabularies = {"colour": tuple(COLOUR_PALETTE), "shape": SHAPES, "size": SIZE_NAMES}
    seeds = [int(rng.integers(2**63 - 1)) for _ in range(num_scenes)]
    scenes = render_scenes(seeds, size, processes)
    for scene in tqdm(scenes, total=num_scenes, desc=f"Rendering {stream} scenes for the vision tower"):
        marked = marked_scene(scene, marker_rng, patch_size) if marker_rng.random() < marked_share else None
        image, markers = marked if marked is not None else (scene.image, unmarked_patches(size, patch_size))
        pixel_values.append(image_processor(image)["pixel_values"][0])
        patch_markers.append(torch.from_numpy(markers))
        instance_ids = np.full(scene.image.shape[:2], BACKGROUND)
        for index, mask in enumerate(scene.instance_masks):
            instance_ids[mask] = index
        patch_objects.append(torch.from_numpy(patch_majority(instance_ids, patch_size)))
        attributes.append(
            torch.tensor(
                [[names.index(getattr(obj, name)) for name, names in vocabularies.items()] for obj in scene.objects]
            )
        )
        visible.append(torch.tensor([obj.visible_pixels > 0 for obj in scene.objects]))
        depth = scene.depth.reshape(size // patch_size, patch_size, size // patch_size, patch_size).mean((1, 3))
        patch_depth.append(torch.from_numpy(depth.reshape(-1).astype(np.float32)))
    max_objects = max(len(rows) for rows in attributes)
    padded = torch.zeros(num_scenes, max_objects, len(vocabularies), dtype=torch.long)
    padded_visible = torch.zeros(num_scenes, max_objects, dtype=torch.bool)
    for index, (rows, shown) in enumerate(zip(attributes, visible)):
        padded[index, : len(rows)] = rows
        padded_visible[index, : len(shown)] = shown
    return PatchLabelledScenes(
        torch.stack(pixel_values),
        torch.stack(patch_objects),
        padded,
        padded_visible,
        torch.stack(patch_depth),
        torch.stack(patch_markers).long(),
    )


def unmarked_patches(size: int, patch_size: int) -> np.ndarray:
    """The marker labels of a `size`² image without marked points, cut into `patch_size`² patches."""
    return np.full((size // patch_size) ** 2, BACKGROUND)


class VisionProbeHeads(nn.Module):
    """Linear probes on patch features: one per attribute (its classes plus background), one for the depth bin, one
    for the marked point's letter (plus none), one per tally named in `tallies` and (`grid_side` > 0) one for the
    patch's row and one for its column in a patch grid of that side."""

    def __init__(
        self, hidden_size: int, depth_bin_edges: torch.Tensor, tallies: tuple[str, ...] = (), grid_side: int = 0
    ):
        super().__init__()
        self.attributes = nn.ModuleDict(
            {name: nn.Linear(hidden_size, num_classes + 1) for name, num_classes in PATCH_ATTRIBUTES.items()}
        )
        self.depth = nn.Linear(hidden_size, NUM_DEPTH_BINS)
        self.marker = nn.Linear(hidden_size, NUM_MARKER_CLASSES)
        self.tallies = nn.ModuleDict(
            {name: nn.Linear(hidden_size, NUM_TALLY_CLASSES) for name in checked_tallies(tallies)}
        )
        self.positions = nn.ModuleDict(
            {name: nn.Linear(hidden_size, grid_side) for name in (POSITION_PROBES if grid_side else ())}
        )
        self.register_buffer("depth_bin_edges", depth_bin_edges)


@dataclass
class VisionProbeAccuracy:
    """Held-out probe accuracies: per foreground patch for colour, shape, size and depth bin, per object for the
    pooled shape, per marked patch for the marker letter (None when no held-out scene is marked), and for the tally
    probes per foreground patch, averaged over the attribute tallies, and per patch for the scene's object count, and
    per patch for its row and its column (None for those not trained)."""

    colour: float
    shape: float
    size: float
    depth_bin: float
    pooled_shape: float
    marker_letter: float | None
    attribute_tally: float | None = None
    object_tally: float | None = None
    row: float | None = None
    column: float | None = None


@dataclass
class VisionPretrainingResult:
    """The training log (step, loss), the held-out probe accuracies before and after the stage, and after it on as
    many training scenes as are held out: where those beat the held-out ones, the tower has learned its scenes rather
    than what they show, and more scenes are what it lacks."""

    log: list[dict[str, float]]
    initial: VisionProbeAccuracy
    final: VisionProbeAccuracy
    training: VisionProbeAccuracy


def patch_targets(
    scenes: PatchLabelledScenes, indices: torch.Tensor, edges: torch.Tensor, tallies: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Per-patch class targets (B, P) of `indices`: each attribute (background = its last class), the depth bin, the
    marked point's letter (none = its last class) and each tally named in `tallies`."""
    objects = scenes.patch_objects[indices]
    background = objects == BACKGROUND
    rows = scenes.object_attributes[indices].gather(1, objects.clamp(min=0)[..., None].expand(-1, -1, 3))
    targets = {
        name: torch.where(background, num_classes, rows[..., column])
        for column, (name, num_classes) in enumerate(PATCH_ATTRIBUTES.items())
    }
    targets["depth_bin"] = torch.bucketize(scenes.patch_depth[indices], edges.to(scenes.patch_depth.device))
    markers = scenes.patch_markers[indices]
    targets["marker"] = torch.where(markers == BACKGROUND, NUM_MARKER_CLASSES - 1, markers)
    return {**targets, **patch_tallies(scenes, indices, tallies)}


def probe_targets(
    heads: VisionProbeHeads, scenes: PatchLabelledScenes, indices: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The per-patch targets (B, P) of every probe `heads` holds, for the scenes at `indices`."""
    targets = patch_targets(scenes, indices, heads.depth_bin_edges, tuple(heads.tallies))
    if heads.positions:
        targets.update(cell_position_targets(len(indices), label_grid_side(scenes)))
    return targets


def checked_tallies(tallies: tuple[str, ...] | list[str], name: str = "tallies") -> tuple[str, ...]:
    """`tallies` as a tuple in `TALLY_GROUPS` order; a `ValueError` naming `name` unless it is a list or tuple of
    distinct tally names."""
    if isinstance(tallies, str) or not isinstance(tallies, (list, tuple)):
        raise ValueError(f"{name} must be a list of tally names from {list(TALLY_GROUPS)}, got {tallies!r}.")
    unknown = [tally for tally in tallies if tally not in TALLY_GROUPS]
    if unknown or len(set(tallies)) != len(tallies):
        raise ValueError(f"{name} must name distinct tallies of {list(TALLY_GROUPS)}, got {list(tallies)!r}.")
    return tuple(tally for tally in TALLY_GROUPS if tally in tallies)


def patch_tallies(
    scenes: PatchLabelledScenes, indices: torch.Tensor, tallies: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Per-patch targets (B, P) of `indices` for each tally named in `tallies`: how many visible objects share the
    group's attributes with the patch's object (0 on background patches; every patch for the object count)."""
    objects = scenes.patch_objects[indices]
    attributes = scenes.object_attributes[indices]
    visible = scenes.object_visible[indices]
    own = attributes.gather(1, objects.clamp(min=0)[..., None].expand(-1, -1, attributes.shape[-1]))
    targets = {}
    for name in tallies:
        columns = list(TALLY_GROUPS[name])
        if not columns:
            targets[name] = visible.sum(1, keepdim=True).expand_as(objects)
            continue
        shared = (own[:, :, None, columns] == attributes[:, None, :, columns]).all(-1)
        targets[name] = torch.where(objects == BACKGROUND, 0, (shared & visible[:, None, :]).sum(-1))
    return targets


def marked_patches(targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where the targets mark a point (B, P)."""
    return targets["marker"] != NUM_MARKER_CLASSES - 1


def balanced_marker_loss(logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Cross-entropy of the marker probe, averaged over marked patches and over the others separately and summed:
    marked points are a few patches in a hundred, and a plain average would teach the probe to say none. None when
    no patch of the batch is marked (scenes rendered without marked points train no marker probe)."""
    marked = marked_patches(targets).flatten()
    if not marked.any():
        return None
    losses = nn.functional.cross_entropy(logits.flatten(0, 1), targets["marker"].flatten(), reduction="none")
    return losses[marked].mean() + losses[~marked].mean()


def targets_on(targets: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The targets on the device of the features they score (the scenes stay on the CPU)."""
    return {name: target.to(device) for name, target in targets.items()}


def pooled_object_features(
    features: torch.Tensor, objects: torch.LongTensor, attributes: torch.LongTensor
) -> tuple[torch.Tensor, torch.LongTensor]:
    """The mean patch feature of every object covering at least `MIN_POOLED_PATCHES` patches, and its shape id."""
    objects, attributes = objects.to(features.device), attributes.to(features.device)
    membership = nn.functional.one_hot(objects + 1, attributes.shape[1] + 1)[..., 1:].to(features.dtype)
    counts = membership.sum(1)
    pooled = torch.einsum("bpo,bpd->bod", membership, features) / counts.clamp(min=1)[..., None]
    keep = counts >= MIN_POOLED_PATCHES
    return pooled[keep], attributes[..., 1][keep]


def probe_losses(
    heads: VisionProbeHeads, features: torch.Tensor, targets: dict[str, torch.Tensor], scenes, indices
) -> dict[str, torch.Tensor]:
    """Cross-entropy of every probe, the pooled shape and the (balanced) marker letter included."""
    losses = {
        name: nn.functional.cross_entropy(head(features).flatten(0, 1), targets[name].flatten())
        for name, head in heads.attributes.items()
    }
    losses["depth_bin"] = nn.functional.cross_entropy(
        heads.depth(features).flatten(0, 1), targets["depth_bin"].flatten()
    )
    marker_loss = balanced_marker_loss(heads.marker(features), targets)
    if marker_loss is not None:
        losses["marker"] = marker_loss
    pooled, shapes = pooled_object_features(features, scenes.patch_objects[indices], scenes.object_attributes[indices])
    losses["pooled_shape"] = nn.functional.cross_entropy(heads.attributes["shape"](pooled), shapes)
    for name, head in (*heads.tallies.items(), *heads.positions.items()):
        losses[name] = nn.functional.cross_entropy(head(features).flatten(0, 1), targets[name].flatten())
    return losses


def patch_features(model: PerceptioForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's last patch features (B, P, D) without the class token, as InternVL's projector reads them."""
    return model.model.vision_tower(pixel_values=pixel_values.to(model.device)).last_hidden_state[:, 1:]


@torch.no_grad()
def probe_accuracy(
    model: PerceptioForConditionalGeneration,
    heads: VisionProbeHeads,
    scenes: PatchLabelledScenes,
    batch_size: int = 64,
) -> VisionProbeAccuracy:
    """Held-out accuracy of every probe."""
    correct = dict.fromkeys((field.name for field in fields(VisionProbeAccuracy)), 0.0)
    totals = dict.fromkeys(("foreground", "object", "marked", "patch", "positioned"), 0)
    for start in range(0, len(scenes), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(scenes)))
        features = patch_features(model, scenes.pixel_values[indices])
        targets = targets_on(probe_targets(heads, scenes, indices), features.device)
        foreground = (scenes.patch_objects[indices] != BACKGROUND).to(features.device)
        for name, head in heads.attributes.items():
            correct[name] += ((head(features).argmax(-1) == targets[name]) & foreground).sum().item()
        correct["depth_bin"] += ((heads.depth(features).argmax(-1) == targets["depth_bin"]) & foreground).sum().item()
        pooled, shapes = pooled_object_features(
            features, scenes.patch_objects[indices], scenes.object_attributes[indices]
        )
        correct["pooled_shape"] += (heads.attributes["shape"](pooled).argmax(-1) == shapes).sum().item()
        marked = marked_patches(targets)
        correct["marker_letter"] += ((heads.marker(features).argmax(-1) == targets["marker"]) & marked).sum().item()
        for name, head in heads.tallies.items():
            right = head(features).argmax(-1) == targets[name]
            if name == "object_tally":
                correct["object_tally"] += right.sum().item()
            else:
                correct["attribute_tally"] += (right & foreground).sum().item()
        for name, head in heads.positions.items():
            correct[name] += (head(features).argmax(-1) == targets[name]).sum().item()
        totals["foreground"] += int(foreground.sum())
        totals["object"] += len(shapes)
        totals["marked"] += int(marked.sum())
        totals["patch"] += foreground.numel() if "object_tally" in heads.tallies else 0
        totals["positioned"] += foreground.numel() if heads.positions else 0
    attribute_tallies = sum(name != "object_tally" for name in heads.tallies)
    denominators = {
        **dict.fromkeys(correct, totals["foreground"]),
        "pooled_shape": totals["object"],
        "marker_letter": totals["marked"],
        "attribute_tally": totals["foreground"] * attribute_tallies,
        "object_tally": totals["patch"],
        **dict.fromkeys(POSITION_PROBES, totals["positioned"]),
    }
    return VisionProbeAccuracy(
        **{name: value / denominators[name] if denominators[name] else None for name, value in correct.items()}
    )


def depth_bin_edges(scenes: PatchLabelledScenes) -> torch.Tensor:
    """Edges that split the training patches' depths into `NUM_DEPTH_BINS` equally populated bins."""
    quantiles = torch.linspace(0, 1, NUM_DEPTH_BINS + 1)[1:-1]
    return torch.quantile(scenes.patch_depth.flatten().double(), quantiles.double()).float()


def pretrain_vision_tower(
    model: PerceptioForConditionalGeneration,
    train_scenes: PatchLabelledScenes,
    eval_scenes: PatchLabelledScenes,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    logging_steps: int = 50,
    tallies: tuple[str, ...] = (),
    positions: bool = False,
) -> VisionPretrainingResult:
    """Train `model.model.vision_tower` on the patch probes, the tally probes named in `tallies` and, with
    `positions`, the probes of each patch's row and column; the rest of the model is untouched."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("logging_steps", logging_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not learning_rate > 0 or not weight_decay >= 0:
        raise ValueError(f"learning_rate must be > 0 and weight_decay >= 0, got {learning_rate!r}, {weight_decay!r}.")
    if not isinstance(positions, bool):
        raise ValueError(f"positions must be True or False, got {positions!r}.")
    torch.manual_seed(seed)
    tower = model.model.vision_tower
    hidden_size = model.config.vision_config.hidden_size
    grid_side = label_grid_side(train_scenes) if positions else 0
    heads = VisionProbeHeads(hidden_size, depth_bin_edges(train_scenes), tallies, grid_side).to(model.device)
    initial = probe_accuracy(model, heads, eval_scenes)
    optimizer = torch.optim.AdamW(
        list(tower.parameters()) + list(heads.parameters()), lr=learning_rate, weight_decay=weight_decay
    )
    generator = torch.Generator().manual_seed(seed)

    def step_loss() -> torch.Tensor:
        indices = torch.randint(len(train_scenes), (batch_size,), generator=generator)
        features = patch_features(model, train_scenes.pixel_values[indices])
        targets = targets_on(probe_targets(heads, train_scenes, indices), features.device)
        return sum(probe_losses(heads, features, targets, train_scenes, indices).values())

    tower.train()
    log = run_pretraining_steps(step_loss, optimizer, steps, logging_steps, "Pretraining the vision tower")
    tower.eval()
    return VisionPretrainingResult(
        log,
        initial,
        probe_accuracy(model, heads, eval_scenes),
        probe_accuracy(model, heads, train_scenes.first(len(eval_scenes))),
    )
