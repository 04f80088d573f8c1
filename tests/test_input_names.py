"""What the names given as BASE and ADAPTER mean: a mistyped path that could also be a Hub repo id.

Hub lookups go to the local fake Hub (tests/hubserver.py) or the offline cache; nothing else is reached.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from builders import one_error_line, run_cli
from hubserver import FakeHub, use_hub

from qwen_merge import AdapterError, FormatError, HubError, merge_shards, plan_merge
from qwen_merge.cli import main

MISTYPED = "bases/dense_untiedd"


@pytest.fixture
def hub(demo_inputs, tmp_path, monkeypatch):
    base, adapter = demo_inputs
    with FakeHub() as server:
        server.add_repo("org/tiny-base", base)
        server.add_repo("org/tiny-lora", adapter)
        use_hub(monkeypatch, server, tmp_path / "hf-cache", home=tmp_path / "hf-home", fast_retries=True)
        server.cache = tmp_path / "hf-cache"
        yield server


def cli(capsys, *args: object) -> SimpleNamespace:
    """`qwen-merge <args>` in-process: exit status, stdout, stderr."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def error_line(proc: SimpleNamespace) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# -- a mistyped path ---------------------------------------------------------------------------------------

def test_a_mistyped_path_says_no_folder_here_and_no_hub_repo(hub, demo_inputs, tmp_path, monkeypatch, capsys):
    base, adapter = demo_inputs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bases").mkdir()
    both = f"{MISTYPED}: no file or folder of that name in {tmp_path}, and "
    with pytest.raises(HubError) as found:
        plan_merge(MISTYPED, adapter)
    assert str(found.value).startswith(both + "no such repository on the Hub, or it is private: check the path")
    with pytest.raises(HubError, match=f"^adapters/my-loraa: no file or folder of that name in {tmp_path}, and no"):
        plan_merge(base, "adapters/my-loraa")
    assert error_line(cli(capsys, "plan", MISTYPED, adapter)) == f"error: {found.value}"
    hub.offline_all()  # the Hub cannot be reached
    with pytest.raises(HubError) as unreachable:
        merge_shards(MISTYPED, adapter, tmp_path / "out", progress=False)
    assert str(unreachable.value).startswith(both + "as a Hub repo id it is not in the Hugging Face cache")
    assert "the Hub cannot be reached" in str(unreachable.value)
    assert not (tmp_path / "out").exists()


def test_a_mistyped_path_offline_through_the_cli(demo_inputs, tmp_path, monkeypatch):
    base, adapter = demo_inputs
    use_hub(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf-cache", home=tmp_path / "hf-home", offline=True)
    line = one_error_line(run_cli("merge", MISTYPED, adapter, tmp_path / "out", cwd=tmp_path))
    assert line.startswith(f"error: {MISTYPED}: no file or folder of that name in {tmp_path}, and as a Hub repo "
                           f"id it is not in the Hugging Face cache ({tmp_path / 'hf-cache'}) and offline mode is on")
    with pytest.raises(HubError, match="no file or folder of that name in .* offline mode is on"):
        plan_merge(base, "adapters/my-loraa")


@pytest.mark.parametrize("name", ["./bases/dense_untiedd", "bases/dense/untiedd", "/no/such/model", "~/model"])
def test_a_name_that_is_no_repo_id_says_no_such_file_or_folder(demo_inputs, tmp_path, monkeypatch, capsys, name):
    base, adapter = demo_inputs
    monkeypatch.chdir(tmp_path)
    where = "" if name.startswith("/") else f" in {tmp_path}"
    shown = re.escape(str(Path(name)))  # as the path reads once normalized: ./x is x
    with pytest.raises(FormatError, match=f"^{shown}: base model not found: no such file or folder{where}$"):
        plan_merge(name, adapter)
    with pytest.raises(AdapterError, match=f"adapter folder not found: no such file or folder{where}$"):
        plan_merge(base, name)
    line = error_line(cli(capsys, "merge", base, name, tmp_path / "out"))
    assert line.endswith(f"adapter folder not found: no such file or folder{where}") and "Hub" not in line
