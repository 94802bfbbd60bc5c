"""The synthetic-tiny recipe's stages before its main stage, saved once and shared by runs that differ after it.

No ablation acts before the main stage (the reading stage's rows carry no depth blocks and, unless `reading_tasks`
holds referring, no `[SEG]`), so the ablation arms of one recipe and seed train the same depth tokenizer, vision
tower, projector, SAM2 and reading stage, to the last bit. A shared-stages folder keeps what those stages leave after
the first run that computes them: the model (with the recipe's processor, so it can be evaluated as it stands before
the main stage), which of its weights are frozen, the grounding stage's attribute prompts
(the targets of `loss_seg_prompt`), the stages' reports and timings, and the recipe and reading-stage ablation they
were trained with. A later run with the same reading-stage ablation and the same settings for those stages (its
main stage's steps and rates may differ, `MAIN_STAGE_FIELDS`) starts its main stage from there,
about 40 minutes sooner on two CPU cores (of the recipe's 65 to 90). The run that saves the folder goes on from the
saved copy too, so every run that shares it computes the same weights, whichever run saved it. A run without the
folder goes on from the model in memory instead, and SAM2's kernels round by where their tensors lie in memory, so
its weights can part from those of the folder's runs in the last bits (in a few-step test, from the mask-decoder
stage on).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ..models.perceptio import PerceptioForConditionalGeneration, PerceptioProcessor
from .grounding_pretraining import AttributePromptEmbedding
from .synthetic_recipe_settings import MAIN_STAGE_FIELDS, SyntheticTinyRecipe


STAGES_FILE = "stages.json"
PROMPT_EMBEDDING_FILE = "prompt_embedding.safetensors"
MODEL_FOLDER = "model"


@dataclass
class PreMainStages:
    """What the stages before the main stage leave: the model (frozen weights frozen), the grounding stage's
    attribute prompts, the stages' JSON reports (keyed as in `recipe_summary.json`) and their timings in seconds."""

    model: PerceptioForConditionalGeneration
    prompt_embedding: AttributePromptEmbedding
    reports: dict[str, Any]
    timings: dict[str, float]


def save_pre_main_stages(
    folder: str | Path,
    recipe: SyntheticTinyRecipe,
    reading_ablation: str,
    stages: PreMainStages,
    processor: PerceptioProcessor,
) -> None:
    """Write `stages` to `folder` (new or empty), complete or not at all: an interrupted save leaves no folder a later
    run would take for finished. The model is saved with `processor`, so `perceptio eval` can score it as it stands
    before the main stage."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    stages.model.save_pretrained(partial / MODEL_FOLDER)
    processor.save_pretrained(partial / MODEL_FOLDER)
    prompt_weights = {
        name: tensor.detach().cpu().contiguous() for name, tensor in stages.prompt_embedding.state_dict().items()
    }
    save_file(prompt_weights, partial / PROMPT_EMBEDDING_FILE)
    record = {
        "recipe": asdict(recipe),
        "reading_ablation": reading_ablation,
        "frozen": [name for name, parameter in stages.model.named_parameters() if not parameter.requires_grad],
        "reports": stages.reports,
        "timings": stages.timings,
    }
    (partial / STAGES_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
    if folder.is_dir():
        folder.rmdir()
    partial.rename(folder)


def load_pre_main_stages(
    folder: str | Path, recipe: SyntheticTinyRecipe, reading_ablation: str
) -> PreMainStages | None:
    """The stages saved in `folder`, or None when it holds none yet; a `ValueError` naming the settings that differ
    when they were trained with another recipe or reading-stage ablation."""
    folder = Path(folder)
    if not (folder / STAGES_FILE).is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(
                f"{folder} holds files but no saved stages ({STAGES_FILE}); give a new or empty shared-stages folder."
            )
        return None
    record = json.loads((folder / STAGES_FILE).read_text(encoding="utf-8"))
    check_same_training(folder, record, recipe, reading_ablation)
    model = PerceptioForConditionalGeneration.from_pretrained(folder / MODEL_FOLDER)
    frozen = set(record["frozen"])
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    prompt_weights = load_file(folder / PROMPT_EMBEDDING_FILE)
    prompt_embedding = AttributePromptEmbedding(prompt_weights["tables.0.weight"].shape[1])
    prompt_embedding.load_state_dict(prompt_weights)
    return PreMainStages(model, prompt_embedding, record["reports"], record["timings"])


def pre_main_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe settings (as `asdict` gives them, or as a shared-stages folder saved them) that the stages before
    the main stage read: all but `MAIN_STAGE_FIELDS`, with `reading_learning_rate` resolved to the reading stage's
    rate, so a run that sets it to the saved run's `learning_rate` can change `learning_rate` and share the stages."""
    # A JSON round trip turns tuples into lists, so both sides are compared as JSON.
    settings = json.loads(json.dumps(settings))
    reading_rate = settings.get("reading_learning_rate")
    settings["reading_learning_rate"] = settings["learning_rate"] if reading_rate is None else reading_rate
    return {name: value for name, value in settings.items() if name not in MAIN_STAGE_FIELDS}


def check_same_training(
    folder: Path, record: dict[str, Any], recipe: SyntheticTinyRecipe, reading_ablation: str
) -> None:
    """A `ValueError` unless `record` was trained with `recipe`'s settings for the stages before the main stage and
    with `reading_ablation`."""
    wanted = pre_main_settings(asdict(recipe))
    saved = pre_main_settings(record["recipe"])
    differing = sorted(name for name in wanted.keys() | saved.keys() if wanted.get(name) != saved.get(name))
    if differing:
        named = [
            f"{name} (learning_rate where it is unset)" if name == "reading_learning_rate" else name
            for name in differing
        ]
        raise ValueError(
            f"{folder} holds stages trained with other recipe settings ({', '.join(named)} differ; only "
            f"{', '.join(MAIN_STAGE_FIELDS)} may); give each recipe its own shared-stages folder."
        )
    if record["reading_ablation"] != reading_ablation:
        raise ValueError(
            f"{folder} holds a reading stage trained under the {record['reading_ablation']!r} ablation, this run's "
            f"is {reading_ablation!r}; give it its own shared-stages folder."
        )
