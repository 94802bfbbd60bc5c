"""The `perceptio` command: one subcommand per module under `perceptio/commands/`.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func` to the callable
that runs it with the parsed arguments. Modules are imported lazily so `perceptio --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


# Set to a non-empty value to get the traceback of a failure instead of its one-line summary.
TRACEBACK_VARIABLE = "PERCEPTIO_TRACEBACK"

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
        epilog=f"A failure prints one line; set {TRACEBACK_VARIABLE}=1 to see the traceback instead.",
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
    except Exception as error:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(f"perceptio {args.command}: error: {failure_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, (ValueError, OSError)) else 1
    return int(result or 0)


def failure_line(error: Exception) -> str:
    """One line for a failure: a bad input or file (`ValueError`, `OSError`, which name what was wrong) as its
    message, anything else with its type, as an unexpected failure."""
    message = " ".join(str(error).split()) or repr(error)
    if isinstance(error, ValueError):
        return message
    if isinstance(error, OSError):
        return f"{error.strerror or message}: {error.filename}" if error.filename else message
    return f"unexpected {type(error).__name__}: {message} (set {TRACEBACK_VARIABLE}=1 for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
