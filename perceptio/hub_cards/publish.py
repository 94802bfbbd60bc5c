"""Publish an exported Perceptio folder to the Hugging Face Hub.

Before anything is uploaded, the folder is loaded with `trust_remote_code=True` in a separate Python process where the
`perceptio` package cannot be imported (an import hook blocks it), and a text prompt is run through the processor
and the model: a folder that would not load for Hub users is never pushed. `dry_run` stops after the check and
lists exactly the files `upload_folder` would send.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch
from huggingface_hub import HfApi

from ..checkpoint_loading import check_checkpoint_folder


REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
REQUIRED_FILES = (
    "config.json",
    "model.safetensors|model.safetensors.index.json",
    "processor_config.json",
    "README.md",
)
# Never uploaded: version control, caches and editor debris.
IGNORED_PATTERNS = (".git/*", ".git", "*/.git/*", ".cache/*", "*/__pycache__/*", "__pycache__/*", "*.pyc", ".DS_Store")
GLOB_CHARACTERS = "*?[]"
DEFAULT_CHECK_PROMPT = "Describe the scene."
CHECK_TIMEOUT_S = 1800

# Runs in the child process: block `perceptio`, load with trust_remote_code, run a text prompt, save the results.
ISOLATED_LOAD_SCRIPT = r"""
import sys

class BlockPerceptio:
    def find_spec(self, name, path=None, target=None):
        if name == "perceptio" or name.startswith("perceptio."):
            raise ImportError(f"{name} is blocked: a Hub folder must not need the perceptio package")
        return None

sys.meta_path.insert(0, BlockPerceptio())
import torch
from transformers import AutoModel, AutoProcessor

folder, prompt, output_path = sys.argv[1:4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(text=[processor.format_prompt(prompt, num_images=0)])
with torch.no_grad():
    logits = model(**inputs).logits
torch.save(
    {
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "processor_class": type(processor).__module__ + "." + type(processor).__name__,
        "input_ids": inputs["input_ids"],
        "logits": logits.float(),
    },
    output_path,
)
"""


@dataclass
class IsolatedLoadReport:
    """What loading a folder with `trust_remote_code=True`, without the `perceptio` package, gave."""

    model_class: str
    processor_class: str
    input_ids: torch.Tensor
    logits: torch.Tensor


@dataclass
class PushPlan:
    """What `push` uploads (or, with `dry_run`, would upload)."""

    repo_id: str
    private: bool
    folder: Path
    files: list[str]
    total_bytes: int

    def describe(self) -> str:
        """A listing of the upload: repository, visibility, each file with its size, and the total."""
        lines = [f"{'private' if self.private else 'public'} model repository {self.repo_id} <- {self.folder}:"]
        lines.extend(f"  {name}  ({(self.folder / name).stat().st_size:,} bytes)" for name in self.files)
        lines.append(f"{len(self.files)} files, {self.total_bytes:,} bytes")
        return "\n".join(lines)


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is `ORG/NAME`, else a `ValueError` saying what is accepted."""
    if not isinstance(repo_id, str) or not REPO_ID_PATTERN.match(repo_id) or ".." in repo_id:
        raise ValueError(f"repo_id must look like ORG/NAME (letters, digits, '-', '_', '.'), got {repo_id!r}.")
    return repo_id


def check_export_folder(folder: str | Path) -> Path:
    """The folder, or a `ValueError` naming what an exported Perceptio folder lacks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is not a folder; push a folder written by `perceptio build` or `perceptio export`."
        )
    missing = [
        required for required in REQUIRED_FILES if not any((folder / name).is_file() for name in required.split("|"))
    ]
    if missing:
        raise ValueError(
            f"{folder} is not a complete exported Perceptio folder: it lacks {missing} (`perceptio build` writes "
            "them all; add a card with perceptio.hub_cards.model_card.write_model_card)."
        )
    return folder


def files_to_upload(folder: str | Path) -> list[str]:
    """Every file under `folder` (relative POSIX paths, sorted) except version-control and cache files."""
    folder = Path(folder)
    names = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(folder).as_posix()
        if any(fnmatch(name, pattern) for pattern in IGNORED_PATTERNS):
            continue
        if any(character in name for character in GLOB_CHARACTERS):
            raise ValueError(f"{path}: file names with {GLOB_CHARACTERS!r} cannot be uploaded exactly; rename it.")
        names.append(name)
    return names


def load_in_isolation(
    folder: str | Path, prompt: str = DEFAULT_CHECK_PROMPT, timeout_s: int = CHECK_TIMEOUT_S
) -> IsolatedLoadReport:
    """Load `folder` with `trust_remote_code=True` in a child process that cannot import `perceptio`; run `prompt`.

    Raises a `ValueError` with the child's error output when loading or running fails.
    """
    folder = Path(folder).resolve()
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}.")
    with tempfile.TemporaryDirectory(prefix="perceptio-isolated-") as scratch:
        output_path = Path(scratch) / "outputs.pt"
        environment = {**os.environ, "HF_MODULES_CACHE": str(Path(scratch) / "modules"), "HF_HUB_OFFLINE": "1"}
        environment.pop("PYTHONPATH", None)
        completed = subprocess.run(
            [sys.executable, "-c", ISOLATED_LOAD_SCRIPT, str(folder), prompt, str(output_path)],
            capture_output=True,
            text=True,
            env=environment,
            cwd=scratch,
            timeout=timeout_s,
        )
        if completed.returncode != 0 or not output_path.is_file():
            raise ValueError(
                f"{folder} does not load with trust_remote_code=True without the perceptio package:\n"
                f"{completed.stderr[-4000:]}"
            )
        result = torch.load(output_path, weights_only=True)
    return IsolatedLoadReport(
        model_class=result["model_class"],
        processor_class=result["processor_class"],
        input_ids=result["input_ids"],
        logits=result["logits"],
    )


def push(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    dry_run: bool = False,
    api: HfApi | None = None,
    commit_message: str = "Upload Perceptio checkpoint",
) -> PushPlan:
    """Check that `folder` loads for Hub users, then create `repo_id` and upload the folder.

    Args:
        folder: an exported Perceptio folder (`perceptio build` / `perceptio export`, with a README.md card).
        repo_id: `ORG/NAME` of the model repository (created if absent).
        private: create the repository private.
        dry_run: run the check and return the plan without creating or uploading anything.
        api: the `HfApi` to use (token from the usual `huggingface-cli login` / `HF_TOKEN`).
        commit_message: message of the upload commit.
    """
    check_repo_id(repo_id)
    if not isinstance(private, bool) or not isinstance(dry_run, bool):
        raise ValueError(f"private and dry_run must be True or False, got {private!r} and {dry_run!r}.")
    folder = check_export_folder(folder)
    check_checkpoint_folder(folder)
    files = files_to_upload(folder)
    plan = PushPlan(
        repo_id=repo_id,
        private=private,
        folder=folder,
        files=files,
        total_bytes=sum((folder / name).stat().st_size for name in files),
    )
    load_in_isolation(folder)
    if dry_run:
        return plan
    api = api or HfApi()
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        allow_patterns=files,
        commit_message=commit_message,
    )
    return plan


__all__ = [
    "IsolatedLoadReport",
    "PushPlan",
    "check_export_folder",
    "check_repo_id",
    "files_to_upload",
    "load_in_isolation",
    "push",
]
