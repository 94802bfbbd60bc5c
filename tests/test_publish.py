"""`perceptio push`: a trust_remote_code load check before upload, an exact dry-run listing, HfApi at the boundary."""

from __future__ import annotations

import shutil

import pytest

from perceptio.cli import main
from perceptio.hub_cards import publish
from perceptio.hub_cards.export_perceptio import export_pretrained
from perceptio.hub_cards.model_card import PerceptioCardData, write_model_card
from perceptio.hub_cards.publish import check_repo_id, files_to_upload, push


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records calls, never touches the network."""

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


@pytest.fixture()
def fake_hub(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(publish, "HfApi", RecordingHfApi)
    return RecordingHfApi.calls


@pytest.fixture(scope="module")
def folder(tiny_pair, tmp_path_factory):
    model, processor = tiny_pair
    exported = export_pretrained(model, processor, tmp_path_factory.mktemp("push") / "tiny")
    write_model_card(exported, PerceptioCardData(model_name="perceptio-tiny", model_id="org/perceptio-tiny"))
    # Debris that must never be uploaded.
    (exported / ".git").mkdir()
    (exported / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (exported / "__pycache__").mkdir()
    (exported / "__pycache__" / "modeling_perceptio.cpython-311.pyc").write_bytes(b"\0")
    return exported


def test_dry_run_checks_lists_exactly_the_upload_and_sends_nothing(folder, fake_hub, capsys):
    assert main(["push", str(folder), "--repo-id", "org/perceptio-tiny", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    expected = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and ".git" not in path.parts and "__pycache__" not in path.parts
    )
    listed = [line.split()[0] for line in printed.splitlines() if line.startswith("  ")]
    assert listed == expected
    assert {"model.safetensors", "README.md", "config.json", "modeling_perceptio.py"} <= set(listed)
    assert f"{len(expected)} files" in printed and "nothing was uploaded" in printed
    assert fake_hub == []


def test_push_checks_first_then_creates_the_repo_and_uploads_the_listed_files(folder, fake_hub, monkeypatch):
    # The real check runs in the dry-run and broken-folder tests; here only its place in the sequence matters.
    monkeypatch.setattr(publish, "load_in_isolation", lambda checked: fake_hub.append(("check", {"folder": checked})))
    plan = push(folder, "org/perceptio-tiny", private=True)
    assert [name for name, _ in fake_hub] == ["check", "create_repo", "upload_folder"]
    create, upload = fake_hub[1][1], fake_hub[2][1]
    assert create == {"repo_id": "org/perceptio-tiny", "private": True, "repo_type": "model", "exist_ok": True}
    assert upload["repo_id"] == "org/perceptio-tiny" and upload["folder_path"] == str(folder)
    assert upload["allow_patterns"] == plan.files == files_to_upload(folder)
    assert not any(name.startswith((".git", "__pycache__")) for name in plan.files)


def test_a_folder_that_does_not_load_is_never_uploaded(folder, fake_hub, tmp_path):
    broken = shutil.copytree(folder, tmp_path / "broken")
    (broken / "modeling_perceptio.py").unlink()
    with pytest.raises(ValueError, match="does not load with trust_remote_code=True"):
        push(broken, "org/perceptio-tiny")
    assert fake_hub == []


@pytest.mark.parametrize("repo_id", ["perceptio", "org/", "/name", "org/name/extra", "org/na me", "org/..", 7])
def test_bad_repo_ids_are_rejected(repo_id):
    with pytest.raises(ValueError, match="ORG/NAME"):
        check_repo_id(repo_id)


def test_incomplete_folders_are_rejected_before_any_check(folder, fake_hub, tmp_path):
    without_card = shutil.copytree(folder, tmp_path / "no_card")
    (without_card / "README.md").unlink()
    with pytest.raises(ValueError, match=r"lacks \['README.md'\]"):
        push(without_card, "org/perceptio-tiny", dry_run=True)
    with pytest.raises(ValueError, match="is not a folder"):
        push(tmp_path / "absent", "org/perceptio-tiny")
    assert fake_hub == []
