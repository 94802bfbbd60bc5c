"""Can the synthetic-tiny recipe's vision tower learn an object's shape when it is told the shape directly?

The recipe's language model never learns shape questions (their loss stays at what naming a shape at random costs),
while it learns colour. This script asks whether the vision tower can learn shape at all on the same data: scenes of
one object, rendered at the recipe's image size and normalised by its processor, each labelled with its object's
shape. Two classifiers train with the same images, steps, batch and optimiser:

- the recipe's vision tower (its InternVL config and initialisation), an MLP on each patch feature, max over patches;
- a three-layer strided CNN with a max-pooled linear head, as a control of what the data allows.

It prints each one's held-out accuracy (with its standard error) beside the majority shape's, and the tower's
accuracy as a ratio of the CNN's.

    python bench/vision_shape_learnability.py
    python bench/vision_shape_learnability.py --scenes 8000 --steps 1500
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from perceptio.data.scene_rendering import SHAPES, render_scene
from perceptio.models.perceptio import PerceptioDepthTokenizer, PerceptioImageProcessor
from perceptio.trainers.synthetic_recipe import build_recipe_model, build_recipe_processor
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe


# Disjoint seed ranges, so no held-out scene is a training scene.
TRAIN_SEED_OFFSET = 1_000_000
TEST_SEED_OFFSET = 2_000_000


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=2000, help="training scenes of one object")
    parser.add_argument("--test-scenes", type=int, default=300, help="held-out scenes of one object")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per classifier")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    arguments = parser.parse_args(argv)
    for name in ("scenes", "test_scenes", "steps", "batch_size", "threads"):
        if getattr(arguments, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(arguments, name)}.")
    if not arguments.learning_rate > 0 or arguments.seed < 0:
        parser.error("--learning-rate must be > 0 and --seed >= 0.")
    return arguments


def render_one_object_scenes(
    count: int, seed_offset: int, image_processor: PerceptioImageProcessor, image_size: int
) -> tuple[torch.Tensor, torch.LongTensor]:
    """`count` one-object scenes as normalised tiles (count, 3, H, W) and their objects' shape ids."""
    pixel_values, shapes = [], []
    for seed in tqdm(range(seed_offset, seed_offset + count), desc="Rendering one-object scenes"):
        scene = render_scene(seed, image_size, num_objects=1)
        pixel_values.append(image_processor(scene.image)["pixel_values"][0])
        shapes.append(SHAPES.index(scene.objects[0].shape))
    return torch.stack(pixel_values), torch.tensor(shapes)


class VisionTowerShapeClassifier(nn.Module):
    """The recipe's vision tower with an MLP on every patch feature, max-pooled over the patches."""

    def __init__(self, recipe: SyntheticTinyRecipe):
        super().__init__()
        processor = build_recipe_processor(recipe)
        model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
        self.tower = model.model.vision_tower
        hidden = recipe.vision_hidden_size
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, len(SHAPES)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:]
        return self.head(patches).amax(1)


class ConvShapeClassifier(nn.Module):
    """Three strided convolutions (stride 8 in all, the tower's patch size) and a max-pooled linear head."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels // 2, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(channels, len(SHAPES))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


def train_and_score(
    classifier: nn.Module,
    train: tuple[torch.Tensor, torch.LongTensor],
    test: tuple[torch.Tensor, torch.LongTensor],
    arguments: argparse.Namespace,
    name: str,
) -> float:
    """Train `classifier` on `train` with AdamW for `arguments.steps` steps; its accuracy on `test`."""
    images, labels = train
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=arguments.learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(arguments.seed)
    classifier.train()
    for _ in tqdm(range(arguments.steps), desc=f"Training the {name}"):
        batch = torch.randint(len(labels), (arguments.batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(classifier(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    classifier.eval()
    with torch.no_grad():
        predictions = torch.cat([classifier(chunk).argmax(-1) for chunk in test[0].split(64)])
    return (predictions == test[1]).float().mean().item()


def standard_error(accuracy: float, count: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / count)


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.threads)
    recipe = SyntheticTinyRecipe(seed=arguments.seed)
    image_processor = build_recipe_processor(recipe).image_processor
    started = time.perf_counter()
    train = render_one_object_scenes(arguments.scenes, TRAIN_SEED_OFFSET, image_processor, recipe.image_size)
    test = render_one_object_scenes(arguments.test_scenes, TEST_SEED_OFFSET, image_processor, recipe.image_size)
    majority = torch.bincount(test[1], minlength=len(SHAPES)).max().item() / len(test[1])
    results = {}
    for name, build in (("vision tower", lambda: VisionTowerShapeClassifier(recipe)), ("CNN", ConvShapeClassifier)):
        torch.manual_seed(arguments.seed)
        results[name] = train_and_score(build(), train, test, arguments, name)
    count = arguments.test_scenes
    print(f"\nShape of the one object, {arguments.scenes} training scenes, {arguments.steps} steps, {count} held out")
    print(f"{'classifier':<14} accuracy")
    for name, accuracy in results.items():
        print(f"{name:<14} {accuracy:.3f} ± {standard_error(accuracy, count):.3f}")
    print(f"{'majority':<14} {majority:.3f}")
    if results["CNN"]:
        print(f"vision tower / CNN: {results['vision tower'] / results['CNN']:.2f}×")
    else:
        print("vision tower / CNN: undefined (the CNN answered no held-out scene right)")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
