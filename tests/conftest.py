"""Shared fixtures: a tiny Perceptio (random weights, real tokenizer, real SAM2) built once per session; and the
loading of a bench/ script as a module."""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from perceptio.data.seg_attributes import add_seg_attribute_column
from perceptio.data.synthetic_dataset import build_synthetic_dataset
from perceptio.tiny_models import build_tiny_perceptio


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def bench_script(name: str) -> Iterator[ModuleType]:
    """Yield bench/`name`.py loaded as a module the way running it from bench/ loads it (its imports of sibling
    scripts resolve), for a fixture to `yield from`; afterwards bench/ leaves the path and every bench/ module loaded
    meanwhile leaves `sys.modules`."""
    sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH_DIR))
        for loaded, value in list(sys.modules.items()):
            if Path(getattr(value, "__file__", None) or "").parent == BENCH_DIR:
                del sys.modules[loaded]


@pytest.fixture(scope="session")
def tiny_pair():
    """(model, processor) shared read-only across the session; copy before mutating."""
    return build_tiny_perceptio(seed=0)


@pytest.fixture()
def tiny_model(tiny_pair):
    """A private copy of the tiny model, safe to train or modify."""
    return copy.deepcopy(tiny_pair[0])


def with_attribute_heads(model, classes: list[int], loss_weight: float = 1.0):
    """A new model with `model`'s weights plus freshly initialised `[SEG]` attribute heads of `classes`."""
    config = copy.deepcopy(model.config)
    config.seg_attribute_classes = classes
    config.seg_attribute_loss_weight = loss_weight
    with_heads = type(model)(config)
    missing, unexpected = with_heads.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("seg_attribute_heads.") for name in missing)
    return with_heads


@pytest.fixture()
def tiny_attribute_model(tiny_model):
    """The tiny model plus `[SEG]` attribute heads for two attributes of 4 and 3 classes (`loss_seg_attribute`
    weighted 0.5)."""
    return with_attribute_heads(tiny_model, [4, 3], loss_weight=0.5)


@pytest.fixture(scope="session")
def labelled_rows(tmp_path_factory):
    """48 synthetic training rows, referring and colour questions, with their `seg_attributes` column."""
    dataset = build_synthetic_dataset(
        48,
        0,
        0,
        image_size=32,
        seed=5,
        tasks={"referring": 1.0, "vqa_colour": 0.3},
        cache_dir=str(tmp_path_factory.mktemp("labelled-rows")),
    )["train"]
    return add_seg_attribute_column(dataset)


@pytest.fixture()
def tiny_processor(tiny_pair):
    return tiny_pair[1]


@pytest.fixture()
def rgb_image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(48, 72, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def single_torch_thread():
    """Run a module on one torch thread: tiny models are far faster so than on cores shared with other runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def biased_checkpoint(tiny_pair, tmp_path_factory):
    """A tiny checkpoint whose generation config biases it to write one [SEG] and then a depth block."""
    model, processor = copy.deepcopy(tiny_pair[0]), tiny_pair[1]
    config = model.config
    seg, start = config.seg_token_id, config.depth_start_token_id
    model.generation_config.sequence_bias = [[[seg], 100.0], [[seg, seg], -200.0], [[start], 50.0]]
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
