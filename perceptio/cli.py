"""The `perceptio` command: one subcommand per module under `perceptio/commands/`.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func` to the callable
that runs it with the parsed arguments. Modules are imported lazily so `perceptio --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys


# Subcommand name -> module under perceptio.commands that registers it.
COMMAND_MODULES: dict[str, str] = {
    "demo": "demo",
    "predict": "predict",
    "train": "train",
    "train-depth-tokenizer": "train_depth_tokenizer",
    "eval-depth-tokenizer": "eval_depth_tokenizer",
    "eval": "evaluate",
    "build": "build",
    "convert-sa2va": "convert_sa2va",
    "export": "export",
    "push": "push",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand whose module is present."""
    parser = argparse.ArgumentParser(
        prog="perceptio",
        description="Perceptio: segmentation and depth tokens before the answer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES.values():
        try:
            module = importlib.import_module(f"perceptio.commands.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"perceptio.commands.{module_name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `perceptio` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except ValueError as error:
        print(f"perceptio {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
