"""`perceptio train`: train Perceptio with `PerceptioTrainer` from a YAML configuration, or run a named recipe.

Runs unchanged under `accelerate launch` / DeepSpeed: the Trainer reads the distributed environment itself.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any


EXAMPLE = """example:
  perceptio train --config examples/configs/tiny-cpu.yaml
  perceptio train --config examples/configs/perceptio-8b-lora.yaml --resume
  accelerate launch --num_processes 8 -m perceptio.cli train --config examples/configs/perceptio-8b-lora.yaml
  perceptio train --recipe synthetic-tiny --output-dir runs/synthetic-tiny      # the embedded checkpoint's recipe
  perceptio train --recipe synthetic-tiny --ablation no-depth-tokens --output-dir runs/ablation-no-depth
  perceptio train --recipe synthetic-tiny --ablation no-seg --output-dir runs/ablation-no-seg \
      --shared-stages-dir runs/shared-stages      # a second arm starts at the main stage
  perceptio train --recipe synthetic-tiny --no-question-before-image --output-dir runs/image-first
"""
RECIPES = ("synthetic-tiny",)
# Options whose recipe default is a property that resolves the field (None there means "derive it").
RESOLVED_RECIPE_DEFAULTS = {"text_num_attention_heads": "attention_heads"}


class RecipeDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Ends the help of each option that overrides a recipe setting with that setting's default, read from
    `SyntheticTinyRecipe` only when help is shown, so each default is written once and `perceptio --help` stays fast."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = recipe_default(action.dest)
        if default is None or not action.help:
            return action.help
        return f"{action.help} (default: {format_recipe_default(default)})"


def recipe_default(name: str) -> Any:
    """The default `SyntheticTinyRecipe` gives setting `name` (resolved where `RESOLVED_RECIPE_DEFAULTS` says so), or
    None when no setting has that name."""
    from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe

    recipe = SyntheticTinyRecipe()
    name = RESOLVED_RECIPE_DEFAULTS.get(name, name)
    if name not in {field.name for field in fields(recipe)} and name not in RESOLVED_RECIPE_DEFAULTS.values():
        return None
    return getattr(recipe, name)


def format_recipe_default(value: Any) -> str:
    """A default as the option takes it: booleans as on/off, lists comma-separated, an empty tuple as none."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value) or "none"
    return str(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio train` to the command's subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="Train Perceptio (full objective: LM, masks, depth tokens) from a YAML configuration.",
        description="Train Perceptio with PerceptioTrainer. The YAML file has sections training (TrainingArguments), "
        "model, data and loss; see examples/configs/.",
        epilog=EXAMPLE,
        formatter_class=RecipeDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML configuration file (sections: training, model, data, loss)")
    source.add_argument("--recipe", choices=RECIPES, help="a complete named recipe (data, tokenizer, model, training)")
    parser.add_argument("--output-dir", help="with --recipe: where the recipe writes its data, model and summary")
    parser.add_argument(
        "--ablation",
        default="full",
        help="with --recipe: full, no-depth-tokens, no-seg, depth-lm-only or no-seg-attribute-loss",
    )
    parser.add_argument(
        "--shared-stages-dir",
        help="with --recipe: a folder for the stages before the main stage, which no ablation changes: the first run "
        "saves them there, later runs with the same settings (other ablations, or other main-stage steps and rates) "
        "start their main stage from them",
    )
    parser.add_argument("--train-steps", type=int, help="with --recipe: override the recipe's training steps")
    parser.add_argument(
        "--num-train",
        type=int,
        help="with --recipe: questions in the training split the reading and main stages draw from",
    )
    parser.add_argument(
        "--vision-pretraining-steps",
        type=int,
        help="with --recipe: steps of dense patch-label pretraining of the vision tower, 0 for none",
    )
    parser.add_argument(
        "--vision-pretraining-scenes",
        type=int,
        help="with --recipe: rendered scenes the vision tower's pretraining draws its batches from; "
        "fewer than its steps see leaves its probes overfitted",
    )
    parser.add_argument(
        "--sam2-backbone-hidden-size",
        type=int,
        help="with --recipe: channels of the first of SAM2's four Hiera stages, doubling at each",
    )
    parser.add_argument(
        "--sam2-hidden-size",
        type=int,
        help="with --recipe: width of SAM2's feature pyramid, prompt encoder and mask decoder",
    )
    parser.add_argument(
        "--sam2-patch-stride",
        type=int,
        help="with --recipe: pixels between SAM2's Hiera patches, 1, 2, 4, 8 or 16; its image embedding is 128 / (4 x "
        "stride) cells a side: 8 x 8 at 4, 16 x 16 at 2 for about 2.3 times SAM2's compute",
    )
    parser.add_argument(
        "--grounding-steps",
        type=int,
        help="with --recipe: steps of SAM2's grounding pretraining on attribute prompts",
    )
    parser.add_argument(
        "--grounding-scenes",
        type=int,
        help="with --recipe: rendered scenes SAM2's grounding pretraining draws its batches from",
    )
    parser.add_argument(
        "--grounding-schedule",
        help="with --recipe: how the grounding pretraining's learning rates follow its steps: held at their peak "
        "(constant) or decayed to zero along a half cosine (cosine)",
    )
    parser.add_argument(
        "--seg-attribute-target",
        help="with --recipe: what the [SEG] attribute heads ask of each [SEG] state: the attributes its phrase names "
        "(named) or the referred object's own colour, shape, size and nearness and column ranks (referred)",
    )
    parser.add_argument(
        "--vision-marked-share",
        type=float,
        help="with --recipe: share of the vision tower's and the projector probes' scenes with points marked as the "
        "relative-depth questions mark them, whose patches learn the marked point's letter, 0 for none",
    )
    parser.add_argument(
        "--vision-tally-probes",
        nargs="+",
        metavar="TALLY",
        help="with --recipe: tallies the vision tower's patches and the projector's probes learn to say, named as in "
        "perceptio.trainers.vision_pretraining.TALLY_GROUPS: how many objects share their object's colour "
        "(colour_tally), shape, size and shape, or colour and shape, or how many the scene holds (object_tally)",
    )
    parser.add_argument(
        "--vision-position-probes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --recipe: the vision tower's patches also learn to say their row and column in the patch grid",
    )
    parser.add_argument(
        "--vision-num-layers",
        type=int,
        help="with --recipe: transformer layers of the vision tower",
    )
    parser.add_argument(
        "--text-num-attention-heads",
        type=int,
        help="with --recipe: attention heads of the language model, dividing its width",
    )
    parser.add_argument(
        "--seg-prompt-loss-weight",
        type=float,
        help="with --recipe: weight of loss_seg_prompt, which pulls each [SEG] prompt toward the grounding stage's "
        "attribute prompt of its phrase, 0 for none",
    )
    parser.add_argument(
        "--mask-decoder-steps",
        type=int,
        help="with --recipe: steps of the final stage that trains only the [SEG] projection and SAM2's mask decoder "
        "(0 skips it)",
    )
    parser.add_argument(
        "--vision-stem-channels",
        type=parse_stem_channels,
        help="with --recipe: widths of the vision tower's convolutional stem, comma-separated (for the recipe's "
        "8-pixel patches, two), or none for InternViT's single patch convolution",
    )
    parser.add_argument(
        "--freeze-vision-tower",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --recipe: keep the vision tower fixed after --vision-pretraining-steps (which must be > 0); "
        "--no-freeze-vision-tower trains it on with the rest",
    )
    parser.add_argument(
        "--vision-tower-learning-rate",
        type=float,
        help="with --recipe: peak learning rate of the vision tower in the reading and main stages, when it is "
        "not frozen (default: the stages' own rate)",
    )
    parser.add_argument(
        "--reading-learning-rate",
        type=float,
        help="with --recipe: peak learning rate of the reading stage's phases (default: the main stage's)",
    )
    parser.add_argument(
        "--set",
        dest="recipe_settings",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="with --recipe: any other recipe setting, its value as JSON (repeatable), e.g. "
        "reading_curriculum='[[1,200],[2,400],[3,700,[\"vqa_count\"]]]'",
    )
    parser.add_argument(
        "--projector-from-probes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --recipe: after --vision-pretraining-steps (which must be > 0), start the multimodal projector "
        "from linear probes of each image token's colour, shape, size and depth bin (and, with --vision-marked-share, "
        "a marked point's letter), so image tokens are a fixed "
        "vocabulary the language model binds easily (--no-projector-from-probes starts it at random)",
    )
    parser.add_argument(
        "--projector-position-probes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --recipe and --projector-from-probes: probes of each image token's row and column join the "
        "projector's, so every image token also says where its cell is",
    )
    parser.add_argument(
        "--question-before-image",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --recipe: prompts put the question before the image, so image tokens can attend to it "
        "(--no-question-before-image puts the image first, as InternVL and Sa2VA do)",
    )
    parser.add_argument("--seed", type=int, help="with --recipe: the seed everything follows from")
    parser.add_argument(
        "--num-threads",
        type=int,
        help="with --recipe: torch CPU threads; the same seed and thread count give the same weights (the embedded "
        "checkpoint was trained with the default)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="resume from CHECKPOINT, or from the latest in output_dir",
    )
    parser.set_defaults(func=run)


def parse_stem_channels(value: str) -> list[int]:
    """`--vision-stem-channels`: comma-separated positive widths, or "none" (an empty list: no stem)."""
    if value.strip().lower() == "none":
        return []
    try:
        widths = [int(width) for width in value.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) <= 0:
        raise argparse.ArgumentTypeError(f"expected none or comma-separated positive widths like 32,64, got {value!r}")
    return widths


def run(args: argparse.Namespace) -> int:
    """Run `perceptio train` with the parsed arguments; returns the exit status."""
    if args.recipe is not None:
        return run_recipe(args)
    if args.shared_stages_dir is not None:
        raise ValueError("--shared-stages-dir applies to --recipe runs, not to --config ones.")
    if args.recipe_settings:
        raise ValueError("--set applies to --recipe runs; a --config run takes its settings from the YAML file.")
    from perceptio.trainers.training_config import load_training_config
    from perceptio.trainers.training_run import train_perceptio

    train_perceptio(load_training_config(args.config), resume_from_checkpoint=args.resume)
    return 0


def run_recipe(args: argparse.Namespace) -> int:
    """Run the named recipe end to end and print where its model and summary are."""
    from perceptio.trainers.synthetic_recipe import run_synthetic_tiny_recipe
    from perceptio.trainers.synthetic_recipe_settings import SyntheticTinyRecipe, parse_recipe_override

    if args.output_dir is None:
        raise ValueError("--recipe needs --output-dir (where the recipe writes its data, model and summary).")
    if args.resume is not None:
        raise ValueError("--resume applies to --config runs; a recipe reruns from its seed.")
    overrides = {
        "seed": args.seed,
        "train_steps": args.train_steps,
        "num_train": args.num_train,
        "vision_pretraining_steps": args.vision_pretraining_steps,
        "vision_pretraining_scenes": args.vision_pretraining_scenes,
        "sam2_backbone_hidden_size": args.sam2_backbone_hidden_size,
        "sam2_hidden_size": args.sam2_hidden_size,
        "sam2_patch_stride": args.sam2_patch_stride,
        "grounding_steps": args.grounding_steps,
        "grounding_scenes": args.grounding_scenes,
        "grounding_schedule": args.grounding_schedule,
        "seg_attribute_target": args.seg_attribute_target,
        "vision_marked_share": args.vision_marked_share,
        "vision_tally_probes": args.vision_tally_probes,
        "vision_position_probes": args.vision_position_probes,
        "vision_num_layers": args.vision_num_layers,
        "text_num_attention_heads": args.text_num_attention_heads,
        "seg_prompt_loss_weight": args.seg_prompt_loss_weight,
        "mask_decoder_steps": args.mask_decoder_steps,
        "freeze_vision_tower": args.freeze_vision_tower,
        "vision_tower_learning_rate": args.vision_tower_learning_rate,
        "reading_learning_rate": args.reading_learning_rate,
        "question_before_image": args.question_before_image,
        "projector_from_probes": args.projector_from_probes,
        "projector_position_probes": args.projector_position_probes,
        "num_threads": args.num_threads,
    }
    given = {name: value for name, value in overrides.items() if value is not None}
    if args.vision_stem_channels is not None:
        # The option's "none" is an empty list; the recipe's is None.
        given["vision_stem_channels"] = args.vision_stem_channels or None
    settings = dict(parse_recipe_override(text) for text in args.recipe_settings)
    given_twice = sorted(given.keys() & settings.keys())
    if given_twice:
        options = ", ".join(f"--{name.replace('_', '-')}" for name in given_twice)
        raise ValueError(f"--set {', '.join(given_twice)}: {options} already sets it; give each setting once.")
    recipe = SyntheticTinyRecipe(**given, **settings)
    summary = run_synthetic_tiny_recipe(
        args.output_dir, recipe, ablation=args.ablation, shared_stages_dir=args.shared_stages_dir
    )
    print(
        f"Recipe {args.recipe} ({args.ablation}) done in {summary['timings']['total_s'] / 60:.1f} min; model in "
        f"{args.output_dir}/model, summary in {args.output_dir}/recipe_summary.json. Evaluate it with "
        f"`perceptio eval synthetic --model {args.output_dir}/model --data {args.output_dir}/dataset`."
    )
    return 0
