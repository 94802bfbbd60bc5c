"""Where inside the language model a checkpoint's relative-depth answer is lost: the attention readout of
`relative_depth_readout.py`, trained on the hidden states of each layer at three places of the sequence.

Each question goes through the model as training feeds it (the question, its image, the depth block of its own depth
map, the answer), teacher-forced, and every layer's hidden states are kept at three places:

- `image`: the image tokens. A readout that scores here finds the marked points and compares them at that layer;
- `depth`: the depth codes of the block, one per image token cell. Each code's cell holds the depth the answer needs,
  but the markers are only in the image: a readout scores here only where the codes took the marks from the image;
- `answer`: the one position that predicts the answer's letter. A readout scores here only where the language model
  has brought the answer there; at layer 0 it is the prior of the question's point count.

The readout is trained on `--train-questions` relative-depth questions and scored on `--test-questions` others, with
each question's own states and with another question's. The language model's own teacher-forced answer (its most
likely letter among the question's) is printed beside them: where the image tokens score at every layer and the
answer position never does, the answer does not attend to what the image tokens hold.

Each `--models` folder is a saved Perceptio checkpoint; the first is the base, and the others' figures are printed as
a ratio of its.

    python bench/relative_depth_layers.py --models perceptio/assets/perceptio-tiny-synthetic runs/marked/model
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from marker_probe import refuse_non_checkpoints, refuse_non_positive, render_questions
from relative_depth_readout import (
    Questions,
    ReadoutScores,
    question_labels,
    score_readout,
    standardised,
    train_readout,
)

from perceptio.checkpoint_loading import load_perceptio_checkpoint
from perceptio.data.synthetic_tasks import POINT_LETTERS
from perceptio.models.perceptio.processing_perceptio import IGNORE_INDEX
from perceptio.trainers.collator_perceptio import PerceptioDataCollator


PLACES = ("image", "depth", "answer")
BATCH_SIZE = 32


@dataclass
class SequenceStates:
    """Every layer's hidden states at each place, (questions, layers + 1, tokens, hidden), and the language model's
    own teacher-forced letter scores at the answer position, (questions, letters)."""

    places: dict[str, torch.Tensor]
    letter_logits: torch.Tensor


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="checkpoint folders; the first is the base")
    parser.add_argument("--train-questions", type=int, default=4500, help="questions each readout is trained on")
    parser.add_argument("--test-questions", type=int, default=500, help="held-out questions")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training questions")
    parser.add_argument("--heads", type=int, default=4, help="the readout's learned queries")
    parser.add_argument("--seed", type=int, default=0, help="the readout's initialisation and batch order")
    arguments = parser.parse_args(argv)
    refuse_non_positive(parser, arguments, ["train_questions", "epochs", "heads"])
    if arguments.test_questions < 2:
        parser.error("--test-questions must be at least 2 (each is also asked with another's states).")
    refuse_non_checkpoints(parser, arguments.models)
    return arguments


def letter_token_ids(processor) -> torch.Tensor:
    """The token id of each point letter; the answer "(B)" must spell its letter as one token to be located."""
    ids = [processor.tokenizer.convert_tokens_to_ids(letter) for letter in POINT_LETTERS]
    if processor.tokenizer.unk_token_id in ids or None in ids:
        raise ValueError(f"The checkpoint's tokenizer has no single token for each of the letters {POINT_LETTERS}.")
    return torch.tensor(ids)


def answer_positions(labels: torch.Tensor, letter_ids: torch.Tensor) -> torch.Tensor:
    """Per row, the position whose output predicts the answer's letter: the one before the first labelled letter."""
    is_letter = (labels != IGNORE_INDEX) & torch.isin(labels, letter_ids)
    if not is_letter.any(-1).all():
        raise ValueError("An answer has no point letter among its labelled tokens; expected answers like '(B)'.")
    return is_letter.int().argmax(-1) - 1


def sequence_states(model, processor, rows: list[dict]) -> SequenceStates:
    """The hidden states of every layer at the image tokens, the depth codes and the answer position, teacher-forced."""
    collator = PerceptioDataCollator(processor, depth_tokenizer=model.require_depth_tokenizer())
    letter_ids = letter_token_ids(processor)
    places: dict[str, list[torch.Tensor]] = {place: [] for place in PLACES}
    letter_logits = []
    with torch.no_grad():
        for start in range(0, len(rows), BATCH_SIZE):
            batch = collator(rows[start : start + BATCH_SIZE])
            input_ids = batch["input_ids"]
            outputs = model(
                input_ids=input_ids,
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                output_hidden_states=True,
            )
            layers = torch.stack(outputs.hidden_states, 1)
            rows_in_batch = torch.arange(len(input_ids))
            answers = answer_positions(batch["labels"], letter_ids)
            for place, selected in (
                ("image", input_ids == model.config.image_token_id),
                ("depth", collator.spatial_vocabulary.is_depth_code(input_ids)),
            ):
                places[place].extend(layers[row][:, selected[row]] for row in rows_in_batch)
            places["answer"].append(layers[rows_in_batch, :, answers].unsqueeze(2))
            letter_logits.append(outputs.logits[rows_in_batch, answers][:, letter_ids])
    stacked = {
        place: torch.stack(states) if place != "answer" else torch.cat(states) for place, states in places.items()
    }
    return SequenceStates(stacked, torch.cat(letter_logits))


def own_answer_accuracy(letter_logits: torch.Tensor, answers: torch.Tensor, num_points: torch.Tensor) -> float:
    """How often the model's most likely letter, among the question's own letters, is the right one."""
    unused = torch.arange(letter_logits.shape[1]) >= num_points[:, None]
    return (letter_logits.masked_fill(unused, float("-inf")).argmax(-1) == answers).float().mean().item()


def layer_readouts(states: torch.Tensor, answers, num_points, arguments: argparse.Namespace) -> list[ReadoutScores]:
    """Per layer, the readout trained on the held-in questions' states at one place, scored on the held-out ones."""
    test_count = arguments.test_questions
    scores = []
    for layer in range(states.shape[1]):
        questions = Questions(standardised(states[:, layer], test_count), answers, num_points)
        readout = train_readout(questions[test_count:], arguments.epochs, arguments.heads, arguments.seed)
        scores.append(score_readout(readout, questions[:test_count]))
    return scores


def checkpoint_layers(folder: str, rows: list[dict], arguments: argparse.Namespace) -> tuple[dict, float]:
    """Per place, the per-layer readout scores; and the model's own held-out teacher-forced answer accuracy."""
    model, processor = load_perceptio_checkpoint(folder)
    model.eval()
    states = sequence_states(model, processor, rows)
    answers, num_points = question_labels(rows)
    test = slice(0, arguments.test_questions)
    own = own_answer_accuracy(states.letter_logits[test], answers[test], num_points[test])
    return {place: layer_readouts(states.places[place], answers, num_points, arguments) for place in PLACES}, own


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    rows = render_questions(arguments.test_questions + arguments.train_questions)
    results = [checkpoint_layers(folder, rows, arguments) for folder in arguments.models]
    print(f"{arguments.test_questions} held-out relative-depth questions; readout with own states / another's")
    print(f"| checkpoint | layer | {' | '.join(PLACES)} |")
    print(f"| --- | --- | {' | '.join('---' for _ in PLACES)} |")
    for folder, (places, _) in zip(arguments.models, results):
        for layer in range(len(places["image"])):
            cells = " | ".join(f"{places[p][layer].own:.3f} / {places[p][layer].other:.3f}" for p in PLACES)
            print(f"| {folder} | {layer} | {cells} |")
    for folder, (_, own) in zip(arguments.models, results):
        print(f"{folder}: the language model's own teacher-forced answer, {own:.3f}")
    base = results[0][0]["answer"][-1].own
    for folder, (places, _) in zip(arguments.models[1:], results[1:]):
        ratio = places["answer"][-1].own / base if base else float("nan")
        print(f"{folder} / base, readout at the answer position after the last layer: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
