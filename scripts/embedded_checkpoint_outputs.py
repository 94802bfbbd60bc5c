"""Record, or compare, everything the embedded checkpoint computes on fixed inputs, to show that a refactor changes
no behaviour.

    python scripts/embedded_checkpoint_outputs.py save before.pt      # on the old code
    python scripts/embedded_checkpoint_outputs.py save after.pt       # on the new code
    python scripts/embedded_checkpoint_outputs.py compare before.pt after.pt

Recorded: greedy `generate` (sequences and `[SEG]` states) and `predict` (text, masks, scores, depth) on four fixed
prompts about the demo scene, and the collated batch and every loss term (both LM reductions) of six synthetic
training samples. `compare` requires bitwise equality and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import sys

import torch

from perceptio.data.synthetic_dataset import generate_sample
from perceptio.embedded_checkpoint import EXAMPLE_PROMPT, example_scene, load_embedded_perceptio
from perceptio.trainers.collator_perceptio import PerceptioDataCollator


PROMPTS = (
    EXAMPLE_PROMPT,
    "Where is the red cube? Also estimate the depth of the scene.",
    "Where is the small cylinder? Please output the segmentation mask.",
    "How many objects are in the scene?",
)
MAX_NEW_TOKENS = 128
NUM_TRAINING_SAMPLES = 6


def generation_records(model, processor) -> list[dict]:
    image = example_scene()
    records = []
    for prompt in PROMPTS:
        inputs = processor(images=[image], text=[processor.format_prompt(prompt)])
        output = model.generate(
            **{key: value for key, value in inputs.items() if key != "sam_pixel_values"},
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            eos_token_id=processor.tokenizer.eos_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        (prediction,) = model.predict([image], [prompt], processor=processor, max_new_tokens=MAX_NEW_TOKENS)
        records.append(
            {
                "name": prompt,
                "sequences": output.sequences,
                "seg_hidden_states": [state.clone() for state in output.seg_hidden_states],
                "text": prediction.text,
                "token_ids": prediction.token_ids,
                "masks": [torch.from_numpy(mask) for mask in prediction.masks],
                "mask_scores": prediction.mask_scores,
                "depth": None if prediction.depth is None else torch.from_numpy(prediction.depth),
                "depth_codes": prediction.depth_codes,
            }
        )
    return records


def loss_terms(output) -> dict[str, torch.Tensor]:
    """Every loss term of a forward's output, whether it holds them in `loss_dict` or (older code) as fields."""
    if getattr(output, "loss_dict", None) is not None:
        return dict(output.loss_dict)
    return {name: value for name, value in output.items() if name.startswith("loss_")}


def training_record(model, processor) -> dict:
    samples = [
        dict(generate_sample(0, "train", index, 128), use_depth_block=index % 2 == 0)
        for index in range(NUM_TRAINING_SAMPLES)
    ]
    batch = PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer)(samples)
    losses = {}
    for reduction in ("token", "segment"):
        model.config.lm_loss_reduction = reduction
        with torch.no_grad():
            output = model(**batch)
        losses[reduction] = {"loss": output.loss, **loss_terms(output)}
    return {"name": "training batch", "input_ids": batch["input_ids"], "labels": batch["labels"], "losses": losses}


def bitwise_equal(first, second) -> bool:
    if torch.is_tensor(first):
        return torch.is_tensor(second) and first.dtype == second.dtype and torch.equal(first, second)
    if isinstance(first, dict):
        return (
            isinstance(second, dict)
            and first.keys() == second.keys()
            and all(bitwise_equal(first[key], second[key]) for key in first)
        )
    if isinstance(first, (list, tuple)):
        return (
            isinstance(second, (list, tuple))
            and len(first) == len(second)
            and all(bitwise_equal(a, b) for a, b in zip(first, second))
        )
    return first == second


def compare(before_path: str, after_path: str) -> bool:
    before = torch.load(before_path, weights_only=False)
    after = torch.load(after_path, weights_only=False)
    if [record["name"] for record in before] != [record["name"] for record in after]:
        print("The two files record different inputs.")
        return False
    same_everywhere = True
    for old, new in zip(before, after):
        for key in old:
            same = bitwise_equal(old[key], new.get(key))
            same_everywhere &= same
            print(f"{old['name'][:40]!r:45} {key:18} {'bitwise equal' if same else 'DIFFERENT'}")
    print("ALL BITWISE EQUAL" if same_everywhere else "MISMATCH")
    return same_everywhere


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("save").add_argument("output")
    compare_parser = commands.add_parser("compare")
    compare_parser.add_argument("before")
    compare_parser.add_argument("after")
    args = parser.parse_args()
    if args.command == "compare":
        return 0 if compare(args.before, args.after) else 1
    torch.manual_seed(0)
    model, processor = load_embedded_perceptio()
    records = [*generation_records(model, processor), training_record(model, processor)]
    torch.save(records, args.output)
    print(f"saved {len(records)} records to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
