"""Whether a checkpoint's language model can learn to answer relative-depth questions from its image tokens when that
is all it has to learn: its layers and head trained on the answer's letter alone, everything before them fixed.

`relative_depth_readout.py` shows one attention layer finding the answer in the image tokens. This script asks the
same of the language model itself, under the easiest conditions the sequence allows: each question goes in as
training feeds it (the question, its image tokens, the depth block of its own depth map, the answer), its input
embeddings (the image tokens and every text token's embedding) are computed once and kept fixed, and only the
language model's layers and its head are trained, for `--steps` steps of `--batch-size` questions, on the
cross-entropy of the answer's letter among the question's letters. Every `--eval-every` steps it prints the held-out
accuracy with each question's own image tokens and with another question's. With `--fresh` the language model and
its head start from random weights of the same configuration, so what the checkpoint learned before cannot be what
holds it back. With `--two-point-steps N` the first N steps train on the held-in questions of two points alone.

Each `--models` folder is a saved Perceptio checkpoint; the first is the base, and the others' final figures are
printed as a ratio of its.

    python bench/relative_depth_language_model.py --models perceptio/assets/perceptio-tiny-synthetic runs/marked/model
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from marker_probe import refuse_non_checkpoints, refuse_non_positive, render_questions
from relative_depth_layers import answer_positions, letter_token_ids
from relative_depth_readout import question_labels
from torch import nn

from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.data.synthetic_tasks import POINT_LETTERS
from perceptio.trainers.collator_perceptio import PerceptioDataCollator


EMBEDDING_BATCH_SIZE = 32
EVALUATION_BATCH_SIZE = 100
WEIGHT_DECAY = 0.01


@dataclass
class QuestionSequences:
    """Per question, its fixed input embeddings (tokens, hidden), which of them are image tokens, the position that
    predicts the answer's letter, the letter's index and the question's point count; and each letter's token id."""

    embeddings: list[torch.Tensor]
    image_tokens: list[torch.Tensor]
    answer_positions: torch.Tensor
    answers: torch.Tensor
    num_points: torch.Tensor
    letter_ids: torch.Tensor


@dataclass
class Evaluation:
    """Held-out accuracy after `step` training steps, with each question's own image tokens and with another's."""

    step: int
    train_loss: float
    own: float
    other: float


def add_letter_training_options(parser: argparse.ArgumentParser, questions: str) -> None:
    """The options of a run that trains on relative-depth letters (`questions` names what is trained on)."""
    parser.add_argument("--train-questions", type=int, default=4500, help=f"{questions} trained on")
    parser.add_argument("--test-questions", type=int, default=500, help=f"held-out {questions}")
    parser.add_argument("--steps", type=int, default=1500, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per step")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW's constant learning rate")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations")
    parser.add_argument(
        "--two-point-steps", type=int, default=0, help="train first this many steps on questions of two points alone"
    )


def check_letter_training_options(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> None:
    """Exit through `parser` naming the first option of `add_letter_training_options` out of its range."""
    refuse_non_positive(parser, arguments, ["train_questions", "steps", "batch_size", "eval_every"])
    if arguments.two_point_steps < 0:
        parser.error(f"--two-point-steps must be 0 or more, got {arguments.two_point_steps}.")
    if not arguments.learning_rate > 0:
        parser.error(f"--learning-rate must be positive, got {arguments.learning_rate}.")
    if arguments.test_questions < 2:
        parser.error("--test-questions must be at least 2 (each is also asked with another's image tokens).")


def two_point_start(arguments: argparse.Namespace) -> str:
    """How the summary line names a two-point start, empty without one."""
    steps = arguments.two_point_steps
    return f", the first {steps} steps on two points alone" if steps else ""


def evaluation_rows(label, evaluations: list[Evaluation], arguments: argparse.Namespace) -> list[str]:
    """One markdown table row per evaluation of one run: `label`, step, passes, training loss, own, another."""
    rows = []
    for evaluation in evaluations:
        passes = evaluation.step * arguments.batch_size / arguments.train_questions
        rows.append(
            f"| {label} | {evaluation.step} | {passes:.1f} | {evaluation.train_loss:.3f} "
            f"| {evaluation.own:.3f} | {evaluation.other:.3f} |"
        )
    return rows


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="checkpoint folders; the first is the base")
    add_letter_training_options(parser, "questions")
    parser.add_argument("--fresh", action="store_true", help="start the language model and head from random weights")
    parser.add_argument("--seed", type=int, default=0, help="the random start and the batch order")
    arguments = parser.parse_args(argv)
    check_letter_training_options(parser, arguments)
    refuse_non_checkpoints(parser, arguments.models)
    return arguments


def question_sequences(model, processor, rows: list[dict]) -> QuestionSequences:
    """Each question's input embeddings as the language model receives them, computed once without gradients."""
    collator = PerceptioDataCollator(processor, depth_tokenizer=model.require_depth_tokenizer())
    letter_ids = letter_token_ids(processor)
    embeddings, image_tokens, positions = [], [], []
    with torch.no_grad():
        for start in range(0, len(rows), EMBEDDING_BATCH_SIZE):
            batch = collator(rows[start : start + EMBEDDING_BATCH_SIZE])
            input_ids = batch["input_ids"]
            is_image = input_ids == model.config.image_token_id
            inputs = model.get_input_embeddings()(input_ids)
            features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
            inputs[is_image] = features.reshape(-1, features.shape[-1]).to(inputs.dtype)
            lengths = batch["attention_mask"].sum(-1)
            embeddings.extend(inputs[row, :length] for row, length in enumerate(lengths))
            image_tokens.extend(is_image[row, :length] for row, length in enumerate(lengths))
            positions.append(answer_positions(batch["labels"], letter_ids))
    answers, num_points = question_labels(rows)
    return QuestionSequences(embeddings, image_tokens, torch.cat(positions), answers, num_points, letter_ids)


def trainable_language_model(model, fresh: bool, seed: int) -> tuple[nn.Module, nn.Module]:
    """The checkpoint's language model and head, or (`fresh`) random ones of the same configuration."""
    language_model, head = model.model.language_model, model.lm_head
    if fresh:
        torch.manual_seed(seed)
        language_model = type(language_model)(language_model.config)
        head = nn.Linear(head.in_features, head.out_features, bias=False)
    for module in (language_model, head):
        module.train()
        module.requires_grad_(True)
    return language_model, head


def letter_logits(
    language_model: nn.Module, head: nn.Module, sequences: QuestionSequences, questions, image_donors=None
) -> torch.Tensor:
    """The letter scores at each question's answer position, the letters beyond its point count masked; with
    `image_donors`, each question's image tokens replaced by its donor question's."""
    inputs = []
    for index, question in enumerate(questions.tolist()):
        embedding = sequences.embeddings[question]
        if image_donors is not None:
            donor = int(image_donors[index])
            embedding = embedding.clone()
            embedding[sequences.image_tokens[question]] = sequences.embeddings[donor][sequences.image_tokens[donor]]
        inputs.append(embedding)
    padded = nn.utils.rnn.pad_sequence(inputs, batch_first=True)
    attention_mask = nn.utils.rnn.pad_sequence(
        [torch.ones(len(x), dtype=torch.long) for x in inputs], batch_first=True
    )
    hidden = language_model(inputs_embeds=padded, attention_mask=attention_mask).last_hidden_state
    answer_states = hidden[torch.arange(len(questions)), sequences.answer_positions[questions]]
    logits = head(answer_states)[:, sequences.letter_ids]
    unused = torch.arange(len(POINT_LETTERS)) >= sequences.num_points[questions][:, None]
    return logits.masked_fill(unused, float("-inf"))


def evaluate(language_model, head, sequences: QuestionSequences, test_count: int) -> tuple[float, float]:
    """Held-out accuracy with each question's own image tokens and with the next held-out question's."""
    language_model.eval()
    own, other = [], []
    with torch.no_grad():
        for questions in torch.arange(test_count).split(EVALUATION_BATCH_SIZE):
            answers = sequences.answers[questions]
            own.append(letter_logits(language_model, head, sequences, questions).argmax(-1) == answers)
            donors = (questions + 1) % test_count
            other.append(letter_logits(language_model, head, sequences, questions, donors).argmax(-1) == answers)
    language_model.train()
    return torch.cat(own).float().mean().item(), torch.cat(other).float().mean().item()


def train_on_answers(folder: str, rows: list[dict], arguments: argparse.Namespace) -> list[Evaluation]:
    """Train `folder`'s language model on the held-in questions' letters; the held-out evaluations along the way."""
    model, processor = load_perceptio_checkpoint(folder)
    model.eval()
    sequences = question_sequences(model, processor, rows)
    language_model, head = trainable_language_model(model, arguments.fresh, arguments.seed)
    parameters = [*language_model.parameters(), *head.parameters()]
    optimiser = torch.optim.AdamW(parameters, arguments.learning_rate, weight_decay=WEIGHT_DECAY)
    test_count = arguments.test_questions
    generator = torch.Generator().manual_seed(arguments.seed)
    evaluations = [Evaluation(0, float("nan"), *evaluate(language_model, head, sequences, test_count))]
    held_in = torch.arange(test_count, len(rows))
    two_points = held_in[sequences.num_points[held_in] == 2]
    if arguments.two_point_steps and not len(two_points):
        raise ValueError(
            f"--two-point-steps: none of the {len(held_in)} training questions has two points; train on more of them."
        )
    step = 0
    while step < arguments.steps:
        pool = two_points if step < arguments.two_point_steps else held_in
        order = pool[torch.randperm(len(pool), generator=generator)]
        for questions in order.split(arguments.batch_size):
            loss = nn.functional.cross_entropy(
                letter_logits(language_model, head, sequences, questions), sequences.answers[questions]
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            if step % arguments.eval_every == 0 or step == arguments.steps:
                own, other = evaluate(language_model, head, sequences, test_count)
                evaluations.append(Evaluation(step, loss.item(), own, other))
                print(f"{folder}: step {step}, own image {own:.3f}, another {other:.3f}", file=sys.stderr, flush=True)
            if step in (arguments.steps, arguments.two_point_steps):
                break
    return evaluations


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    rows = render_questions(arguments.test_questions + arguments.train_questions)
    runs = [train_on_answers(folder, rows, arguments) for folder in arguments.models]
    start = "random weights" if arguments.fresh else "the checkpoint's weights"
    print(
        f"{arguments.test_questions} held-out relative-depth questions; language model from {start}"
        f"{two_point_start(arguments)}"
    )
    print("| checkpoint | step | passes | training loss | own image | another image |")
    print("| --- | --- | --- | --- | --- | --- |")
    for folder, evaluations in zip(arguments.models, runs):
        print("\n".join(evaluation_rows(folder, evaluations, arguments)))
    base = runs[0][-1].own
    for folder, evaluations in zip(arguments.models[1:], runs[1:]):
        ratio = evaluations[-1].own / base if base else float("nan")
        print(f"{folder} / base, own image after {arguments.steps} steps: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
