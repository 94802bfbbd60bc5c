"""Start the multimodal projector from linear probes of a pretrained vision tower, so each image token says what its
cell shows in a fixed vocabulary.

A language model binds the words of a question to image tokens far more easily when every token showing a red cube is
one and the same vector than when the tokens vary with everything else the tower sees (edges, position, texture):
a frozen pretrained tower read through a projector trained from random with the language model answers fewer than
half of the reading stage's colour questions, and read through its own probes' class probabilities most of them (see
docs/training.md). This stage fits, on the frozen tower's pixel-shuffled token features, one linear probe per
attribute (colour, shape, size, each with a background class), one for the depth bin of each token's cell and, when
the scenes have marked points, one for the letter of a marked point in it (with a none class), the vision
pretraining's tally probes named in `tallies` (how many objects share the cell's object's colour, shape, size and
shape, or colour and shape, or how many the scene holds) and, with `positions`, one for the cell's row and one for its
column in the token grid, each class a one-vs-rest logistic classifier, and writes them into InternVL's projector,
unchanged in form, with its activation set to the sigmoid:

- `layer_norm` is the probes' input normalisation;
- the first rows of `linear_1` are the probes, so after the sigmoid a token's first channels are its class
  probabilities, each in [0, 1] whatever the tower's feature scale;
- the matching columns of `linear_2` are a fixed random embedding per class, so a token is the sum of its likely
  classes' embeddings; its other columns start at zero and the other rows of `linear_1` keep their random start, so
  the projector can still learn what the probes miss.

Without the position probes the tokens keep hardly any of where their cell is (a linear readout of a token's column
from the embedded checkpoint's image tokens is right 0.14 of the time, chance 0.13, where its tower's features give
0.64): the language model then has only the tokens' order to tell left from right.

A checkpoint keeps InternVL's layout (`projector_hidden_act` "sigmoid" in its config). The held-out probe accuracies
per token cell (foreground cells for the attributes and tallies, marked cells for the letter, every cell for the
object count) are the stage's report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..models.perceptio import PerceptioForConditionalGeneration
from .pretraining_loop import run_pretraining_steps
from .vision_pretraining import (
    BACKGROUND,
    NUM_DEPTH_BINS,
    NUM_MARKER_CLASSES,
    NUM_TALLY_CLASSES,
    PATCH_ATTRIBUTES,
    POSITION_PROBES,
    TALLY_GROUPS,
    PatchLabelledScenes,
    cell_position_targets,
    checked_tallies,
    depth_bin_edges,
    label_grid_side,
    marked_patches,
    patch_targets,
)


# Random class embeddings are drawn at this standard deviation (per channel), the scale at which fixed random
# attribute embeddings were read by the language model as well as learned ones.
CLASS_EMBEDDING_STD = 0.5
# The projector's activation once it holds the probes: their one-vs-rest class probabilities.
PROBE_ACTIVATION = "sigmoid"


@dataclass
class ProjectorProbeResult:
    """The probes' training log (step, loss) and held-out accuracies per token cell (foreground cells for colour,
    shape, size and depth bin; all cells for telling object from background; cells holding a marked point for its
    letter, None when no held-out scene is marked; foreground cells for the attribute tallies together and all cells
    for the object count, every cell for its row and column; None for those not fitted)."""

    log: list[dict[str, float]]
    colour: float
    shape: float
    size: float
    depth_bin: float
    background: float
    marker_letter: float | None
    attribute_tally: float | None = None
    object_tally: float | None = None
    row: float | None = None
    column: float | None = None


def probe_class_counts(
    with_markers: bool = False, tallies: tuple[str, ...] = (), grid_side: int = 0
) -> dict[str, int]:
    """Each probe's number of classes: every attribute's values plus background, the depth bins, then (`with_markers`)
    the marked point's letters plus none, the counts of each tally named in `tallies` and (`grid_side` > 0) the rows
    and the columns of a token grid of that side."""
    counts = {**{name: count + 1 for name, count in PATCH_ATTRIBUTES.items()}, "depth_bin": NUM_DEPTH_BINS}
    if with_markers:
        counts["marker"] = NUM_MARKER_CLASSES
    counts.update(dict.fromkeys(checked_tallies(tallies), NUM_TALLY_CLASSES))
    return {**counts, **dict.fromkeys(POSITION_PROBES if grid_side else (), grid_side)}


def has_marked_points(scenes: PatchLabelledScenes) -> bool:
    """Whether any patch of `scenes` holds a marked point."""
    return bool((scenes.patch_markers != BACKGROUND).any())


def vision_patch_size(model: PerceptioForConditionalGeneration) -> int:
    """The side in pixels of one vision-tower patch (configs give it as an int or a square pair)."""
    patch_size = model.config.vision_config.patch_size
    return patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size


def token_cell_size(model: PerceptioForConditionalGeneration) -> int:
    """The side in pixels of the image cell one image token covers (patches merged by the pixel shuffle)."""
    return int(round(vision_patch_size(model) / model.config.downsample_ratio))


def token_features(model: PerceptioForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's pixel-shuffled features (B, T, D) of the model's `vision_feature_layer`, one row per image
    token, exactly as the projector reads them (row-major over the token cells)."""
    inner, config = model.model, model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"Probes read one vision feature layer; the model's vision_feature_layer is {layer!r}.")
    outputs = inner.vision_tower(pixel_values=pixel_values.to(model.device), output_hidden_states=layer != -1)
    features = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    batch, patches, _ = features.shape
    side = int(patches**0.5)
    features = inner.pixel_shuffle(features.reshape(batch, side, side, -1), scale_factor=model.config.downsample_ratio)
    return features.reshape(batch, -1, features.shape[-1])


class TokenProbes(nn.Module):
    """Layer-normalised linear probes on token features, one per attribute, one for the depth bin, (`with_markers`)
    one for the marked point's letter, one per tally named in `tallies` and (`grid_side` > 0) one for the cell's row
    and one for its column."""

    def __init__(
        self, feature_size: int, with_markers: bool = False, tallies: tuple[str, ...] = (), grid_side: int = 0
    ):
        super().__init__()
        self.layer_norm = nn.LayerNorm(feature_size)
        counts = probe_class_counts(with_markers, tallies, grid_side)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_size, count) for name, count in counts.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        normalised = self.layer_norm(features)
        return {name: head(normalised) for name, head in self.heads.items()}


@torch.no_grad()
def scene_token_features(
    model: PerceptioForConditionalGeneration, scenes: PatchLabelledScenes, batch_size: int = 64
) -> torch.Tensor:
    """The token features of every scene (the tower is frozen for the probes, so they are computed once)."""
    return torch.cat(
        [
            token_features(model, scenes.pixel_values[start : start + batch_size]).cpu()
            for start in range(0, len(scenes), batch_size)
        ]
    )


@torch.no_grad()
def token_probe_accuracy(
    probes: TokenProbes, features: torch.Tensor, scenes: PatchLabelledScenes, edges: torch.Tensor
) -> dict[str, float | None]:
    """Held-out accuracy of every probe per token cell."""
    logits = probes(features)
    tallies = tuple(name for name in logits if name in TALLY_GROUPS)
    targets = {
        **patch_targets(scenes, torch.arange(len(scenes)), edges, tallies),
        **cell_position_targets(len(scenes), label_grid_side(scenes)),
    }
    foreground = scenes.patch_objects != BACKGROUND
    correct = {name: logits[name].argmax(-1) == targets[name] for name in logits}
    marked = marked_patches(targets)
    per_cell = [name for name in logits if name != "marker" and name not in (*TALLY_GROUPS, *POSITION_PROBES)]
    accuracy = {name: float(correct[name][foreground].float().mean()) for name in per_cell}
    accuracy.update({name: float(correct[name].float().mean()) for name in POSITION_PROBES if name in logits})
    scored = "marker" in logits and marked.any()
    accuracy["marker_letter"] = float(correct["marker"][marked].float().mean()) if scored else None
    attribute_tallies = [correct[name][foreground] for name in tallies if name != "object_tally"]
    if attribute_tallies:
        accuracy["attribute_tally"] = float(torch.cat(attribute_tallies).float().mean())
    if "object_tally" in logits:
        accuracy["object_tally"] = float(correct["object_tally"].float().mean())
    predicted_background = logits["colour"].argmax(-1) == PATCH_ATTRIBUTES["colour"]
    accuracy["background"] = float((predicted_background == ~foreground).float().mean())
    return accuracy


def check_cell_labels(model: PerceptioForConditionalGeneration, scenes: PatchLabelledScenes) -> None:
    """The scenes must be labelled per token cell: one label per image token."""
    tokens = (scenes.pixel_values.shape[-1] // token_cell_size(model)) ** 2
    if scenes.patch_objects.shape[1] != tokens:
        raise ValueError(
            f"The scenes carry {scenes.patch_objects.shape[1]} labels per image, the model makes {tokens} image "
            f"tokens: render them with patch_size={token_cell_size(model)} (the token cell size)."
        )


def check_projector_width(
    model: PerceptioForConditionalGeneration, with_markers: bool, tallies: tuple[str, ...], grid_side: int = 0
) -> None:
    """The projector's hidden channels must hold one channel per probe class."""
    channels = model.model.multi_modal_projector.linear_1.out_features
    num_classes = sum(probe_class_counts(with_markers, tallies, grid_side).values())
    if num_classes > channels:
        raise ValueError(
            f"The projector has {channels} hidden channels, fewer than the {num_classes} probe classes it must hold."
        )


def write_probes_into_projector(model: PerceptioForConditionalGeneration, probes: TokenProbes, seed: int) -> None:
    """Load `probes` into the model's projector and set its activation to the sigmoid (see the module docstring)."""
    projector = model.model.multi_modal_projector
    weights = torch.cat([head.weight for head in probes.heads.values()])
    biases = torch.cat([head.bias for head in probes.heads.values()])
    num_classes, text_hidden_size = len(weights), projector.linear_2.out_features
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(num_classes, text_hidden_size, generator=generator) * CLASS_EMBEDDING_STD
    with torch.no_grad():
        projector.layer_norm.load_state_dict(probes.layer_norm.state_dict())
        projector.linear_1.weight[:num_classes] = weights.to(projector.linear_1.weight)
        projector.linear_1.bias[:num_classes] = biases.to(projector.linear_1.bias)
        projector.linear_2.weight.zero_()
        projector.linear_2.bias.zero_()
        projector.linear_2.weight[:, :num_classes] = embeddings.T.to(projector.linear_2.weight)
    projector.act = ACT2FN[PROBE_ACTIVATION]
    model.config.projector_hidden_act = PROBE_ACTIVATION


def one_vs_rest_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every probe's classes as independent logistic classifiers (summed over classes, averaged over cells), so the
    sigmoid of each logit is that class's probability."""
    return sum(
        nn.functional.binary_cross_entropy_with_logits(
            value, nn.functional.one_hot(targets[name], value.shape[-1]).to(value.dtype), reduction="none"
        )
        .sum(-1)
        .mean()
        for name, value in logits.items()
    )


def fit_projector_from_probes(
    model: PerceptioForConditionalGeneration,
    train_scenes: PatchLabelledScenes,
    eval_scenes: PatchLabelledScenes,
    steps: int = 600,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    logging_steps: int = 50,
    tallies: tuple[str, ...] = (),
    positions: bool = False,
) -> ProjectorProbeResult:
    """Fit token-cell probes on the frozen vision tower and write them into the projector (whose activation becomes
    the sigmoid).

    The scenes must be labelled per token cell (`render_patch_labelled_scenes` with the model's `token_cell_size`).
    A letter probe is fitted when the training scenes have marked points, the tally probes named in `tallies`, and
    with `positions` the probes of each cell's row and column. The vision tower is not changed.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("logging_steps", logging_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}.")
    if not isinstance(positions, bool):
        raise ValueError(f"positions must be True or False, got {positions!r}.")
    tallies = checked_tallies(tallies)
    with_markers = has_marked_points(train_scenes)
    check_cell_labels(model, train_scenes)
    check_cell_labels(model, eval_scenes)
    grid_side = label_grid_side(train_scenes) if positions else 0
    check_projector_width(model, with_markers, tallies, grid_side)
    torch.manual_seed(seed)
    train_features = scene_token_features(model, train_scenes)
    eval_features = scene_token_features(model, eval_scenes)
    edges = depth_bin_edges(train_scenes)
    probes = TokenProbes(train_features.shape[-1], with_markers, tallies, grid_side)
    optimizer = torch.optim.Adam(probes.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    position_targets = cell_position_targets(batch_size, grid_side) if positions else {}

    def step_loss() -> torch.Tensor:
        indices = torch.randint(len(train_scenes), (batch_size,), generator=generator)
        targets = {**patch_targets(train_scenes, indices, edges, tallies), **position_targets}
        return one_vs_rest_loss(probes(train_features[indices]), targets)

    log = run_pretraining_steps(step_loss, optimizer, steps, logging_steps, "Fitting the projector's probes")
    accuracy = token_probe_accuracy(probes, eval_features, eval_scenes, edges)
    write_probes_into_projector(model, probes, seed)
    return ProjectorProbeResult(log=log, **accuracy)
