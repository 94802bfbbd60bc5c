"""`perceptio push`: check that an exported folder loads for Hub users, then upload it to the Hugging Face Hub."""

from __future__ import annotations

import argparse


EXAMPLE = """examples:
  perceptio push built/perceptio-8b --repo-id my-org/perceptio-8b --dry-run   # check + list what would be sent
  perceptio push built/perceptio-8b --repo-id my-org/perceptio-8b --private
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `perceptio push` to the command's subparsers."""
    parser = subparsers.add_parser(
        "push",
        help="upload an exported Perceptio folder to the Hub (after a trust_remote_code load check)",
        description=(
            "Load the folder with trust_remote_code=True in a process where the perceptio package cannot be "
            "imported, then create the model repository and upload the folder. Log in first (huggingface-cli login "
            "or HF_TOKEN)."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", help="folder written by perceptio build / perceptio export (with a README.md card)")
    parser.add_argument("--repo-id", required=True, help="model repository, ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry-run", action="store_true", help="check and list the files, upload nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `perceptio push` with the parsed arguments; returns the exit status."""
    from perceptio.hub_cards.publish import push

    plan = push(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run)
    print(plan.describe())
    if args.dry_run:
        print("Dry run: the folder loads with trust_remote_code=True; nothing was uploaded.")
    else:
        print(f"Uploaded to https://huggingface.co/{plan.repo_id}")
    return 0
