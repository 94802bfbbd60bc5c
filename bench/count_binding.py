"""Whether the recipe's language model can learn count questions from perfect image tokens when they are all it
learns: a small batch fitted until it is memorised, then the same fit on more questions, watched on held-out ones.

The reading stage's count answers stay at their image-blind prior even on oracle image tokens
(`reading_stage_vision.py --oracle-tokens --oracle-centres`). This script takes the first step of finding why: the
language model of the count-only oracle arms (the recipe's text settings, the question before the image, oracle
tokens with each object's centre marked, no vision tower) is trained on `--questions` held-in count questions alone,
at a constant learning rate, and every `--eval-every` steps the teacher-forced answer loss and the exact-answer
accuracy are printed on (up to 300 of) those questions and on `--held-out` others, each with the question's own image
and with another question's. A fit whose held-in loss falls only with the own image has learned to use the tokens;
one whose held-out accuracy rises above the other-image accuracy has learned a rule that carries to new scenes.

`--kind` picks the questions: `objects` ("How many objects are there?": counting alone), `attribute` (the questions
that name a colour, shape or size: finding the objects the words name, then counting them) or `all`. With
`--class-words` the oracle's attribute embeddings are the language model's own input embeddings of the attribute
names (each plural starts equal to its singular), so a question's words and the tokens of the objects they name
share vectors, as a pretrained model's aligned image tokens and words roughly do.

    python bench/count_binding.py --output-dir runs/count-binding --kind objects --questions 64 --steps 400
    python bench/count_binding.py --output-dir runs/count-binding --kind attribute --questions 2000 --steps 1500

The figures go to `OUTPUT/KIND-QUESTIONS[-class-words][-headsN][-lrX][-seedN].json` (the settings that differ from
their defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from datasets import Dataset
from reading_stage_vision import (
    EXPLORATION_START,
    QUESTIONS_SEED_OFFSET,
    OracleImageTokens,
    attach_oracle_tokens,
    oracle_label_table,
)
from torch import nn

from perceptio.data.seg_attributes import SEG_ATTRIBUTES
from perceptio.data.synthetic_dataset import build_synthetic_dataset
from perceptio.data.synthetic_tasks import DEFAULT_TASK_CONFIG
from perceptio.models.perceptio import PerceptioDepthTokenizer
from perceptio.models.perceptio.loss_perceptio import per_sample_lm_loss
from perceptio.models.perceptio.processing_perceptio import IGNORE_INDEX
from perceptio.trainers.collator_perceptio import PerceptioDataCollator
from perceptio.trainers.recipe_compute import subnormals_flushed, torch_threads
from perceptio.trainers.synthetic_recipe import build_recipe_model, build_recipe_processor
from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe


KINDS = ("objects", "attribute", "all")
DEFAULT_LEARNING_RATE = 1e-3
# The share of rendered count questions of each kind (about one in five asks for all objects), with a margin, so
# one rendering holds enough of the kind asked for.
RENDERED_PER_QUESTION = {"objects": 5.5, "attribute": 1.35, "all": 1.05}
# Held-in questions scored at each evaluation: enough for a stable figure, few enough not to slow the fit.
HELD_IN_SCORED = 300
EVALUATION_BATCH_SIZE = 64
# The count-only oracle arms' settings: one thread, oracle tokens in place of a tower, the question first.
ORACLE_SETTINGS = {**EXPLORATION_START, "num_threads": 1, "question_before_image": True}


@dataclass
class AnswerScores:
    """Teacher-forced answer loss (per answer token, averaged over questions) and exact-answer accuracy."""

    loss: float
    accuracy: float


@dataclass
class Evaluation:
    """One evaluation during the fit: held-in and held-out scores with each question's own and another's image."""

    step: int
    seconds: float
    held_in_own: AnswerScores
    held_in_other: AnswerScores
    held_out_own: AnswerScores
    held_out_other: AnswerScores


class ClassWordTokens(nn.Module):
    """Oracle image tokens whose attribute embeddings are the language model's input embeddings of the attribute
    names (shared, so both train together), with `OracleImageTokens`'s background and centre embeddings."""

    def __init__(self, oracle: OracleImageTokens, embeddings: nn.Embedding, word_ids: list[torch.Tensor]):
        super().__init__()
        self.oracle = oracle
        self.embeddings = embeddings
        self.word_ids = word_ids

    def forward(self, cover: torch.Tensor, attributes: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        objects = sum(self.embeddings.weight[ids[attributes[:, index]]] for index, ids in enumerate(self.word_ids))
        tokens = cover[:, :-1] @ objects + cover[:, -1:] * self.oracle.background
        return tokens + centres @ (objects + self.oracle.centre)


def single_token_id(tokenizer, word: str) -> int | None:
    """The id of `word` (after a space) when the tokenizer keeps it whole, else None."""
    pieces = tokenizer.tokenize(" " + word)
    return tokenizer.convert_tokens_to_ids(pieces)[0] if len(pieces) == 1 else None


def class_word_ids(tokenizer, embeddings: nn.Embedding) -> list[torch.Tensor]:
    """Each attribute's class names as token ids, one tensor per attribute in `SEG_ATTRIBUTES` order; each plural
    kept whole by the tokenizer ("cubes") starts with its singular's embedding."""
    word_ids = []
    for values in SEG_ATTRIBUTES.values():
        ids = [single_token_id(tokenizer, value) for value in values]
        missing = [value for value, index in zip(values, ids) if index is None]
        if missing:
            raise ValueError(f"The tokenizer splits the attribute names {missing}: --class-words needs whole words.")
        with torch.no_grad():
            for value, index in zip(values, ids):
                plural = single_token_id(tokenizer, value + "s")
                if plural is not None:
                    embeddings.weight[plural] = embeddings.weight[index]
        word_ids.append(torch.tensor(ids))
    return word_ids


def asks_for_all_objects(meta: str) -> bool:
    """Whether a count question names no attribute ("How many objects are there?")."""
    return all(value is None for value in json.loads(meta)["query"].values())


def count_questions(output_dir: Path, recipe: SyntheticTinyRecipe, kind: str, total: int) -> Dataset:
    """`total` rendered count questions of `kind`, without depth blocks, drawn apart from the recipe's splits."""
    rendered = build_synthetic_dataset(
        int(total * RENDERED_PER_QUESTION[kind]),
        0,
        0,
        image_size=recipe.image_size,
        seed=recipe.seed + QUESTIONS_SEED_OFFSET,
        tasks={"vqa_count": 1.0},
        task_config=replace(DEFAULT_TASK_CONFIG, depth_block_share=0.0),
        cache_dir=str(output_dir / "dataset_cache"),
    )["train"]
    if kind != "all":
        wanted = kind == "objects"
        rendered = rendered.filter(lambda meta: asks_for_all_objects(meta) == wanted, input_columns="meta")
    if len(rendered) < total:
        raise ValueError(f"Only {len(rendered)} {kind} questions were rendered, {total} are needed.")
    return rendered.select(range(total))


def evaluation_batches(count: int) -> list[range]:
    """Consecutive batches of `EVALUATION_BATCH_SIZE` rows; a last batch of one row joins the one before, so every
    row has another in its batch whose image it can take."""
    starts = list(range(0, count, EVALUATION_BATCH_SIZE))
    if len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()
    return [range(start, end) for start, end in zip(starts, [*starts[1:], count])]


def answer_scores(model, collator, rows: Dataset, other_image: bool) -> AnswerScores:
    """Answer loss and exact-answer accuracy on `rows`, each with its own image or (`other_image`) the image of the
    row before it in its batch (the first row takes the last one's)."""
    losses, right = [], []
    model.eval()
    with torch.no_grad():
        for indices in evaluation_batches(len(rows)):
            batch = collator([rows[index] for index in indices])
            pixel_values = batch["pixel_values"].roll(1, 0) if other_image else batch["pixel_values"]
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixel_values
            ).logits
            losses += per_sample_lm_loss(logits, batch["labels"])[0].tolist()
            labels = batch["labels"][:, 1:]
            answer = labels != IGNORE_INDEX
            right += ((logits[:, :-1].argmax(-1) == labels) | ~answer).all(1).tolist()
    model.train()
    return AnswerScores(loss=sum(losses) / len(losses), accuracy=sum(right) / len(right))


def fit(arguments: argparse.Namespace) -> list[Evaluation]:
    """Train the oracle arm's language model on the held-in questions; the evaluations along the way."""
    recipe = SyntheticTinyRecipe(
        seed=arguments.seed, text_num_attention_heads=arguments.text_num_attention_heads, **ORACLE_SETTINGS
    )
    with subnormals_flushed(), torch_threads(recipe.num_threads):
        rows = count_questions(arguments.output_dir, recipe, arguments.kind, arguments.questions + arguments.held_out)
        held_in = rows.select(range(arguments.questions))
        held_out = rows.select(range(arguments.questions, len(rows)))
        scored_in = held_in.select(range(min(HELD_IN_SCORED, len(held_in))))
        processor = build_recipe_processor(recipe)
        model = build_recipe_model(recipe, processor, PerceptioDepthTokenizer(recipe.depth_tokenizer_config()))
        torch.manual_seed(arguments.seed)
        tokens = OracleImageTokens(model.config.text_config.hidden_size, centres=True)
        if arguments.class_words:
            embeddings = model.get_input_embeddings()
            tokens = ClassWordTokens(tokens, embeddings, class_word_ids(processor.tokenizer, embeddings))
        attach_oracle_tokens(model, tokens, oracle_label_table(processor, recipe, [(held_in, None), (held_out, None)]))
        collator = PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer)
        optimizer = torch.optim.AdamW(
            [weight for weight in model.parameters() if weight.requires_grad], lr=arguments.learning_rate
        )
        generator = torch.Generator().manual_seed(arguments.seed)
        started, evaluations = time.monotonic(), []
        for step in range(arguments.steps + 1):
            if step % arguments.eval_every == 0 or step == arguments.steps:
                evaluations.append(
                    Evaluation(
                        step,
                        round(time.monotonic() - started),
                        *(
                            answer_scores(model, collator, split, other)
                            for split in (scored_in, held_out)
                            for other in (False, True)
                        ),
                    )
                )
                print_evaluation(evaluations[-1])
            if step == arguments.steps:
                break
            indices = torch.randperm(len(held_in), generator=generator)[: arguments.batch_size].tolist()
            batch = collator([held_in[index] for index in indices])
            loss = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                labels=batch["labels"],
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return evaluations


def print_evaluation(evaluation: Evaluation) -> None:
    """One line: the step, then held-in and held-out loss and accuracy, own / another image."""
    cells = [f"step {evaluation.step:5d}"]
    for name, own, other in (
        ("held-in", evaluation.held_in_own, evaluation.held_in_other),
        ("held-out", evaluation.held_out_own, evaluation.held_out_other),
    ):
        cells.append(
            f"{name} loss {own.loss:.3f} / {other.loss:.3f}, accuracy {own.accuracy:.3f} / {other.accuracy:.3f}"
        )
    print(" | ".join([*cells, f"{evaluation.seconds} s"]), flush=True)


def positive(text: str) -> int:
    """A positive integer, for argparse."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True, help="the rendered questions and the figures")
    parser.add_argument("--kind", choices=KINDS, default="attribute", help="which count questions (see above)")
    parser.add_argument("--questions", type=positive, default=64, help="held-in questions the model is fitted on")
    parser.add_argument("--held-out", type=positive, default=300, help="held-out questions scored")
    parser.add_argument("--steps", type=positive, default=400)
    parser.add_argument("--batch-size", type=positive, default=16)
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_LEARNING_RATE, help="AdamW's, constant")
    parser.add_argument("--eval-every", type=positive, help="steps between evaluations (default: an eighth of them)")
    parser.add_argument(
        "--class-words",
        action="store_true",
        help="the oracle's attribute embeddings are the language model's embeddings of the attribute names",
    )
    parser.add_argument(
        "--text-num-attention-heads",
        type=positive,
        help="the language model's attention heads (default: the recipe's); must divide its width",
    )
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    if not arguments.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0, got {arguments.learning_rate}.")
    for name in ("questions", "held_out"):
        if getattr(arguments, name) < 2:
            parser.error(f"--{name.replace('_', '-')} must be at least 2 (each is scored with another's image).")
    if arguments.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {arguments.seed}.")
    arguments.eval_every = arguments.eval_every or max(1, arguments.steps // 8)
    return arguments


def figures_name(arguments: argparse.Namespace) -> str:
    """The figures' file name: the kind and question count, then each setting that differs from its default, so
    fits with other settings do not overwrite each other."""
    parts = [arguments.kind, str(arguments.questions)]
    if arguments.class_words:
        parts.append("class-words")
    if arguments.text_num_attention_heads is not None:
        parts.append(f"heads{arguments.text_num_attention_heads}")
    if arguments.learning_rate != DEFAULT_LEARNING_RATE:
        parts.append(f"lr{arguments.learning_rate:g}")
    if arguments.seed != 0:
        parts.append(f"seed{arguments.seed}")
    return "-".join(parts)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        evaluations = fit(arguments)
    except ValueError as error:
        print(f"count_binding.py: {error}", file=sys.stderr)
        return 1
    name = f"{figures_name(arguments)}.json"
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(arguments).items()}
    figures = {"settings": settings, "evaluations": [asdict(evaluation) for evaluation in evaluations]}
    (arguments.output_dir / name).write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
