"""Model cards for Perceptio checkpoints: YAML metadata for the Hub plus usage, token format, recipe and limits.

The card is rendered from `model_card_template.md` with `huggingface_hub.ModelCard`. Its metadata says
`library_name: transformers`, `pipeline_tag: image-text-to-text`, the base models, licence, tags and datasets, and a
`model-index` built from evaluation summaries when given.

Evaluation summaries (what `perceptio eval TASK` writes; one JSON object, or a list of them)::

    {"task": "refcoco", "split": "val", "metrics": {"cIoU": 82.7, "gIoU": 80.1}}

`task` is one of `EVALUATION_TASKS`; `metrics` maps metric names to numbers; `split` is optional.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..models.perceptio import PerceptioConfig


CARD_FILE = "README.md"
TEMPLATE_FILE = "model_card_template.md"
DEFAULT_TAGS = ("perceptio", "vision-language", "referring-segmentation", "depth-estimation", "internvl", "sam2")
# A segmentation-only checkpoint (no depth tokenizer) does not estimate depth.
DEPTH_TAGS = ("depth-estimation",)
# Task of `perceptio eval` -> (Hub task type, dataset id, dataset display name).
EVALUATION_TASKS = {
    "refcoco": ("image-segmentation", "lmms-lab/RefCOCO", "RefCOCO"),
    "refcoco+": ("image-segmentation", "lmms-lab/RefCOCOplus", "RefCOCO+"),
    "refcocog": ("image-segmentation", "lmms-lab/RefCOCOg", "RefCOCOg"),
    "blink-depth": ("visual-question-answering", "BLINK-Benchmark/BLINK", "BLINK Relative Depth"),
    "hardblink": ("visual-question-answering", "hardblink", "HardBLINK"),
    "synthetic": ("visual-question-answering", "perceptio-synthetic", "Perceptio synthetic scenes"),
}
DEFAULT_TRAINING_RECIPE = (
    "Sa2VA's recipe: PEFT LoRA on the language model (r = 128, α = 256) with "
    "the SAM2 mask decoder, `text_hidden_fcs` and the spatial-token embedding rows trained in full; vision tower, SAM2 "
    "image encoder and depth tokenizer frozen; AdamW, learning rate 4e-5, cosine schedule, warm-up 5%, bf16. Loss: "
    "next-token cross-entropy + mask BCE (×2.0) and Dice (×0.5) + depth-marker, restricted-softmax code, code-count "
    "and soft-merged depth-reconstruction terms (each ×1.0). Train with `perceptio train` (a transformers Trainer: "
    "`accelerate launch`, DeepSpeed and FSDP work as usual)."
)
SEGMENTATION_ONLY_TRAINING_RECIPE = (
    "Sa2VA's recipe: PEFT LoRA on the language model (r = 128, α = 256) with the SAM2 mask decoder, "
    "`text_hidden_fcs` and the `[SEG]` embedding row trained in full; vision tower and SAM2 image encoder frozen; "
    "AdamW, learning rate 4e-5, cosine schedule, warm-up 5%, bf16. Loss: next-token cross-entropy + mask BCE (×2.0) "
    "and Dice (×0.5). Train with `perceptio train` (a transformers Trainer)."
)
# Where a checkpoint's parts come from, which decides what the card says is newly initialised.
SOURCE_KINDS = ("parts", "sa2va")


@dataclass
class PerceptioCardData:
    """What the card says beyond what the checkpoint's config already tells.

    Attributes:
        model_name: the card's title.
        model_id: the Hub id (or folder) the usage code loads; `None` uses `model_name`.
        license: SPDX-style licence id of the weights (the base models' licences also apply).
        base_models: Hub ids of the parts the checkpoint was built from.
        datasets: Hub ids of its training data.
        tags: extra tags (the Perceptio tags are always added).
        evaluation: evaluation summaries (see the module docstring); fills `model-index` and a results table.
        fine_tuned: whether the checkpoint has been trained after `perceptio build` (else the card warns).
        training_recipe: the recipe paragraph; `None` picks the default of the checkpoint's kind (with or without
            depth tokens).
        source_kind: "parts" for a checkpoint assembled from InternVL, SAM2 and a depth tokenizer (its
            `text_hidden_fcs` is new), "sa2va" for one converted from Sa2VA (its `[SEG]` path is Sa2VA's).
        max_new_tokens: token budget in the usage example.
        base_source, sam2_source, depth_tokenizer_source: what the build used (for the "Built from" table).
    """

    model_name: str = "Perceptio"
    model_id: str | None = None
    license: str = "apache-2.0"
    base_models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    fine_tuned: bool = False
    training_recipe: str | None = None
    source_kind: str = "parts"
    max_new_tokens: int = 64
    base_source: str = "unknown"
    sam2_source: str = "unknown"
    depth_tokenizer_source: str = "unknown"

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ValueError(f"model_name must be a non-empty string, got {self.model_name!r}.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        for name in ("base_models", "datasets", "tags"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not all(isinstance(value, str) and value for value in values):
                raise ValueError(f"{name} must be a list of non-empty strings, got {values!r}.")
        if self.source_kind not in SOURCE_KINDS:
            raise ValueError(f"source_kind must be one of {SOURCE_KINDS}, got {self.source_kind!r}.")
        self.evaluation = [check_evaluation_summary(summary) for summary in self.evaluation]

    def with_build_sources(self, base: str, sam2: str, depth_tokenizer: str | None) -> PerceptioCardData:
        """A copy that records the build's parts (and lists the Hub ids among them as base models); a
        segmentation-only checkpoint has no `depth_tokenizer`."""
        hub_ids = [source for source in (base, sam2, depth_tokenizer) if source and _looks_like_hub_id(source)]
        return replace(
            self,
            base_source=base,
            sam2_source=sam2,
            depth_tokenizer_source=depth_tokenizer or "none",
            base_models=list(dict.fromkeys([*self.base_models, *hub_ids])),
        )


def _looks_like_hub_id(source: str) -> bool:
    # `org/name` that is not an existing local path; local folders are not valid `base_model` entries.
    return source.count("/") == 1 and not Path(source).exists() and not source.startswith((".", "/"))


def check_evaluation_summary(summary: Any) -> dict[str, Any]:
    """Validate one evaluation summary; a `ValueError` says what is wrong and what is accepted."""
    if not isinstance(summary, dict):
        raise ValueError(f"An evaluation summary must be a JSON object, got {type(summary).__name__}.")
    task = summary.get("task")
    if task not in EVALUATION_TASKS:
        raise ValueError(f"Evaluation summary task must be one of {sorted(EVALUATION_TASKS)}, got {task!r}.")
    metrics = summary.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"Evaluation summary of {task!r} needs a non-empty 'metrics' object (name -> number).")
    bad = {
        name: value
        for name, value in metrics.items()
        if isinstance(value, bool) or not isinstance(value, (int, float))
    }
    if bad:
        raise ValueError(f"Evaluation metrics of {task!r} must be numbers; got {bad}.")
    split = summary.get("split")
    if split is not None and not isinstance(split, str):
        raise ValueError(f"Evaluation summary split must be a string, got {split!r}.")
    return {"task": task, "split": split, "metrics": dict(metrics)}


def load_evaluation_summaries(path: str | Path) -> list[dict[str, Any]]:
    """Read an evaluation JSON (one summary object or a list of them) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Evaluation JSON {path} does not exist.")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    summaries = content if isinstance(content, list) else [content]
    return [check_evaluation_summary(summary) for summary in summaries]


def evaluation_results(summaries: list[dict[str, Any]]) -> list[EvalResult]:
    """`model-index` entries: one `EvalResult` per metric of each summary."""
    results = []
    for summary in summaries:
        task_type, dataset_type, dataset_name = EVALUATION_TASKS[summary["task"]]
        for metric, value in summary["metrics"].items():
            results.append(
                EvalResult(
                    task_type=task_type,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=summary["split"],
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=value,
                )
            )
    return results


def results_table(summaries: list[dict[str, Any]]) -> str:
    """A Markdown table of the evaluation summaries (empty string without any)."""
    if not summaries:
        return ""
    rows = ["| benchmark | split | metric | value |", "| --- | --- | --- | --- |"]
    for summary in summaries:
        name = EVALUATION_TASKS[summary["task"]][2]
        for metric, value in summary["metrics"].items():
            rows.append(f"| {name} | {summary['split'] or '-'} | {metric} | {value:g} |")
    return "\n".join(rows)


def build_model_card(config, card_data: PerceptioCardData) -> ModelCard:
    """The `ModelCard` of a Perceptio checkpoint whose `PerceptioConfig` is `config`.

    A segmentation-only checkpoint (no depth tokenizer) gets a card without depth tokens, depth tags or depth losses.
    """
    has_depth = config.has_depth_tokenizer
    tags = [tag for tag in DEFAULT_TAGS if has_depth or tag not in DEPTH_TAGS]
    default_recipe = DEFAULT_TRAINING_RECIPE if has_depth else SEGMENTATION_ONLY_TRAINING_RECIPE
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=card_data.license,
        base_model=card_data.base_models or None,
        datasets=card_data.datasets or None,
        tags=list(dict.fromkeys([*tags, *card_data.tags])),
        model_name=card_data.model_name,
        eval_results=evaluation_results(card_data.evaluation) or None,
    )
    depth_config = config.depth_tokenizer_config
    template = resources.files("perceptio.hub_cards").joinpath(TEMPLATE_FILE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        metadata,
        template_str=template,
        model_name=card_data.model_name,
        model_id=card_data.model_id or card_data.model_name,
        fine_tuned=card_data.fine_tuned,
        base_source=card_data.base_source,
        sam2_source=card_data.sam2_source,
        depth_tokenizer_source=card_data.depth_tokenizer_source,
        max_new_tokens=card_data.max_new_tokens,
        training_recipe=card_data.training_recipe or default_recipe,
        has_depth=has_depth,
        source_kind=card_data.source_kind,
        results_table=results_table(card_data.evaluation),
        seg_token_id=config.seg_token_id,
        depth_start_token_id=config.depth_start_token_id,
        depth_end_token_id=config.depth_end_token_id,
        depth_code_token_offset=config.depth_code_token_offset,
        num_depth_codes=config.num_depth_codes,
        num_depth_tokens=config.num_depth_tokens,
        depth_grid=depth_config.grid_size if depth_config is not None else "-",
        image_seq_length=config.image_seq_length,
    )


def write_model_card(folder: str | Path, card_data: PerceptioCardData) -> Path:
    """Render the card for the checkpoint in `folder` (reads its config.json) and write `folder/README.md`."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json; write the model card into an exported checkpoint folder.")
    config = PerceptioConfig.from_pretrained(folder)
    card = build_model_card(config, card_data)
    path = folder / CARD_FILE
    card.save(path)
    return path


__all__ = [
    "DEFAULT_TAGS",
    "EVALUATION_TASKS",
    "PerceptioCardData",
    "build_model_card",
    "check_evaluation_summary",
    "load_evaluation_summaries",
    "write_model_card",
]
