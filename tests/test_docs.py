"""The documentation runs as written: every ```bash / ```python block of README.md and docs/*.md is executed here, or
is marked as needing what a test machine lacks, and nothing in the docs names a file, command or flag that does
not exist.

A block is marked by an HTML comment on the line just before its fence, naming what it needs and why:

    <!-- needs: network; downloads InternVL3-8B (16 GB) from the Hub -->

Kinds (`MARKER_KINDS`): `gpu`, `network`, and `long-run` (a minute of CPU or more: too long for the default run). Unmarked python blocks of
one page run in document order in one namespace; unmarked bash blocks may hold only plain `perceptio ...` commands,
which run through `perceptio.cli.main` between them, in the same fresh temporary folder (it links the repository's
`examples/`, `perceptio/` and `tests/`, whose fixtures hold the tiny Sa2VA checkpoint). All pages run in one subprocess, so the imports are paid once.
Marked blocks are still checked statically: their `perceptio` commands parse with the real parsers, their scripts
exist and take the flags given, their python compiles and its `perceptio` imports resolve.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perceptio.cli import build_parser


REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = REPO_ROOT / "docs"
DOC_FILES = [REPO_ROOT / "README.md", *sorted(DOCS_DIR.glob("*.md"))]
MARKER_KINDS = ("gpu", "network", "long-run")
EXECUTED_LANGUAGES = ("bash", "python")
# Fence languages that would hide a command from the checks; use bash instead.
FORBIDDEN_LANGUAGES = ("sh", "shell", "console", "zsh", "py", "python3")
README_SETUP_COMMANDS = (
    "python3 -m pip install torch==2.13.0 && python3 -m pip install -e . && perceptio demo --output-dir demo-output",
    "bash .ci/run",
)
FENCE = re.compile(r"^```(?P<language>[\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*needs:\s*(?P<kinds>[a-z-]+(?:\s*,\s*[a-z-]+)*)\s*;\s*(?P<reason>.*?)\s*-->$")
REPO_PATH = re.compile(r"(?<![\w./-])((?:examples|bench|docs|perceptio|tests|\.ci)/[\w./+-]*[\w+-])")
MARKDOWN_LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s#]+)(?:#[^)]*)?\)")
SHELL_OPERATORS = re.compile(r"&&|\|\||[|;<>`]|\$\(")
BLOCKS_TIMEOUT_S = 600


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block of a Markdown page."""

    path: Path
    line: int
    language: str
    code: str
    needs: tuple[str, ...]
    reason: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"

    @property
    def executed(self) -> bool:
        return self.language in EXECUTED_LANGUAGES and not self.needs


def code_blocks(path: Path) -> list[CodeBlock]:
    """The fenced blocks of `path` with the marker of the line before each (a fence inside a fence is text)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path}:{index + 1}: unclosed code fence")
        previous = next((lines[j].strip() for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(previous)
        needs = tuple(kind.strip() for kind in marker["kinds"].split(",")) if marker else ()
        blocks.append(
            CodeBlock(
                path,
                index + 1,
                opening["language"],
                "\n".join(lines[index + 1 : end]) + "\n",
                needs,
                marker["reason"] if marker else "",
            )
        )
        index = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in code_blocks(path)]


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    commands, current = [], ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        commands.append((current + line).strip())
        current = ""
    if current:
        commands.append(current.strip())
    return commands


def perceptio_arguments(command: str) -> list[list[str]]:
    """The argument lists given to the perceptio CLI by a command line (`perceptio ...` or `-m perceptio.cli ...`),
    one per `&&`-joined part."""
    arguments = []
    for part in re.split(r"\s*&&\s*", command):
        words = shlex.split(part, comments=True)
        if words[:1] == ["perceptio"]:
            arguments.append(words[1:])
        elif "perceptio.cli" in words and words[words.index("perceptio.cli") - 1] == "-m":
            arguments.append(words[words.index("perceptio.cli") + 1 :])
    return arguments


def parse_error(argv: list[str]) -> str | None:
    """None when the perceptio parser accepts `argv` (`--help` counts as accepted), else the parser's message."""
    parser = build_parser()
    messages = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(messages):
            parser.parse_args(argv)
    except SystemExit as exit_:
        return None if exit_.code == 0 else f"perceptio {' '.join(argv)}: {messages.getvalue().strip()}"
    return None


# ---- the page parser itself ------------------------------------------------------------------------------------

WORDS = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_./=", min_size=1, max_size=8), min_size=1, max_size=6
)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(WORDS, st.integers(min_value=1, max_value=3), st.booleans()), min_size=1, max_size=5))
def test_shell_commands_joins_continuations_and_drops_comments(commands):
    lines, expected = [], []
    for words, pieces, commented in commands:
        if commented:
            lines.append("# a comment")
        chunk = max(1, len(words) // pieces)
        parts = [" ".join(words[index : index + chunk]) for index in range(0, len(words), chunk)]
        lines.extend(part + " \\" for part in parts[:-1])
        lines.append(parts[-1])
        lines.append("")
        expected.append(" ".join(words))
    assert [" ".join(command.split()) for command in shell_commands("\n".join(lines))] == expected


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["bash", "python", "text"]), st.sampled_from(["", "gpu", "network"]), WORDS),
        min_size=1,
        max_size=4,
    )
)
def test_code_blocks_finds_every_block_with_its_marker(tmp_path_factory, blocks):
    page = tmp_path_factory.mktemp("page") / "page.md"
    lines = ["# Title", ""]
    for language, need, words in blocks:
        if need:
            lines.append(f"<!-- needs: {need}; because the block needs it -->")
        lines += [f"```{language}", " ".join(words), "```", "Some text.", ""]
    page.write_text("\n".join(lines), encoding="utf-8")
    found = code_blocks(page)
    assert [(block.language, block.needs, block.code.strip()) for block in found] == [
        (language, (need,) if need else (), " ".join(words)) for language, need, words in blocks
    ]


# ---- markers and page structure -------------------------------------------------------------------------------


def test_docs_exist_and_are_linked_from_the_index():
    pages = {path.name for path in DOCS_DIR.glob("*.md")}
    assert {"index.md", "getting-started.md", "cli.md", "training.md", "evaluation.md"} <= pages
    index = (DOCS_DIR / "index.md").read_text(encoding="utf-8")
    unlinked = sorted(name for name in pages - {"index.md"} if f"({name})" not in index)
    assert not unlinked, f"docs/index.md does not link {unlinked}"
    assert "docs/index.md" in (REPO_ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda block: block.where)
def test_every_block_runs_here_or_says_what_it_needs(block):
    assert block.language, f"{block.where}: give the fence a language (bash, python, text, yaml, json)"
    assert block.language not in FORBIDDEN_LANGUAGES, f"{block.where}: use ```bash or ```python, not {block.language}"
    unknown = sorted(set(block.needs) - set(MARKER_KINDS))
    assert not unknown, f"{block.where}: unknown needs {unknown}; known: {MARKER_KINDS}"
    if block.needs:
        assert len(block.reason) >= 10, f"{block.where}: say why the block needs {block.needs}"
        assert block.language in EXECUTED_LANGUAGES, f"{block.where}: only bash/python blocks take a needs marker"
    if block.executed and block.language == "bash":
        for command in shell_commands(block.code):
            assert command.startswith("perceptio ") and not SHELL_OPERATORS.search(command), (
                f"{block.where}: an unmarked bash block may hold only plain perceptio commands, got {command!r}; "
                "mark it with <!-- needs: KIND; reason --> if it cannot run here"
            )


def test_readme_keeps_its_two_setup_commands_first():
    blocks = [block for block in code_blocks(REPO_ROOT / "README.md") if block.language == "bash"]
    assert tuple(block.code.strip() for block in blocks[:2]) == README_SETUP_COMMANDS


# ---- static checks of every block, marked or not --------------------------------------------------------------


@pytest.mark.parametrize("block", [block for block in ALL_BLOCKS if block.language == "bash"], ids=lambda b: b.where)
def test_bash_commands_name_real_subcommands_flags_and_scripts(block):
    for command in shell_commands(block.code):
        for argv in perceptio_arguments(command):
            error = parse_error(argv)
            assert error is None, f"{block.where}: {error}"
        words = shlex.split(command, comments=True)
        for index, word in enumerate(words):
            if word.endswith(".py") and index and words[index - 1] in ("python", "python3"):
                script = REPO_ROOT / word
                assert script.is_file(), f"{block.where}: {word} does not exist"
                source = script.read_text(encoding="utf-8")
                flags = [flag.split("=")[0] for flag in words[index + 1 :] if flag.startswith("--")]
                unknown = [flag for flag in flags if f'"{flag}"' not in source]
                # A flag built in a loop (`f"--{arm}"`) is not written out in the source; its --help names it.
                unknown = [
                    flag for flag in unknown if not re.search(rf"(^|\s){re.escape(flag)}\b", script_help(script))
                ]
                assert not unknown, f"{block.where}: {word} has no flags {unknown}"


@functools.cache
def script_help(script: Path) -> str:
    """What `python SCRIPT --help` prints."""
    completed = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    return completed.stdout


@pytest.mark.parametrize("block", [block for block in ALL_BLOCKS if block.language == "python"], ids=lambda b: b.where)
def test_python_blocks_compile_and_import_real_names(block):
    tree = ast.parse(block.code, filename=block.where)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "perceptio":
            module = importlib.import_module(node.module)
            missing = [
                alias.name
                for alias in node.names
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None
            ]
            assert not missing, f"{block.where}: {node.module} has no {missing}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "perceptio":
                    importlib.import_module(alias.name)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: path.name)
def test_docs_name_only_files_that_exist(path):
    text = path.read_text(encoding="utf-8")
    named = {match for match in REPO_PATH.findall(text) if "*" not in match and "{" not in match}
    missing = sorted(name for name in named if not (REPO_ROOT / name).exists())
    assert not missing, f"{path.name} names files that do not exist: {missing}"
    links = {link for link in MARKDOWN_LINK.findall(text)}
    broken = sorted(link for link in links if not (path.parent / link).exists())
    assert not broken, f"{path.name} links to missing files: {broken}"


def test_training_page_covers_every_loss_term_and_weight():
    from perceptio.models.perceptio.configuration_perceptio import PerceptioConfig
    from perceptio.models.perceptio.loss_perceptio import LOSS_TERMS

    text = (DOCS_DIR / "training.md").read_text(encoding="utf-8")
    weights = [name for name in vars(PerceptioConfig).get("__annotations__", {}) if name.endswith("_weight")]
    assert weights, "PerceptioConfig declares no *_weight fields; the check needs updating"
    missing = [name for name in (*LOSS_TERMS, *weights, "depth_soft_merge_temperature") if f"`{name}`" not in text]
    assert not missing, f"docs/training.md does not document {missing}"


def test_cli_reference_is_generated_from_the_parsers():
    spec = importlib.util.spec_from_file_location("generate_cli_reference", DOCS_DIR / "generate_cli_reference.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    expected = generator.render_cli_reference()
    assert (DOCS_DIR / "cli.md").read_text(encoding="utf-8") == expected, (
        "docs/cli.md is out of date: run python docs/generate_cli_reference.py"
    )
    for name in ("demo", "predict", "train", "eval", "build", "export", "push"):
        assert f"## perceptio {name}\n" in expected


# ---- execution ------------------------------------------------------------------------------------------------

BLOCKS_RUNNER = r"""
import json, os, shlex, sys, tempfile, traceback
os.environ.setdefault("TQDM_DISABLE", "1")
from perceptio.cli import main

pages = json.load(open(sys.argv[1]))
for page, blocks in pages.items():
    folder = tempfile.mkdtemp(prefix="perceptio-docs-")
    for name in ("examples", "perceptio", "tests"):
        os.symlink(os.path.join(sys.argv[2], name), os.path.join(folder, name))
    os.chdir(folder)
    namespace = {"__name__": "__main__"}
    for where, language, code in blocks:
        try:
            if language == "python":
                exec(compile(code, where, "exec"), namespace)
                continue
            try:
                status = main(shlex.split(code, comments=True)[1:])
            except SystemExit as exit_:
                status = exit_.code
            if status not in (0, None):
                raise RuntimeError(f"exit status {status}: {code}")
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: the {language} block at {where}", file=sys.stderr)
            sys.exit(1)
"""


def single_thread_environment() -> dict[str, str]:
    """This process's environment with one torch/OpenMP thread: the docs' tiny models run several times faster so
    on CPU cores shared with other work."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_doc_blocks_run(tmp_path):
    """Every unmarked block, page by page in document order, in one fresh interpreter."""
    pages: dict[str, list[tuple[str, str, str]]] = {}
    for block in ALL_BLOCKS:
        if not block.executed:
            continue
        page = pages.setdefault(str(block.path), [])
        if block.language == "python":
            page.append((block.where, "python", block.code))
        else:
            page.extend((block.where, "bash", command) for command in shell_commands(block.code))
    languages = {language for blocks in pages.values() for _, language, _ in blocks}
    assert languages == {"bash", "python"}, f"expected executable bash and python blocks, found {sorted(languages)}"
    blocks_file = tmp_path / "blocks.json"
    blocks_file.write_text(json.dumps(pages), encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, "-c", BLOCKS_RUNNER, str(blocks_file), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=BLOCKS_TIMEOUT_S,
        cwd=tmp_path,
        env=single_thread_environment(),
    )
    assert completed.returncode == 0, completed.stderr[-6000:] + completed.stdout[-2000:]
