"""Publishing a merge to a Hub repo (`push_merge`, `qwen-merge merge --push-to-hub`), against the local fake Hub
(tests/hubserver.py, its upload side: repo creation, preupload, LFS batch, PUT, verify, NDJSON commit) with
Xet off, as huggingface_hub does it with HF_HUB_DISABLE_XET=1. No real host is reached.

What is pushed, downloaded back with snapshot_download, is byte-identical to the local merge of the same
inputs (but for the model card); nothing is visible in the repo before the one commit.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from builders import run_cli, tree_hash
from hubserver import FakeHub, use_hub

from qwen_merge import HubError, OptionError, UploadError, plan_merge, push_merge
from qwen_merge.cli import main
from qwen_merge.push import disk_needed, staging_folder_for
from qwen_merge.sinks.hubrepo import HubTarget

pytestmark = [pytest.mark.slow,  # merges through a local Hub server
              pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")]  # huggingface_hub's PUT

BASE, LORA, TARGET = "org/tiny-base", "org/tiny-lora", "me/merged"
TOKEN = "hf_test_token"
SHARDS = ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors")


@pytest.fixture
def hub(demo_inputs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    base, adapter = demo_inputs
    with FakeHub() as server:
        server.add_repo(BASE, base)
        server.add_repo(LORA, adapter)
        use_hub(monkeypatch, server, tmp_path / "hf-cache", home=tmp_path / "hf-home", token=TOKEN,
                fast_retries=True)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        server.home = tmp_path / "hf-home"
        yield server


def downloaded(tmp_path: Path, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    folder = tmp_path / f"downloaded-{revision}"
    return Path(snapshot_download(TARGET, revision=revision, local_dir=folder, cache_dir=tmp_path / "check-cache"))


def same_as_local(pushed: Path, reference: Path) -> None:
    """The pushed files equal the local merge's, but for the card and the manifest's Hub identity."""
    ours = {name: digest for name, digest in tree_hash(pushed).items() if not name.startswith(".cache")}
    assert ours.pop("README.md") and ours.pop(".gitattributes")
    same_files(ours, pushed, reference)


def same_files(ours: dict[str, str], pushed: Path, reference: Path) -> None:
    theirs = tree_hash(reference)
    ours.pop("qwen_merge.json"), theirs.pop("qwen_merge.json")
    assert ours == theirs
    mine = json.loads((pushed / "qwen_merge.json").read_text())
    for role in ("base", "adapter"):
        mine[role].pop("hub", None)
    assert mine == json.loads((reference / "qwen_merge.json").read_text())


def test_push_is_one_commit_byte_identical_to_the_local_merge(hub, tmp_path, demo_merged):
    report = push_merge(BASE, LORA, TARGET, progress=False)
    assert hub.commits_of(TARGET) == 2  # the repo's creation, then ours
    assert hub.count("POST", f"/api/models/{TARGET}/commit/") == 1
    assert sorted(report.uploaded) == list(SHARDS) and report.output is None
    assert report.commit == hub.commit_of(TARGET)
    pushed = downloaded(tmp_path)
    same_as_local(pushed, demo_merged)
    card = (pushed / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/tiny-base\nbase_model_relation: merge\nlibrary_name: transformers\n")
    assert f"`{BASE}`" in card and hub.commit_of(BASE) in card and hub.commit_of(LORA) in card
    assert "qwen-merge verify merged --base" in card
    assert not staging_folder_for(HubTarget(TARGET)).exists()  # the staging folder is gone


def test_cli_push_keeps_out_and_commits_to_a_branch(hub, tmp_path, demo_merged, capsys):
    out = tmp_path / "out"
    status = main(["merge", BASE, LORA, str(out), "--push-to-hub", TARGET, "--revision", "dev", "--private",
                   "--quiet"])
    assert status == 0, capsys.readouterr().err
    same_files(tree_hash(out), out, demo_merged)  # the local copy kept is the local merge
    same_as_local(downloaded(tmp_path, revision="dev"), demo_merged)
    assert hub.file(TARGET, ".gitattributes", "main")  # main has only the repo's first commit
    with pytest.raises(KeyError):
        hub.file(TARGET, SHARDS[0], "main")
