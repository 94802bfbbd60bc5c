"""bench/ablation_table.py: which arms share the stages before the main stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import bench_script

from perceptio.trainers.synthetic_recipe import ABLATIONS
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe


@pytest.fixture(scope="module")
def bench():
    yield from bench_script("ablation_table")


def test_arms_share_one_folder_unless_their_ablation_changes_the_reading_rows(bench):
    output = Path("runs/ablations")
    default = SyntheticTinyRecipe()
    assert {bench.shared_stages_folder(output, default, arm) for arm in ABLATIONS} == {output / "shared-stages"}
    with_referring = SyntheticTinyRecipe(reading_tasks=("vqa_colour", "referring"))
    folders = {arm: bench.shared_stages_folder(output, with_referring, arm) for arm in ABLATIONS}
    assert folders["no-seg"] == output / "shared-stages-no-seg"
    assert folders["no-seg-attribute-loss"] == output / "shared-stages-no-seg-attribute-loss"
    assert {folders[arm] for arm in ("full", "no-depth-tokens", "depth-lm-only")} == {output / "shared-stages"}


def test_arms_after_the_first_link_to_its_dataset_cache_instead_of_copying_it(bench, tmp_path):
    first = tmp_path / "full" / "dataset_cache"
    first.mkdir(parents=True)
    (first / "scenes.arrow").write_text("rendered")
    bench.share_rendered_dataset(tmp_path, tmp_path / "no-seg")
    bench.share_rendered_dataset(tmp_path, tmp_path / "depth-lm-only")
    for arm in ("no-seg", "depth-lm-only"):
        cache = tmp_path / arm / "dataset_cache"
        assert cache.is_symlink() and cache.resolve() == first.resolve()
    assert (tmp_path / "depth-lm-only" / "dataset_cache" / "scenes.arrow").read_text() == "rendered"
    bench.share_rendered_dataset(tmp_path, tmp_path / "full")
    assert not first.is_symlink(), "an arm's own cache stays as it is"
