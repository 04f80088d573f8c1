"""What the names given as BASE and ADAPTER mean: a mistyped path that could also be a Hub repo id, the base
model the adapter's config names (a note when it is another one), and BASE omitted (taken from there).

Hub lookups go to the local fake Hub (tests/hubserver.py) or the offline cache; nothing else is reached.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from builders import ADAPTER_CFG, DROP, copy_tree, edit_json
from builders import in_process_cli as cli
from builders import in_process_error_line as error_line
from builders import one_error_line, run_cli, tree_hash
from hubserver import FakeHub, use_hub

from qwen_merge import AdapterError, FormatError, HubError, base_of, merge_shards, plan_merge
from qwen_merge.report import render

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


def with_field(adapter: Path, folder: Path, **fields: object) -> Path:
    """A copy of `adapter` whose adapter_config.json has these fields (DROP removes one)."""
    copy = copy_tree(adapter, folder)
    edit_json(copy / ADAPTER_CFG, fields)
    return copy


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


# -- the base the adapter names ----------------------------------------------------------------------------

def test_no_note_when_the_adapter_names_base(zoo, tmp_path):
    base, adapter = zoo.pair("basic")
    assert json.loads((adapter / ADAPTER_CFG).read_text())["base_model_name_or_path"] == str(base)
    assert plan_merge(base, adapter).notes == ()
    same_name = with_field(adapter, tmp_path / "a", base_model_name_or_path=f"someone/{base.name}")
    assert plan_merge(base, same_name).notes == ()  # a local copy of that repo, by its folder name
    plan = plan_merge(base, with_field(adapter, tmp_path / "b", base_model_name_or_path=DROP))
    assert plan.notes == () and "note:" not in render(plan)


@pytest.mark.parametrize("named, says", [
    ("Qwen/Qwen3-4B", "the adapter was trained on Qwen/Qwen3-4B (base_model_name_or_path in adapter_config.json), "
                      "another model than BASE {base}"),
    ("unsloth/{name}-bnb-4bit", "the adapter was trained on unsloth/{name}-bnb-4bit (base_model_name_or_path in "
                                "adapter_config.json), a quantized copy of BASE; its merge into BASE's unquantized "
                                "weights is the usual way"),
])
def test_a_note_when_the_adapter_names_another_model(zoo, tmp_path, capsys, named, says):
    base, adapter = zoo.pair("basic")
    named, says = named.format(name=base.name), says.format(name=base.name, base=base)
    other = with_field(adapter, tmp_path / "adapter", base_model_name_or_path=named)
    plan = plan_merge(base, other)
    assert plan.notes == (says,)
    assert f"note:    {says}" in render(plan).splitlines()[2]
    assert f"note:    {says}" in cli(capsys, "plan", base, other).stdout
    merged = cli(capsys, "merge", base, other, tmp_path / "out")
    assert merged.returncode == 0 and merged.stderr.startswith(f"note: {says}\n")
    quiet = cli(capsys, "merge", base, other, tmp_path / "quiet", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert merge_shards(base, other, tmp_path / "python", progress=False).plan.notes == (says,)


def test_a_hub_base_at_another_revision_than_the_adapter_names(hub, demo_inputs, tmp_path):
    adapter = with_field(demo_inputs[1], tmp_path / "adapter", base_model_name_or_path="org/tiny-base",
                         revision="v0")
    plan = plan_merge("org/tiny-base", adapter)
    assert plan.notes == (f"the adapter was trained on org/tiny-base at revision v0 (adapter_config.json); BASE is "
                          f"commit {hub.commit_of('org/tiny-base')[:12]}",)
    same = with_field(demo_inputs[1], tmp_path / "same", base_model_name_or_path="ORG/Tiny-Base", revision="main")
    assert plan_merge("org/tiny-base", same).notes == ()


# -- BASE omitted --------------------------------------------------------------------------------------------

def test_base_omitted_is_the_model_the_adapter_names(zoo, tmp_path, capsys):
    base, adapter = zoo.pair("basic")
    assert base_of(adapter) == str(base)
    assert base_of(adapter / ADAPTER_CFG) == str(base)
    reference = merge_shards(base, adapter, tmp_path / "given", progress=False)
    report = merge_shards(None, adapter, tmp_path / "omitted", progress=False)
    assert tree_hash(tmp_path / "omitted") == tree_hash(tmp_path / "given")
    assert report.plan.base.root == reference.plan.base.root
    note = f"BASE is {base}, the adapter's base_model_name_or_path (adapter_config.json)"
    assert report.plan.notes == (note,)
    planned = cli(capsys, "plan", adapter)
    assert planned.returncode == 0 and f"base:    {base}  " in planned.stdout and f"note:    {note}" in planned.stdout
    merged = run_cli("merge", adapter, tmp_path / "cli", cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert merged.stderr.startswith(f"note: {note}\n")
    assert tree_hash(tmp_path / "cli") == tree_hash(tmp_path / "given")


def test_base_omitted_with_a_hub_base_and_revision(hub, demo_inputs, tmp_path, capsys):
    adapter = with_field(demo_inputs[1], tmp_path / "adapter", base_model_name_or_path="org/tiny-base",
                         revision=hub.commit_of("org/tiny-base"))
    assert base_of(adapter) == f"org/tiny-base@{hub.commit_of('org/tiny-base')}"
    report = merge_shards(None, adapter, tmp_path / "omitted", progress=False)
    assert report.plan.base.hub.repo_id == "org/tiny-base"
    merge_shards(demo_inputs[0], adapter, tmp_path / "given", progress=False)
    ours, theirs = tree_hash(tmp_path / "omitted"), tree_hash(tmp_path / "given")
    assert ours.pop("qwen_merge.json") != theirs.pop("qwen_merge.json")  # the manifest names the Hub commit
    assert ours == theirs
    hub.add_repo("org/named-lora", adapter)  # an adapter repo: its config is fetched
    assert base_of("org/named-lora") == base_of(adapter)
    merge_shards(None, "org/named-lora", tmp_path / "all-hub", progress=False)
    all_hub = tree_hash(tmp_path / "all-hub")
    all_hub.pop("qwen_merge.json")
    assert all_hub == theirs
    missing = with_field(demo_inputs[1], tmp_path / "missing", base_model_name_or_path="org/gone")
    line = error_line(cli(capsys, "merge", missing, tmp_path / "out"))
    assert line.startswith("error: org/gone: no file or folder of that name in ")
    assert line.endswith(f"(BASE taken from base_model_name_or_path in {missing / ADAPTER_CFG}; give BASE before "
                         f"ADAPTER to use another)")


@pytest.mark.parametrize("field, says", [
    (DROP, "base_model_name_or_path is missing"),
    ("", "base_model_name_or_path is empty"),
    ("/home/trainer/Qwen3-8B", "base_model_name_or_path '/home/trainer/Qwen3-8B' is neither a file or folder here"),
])
def test_base_omitted_but_the_adapter_names_none(zoo, tmp_path, capsys, field, says):
    adapter = with_field(zoo.adapter("basic"), tmp_path / "adapter", base_model_name_or_path=field)
    with pytest.raises(AdapterError, match=f"{says}.*give BASE before ADAPTER"):
        base_of(adapter)
    with pytest.raises(AdapterError, match=says):
        plan_merge(None, adapter)
    line = error_line(cli(capsys, "merge", adapter, tmp_path / "out"))
    assert says in line and "qwen-merge merge BASE ADAPTER OUT" in line
    assert not (tmp_path / "out").exists()


def test_two_arguments_that_are_not_adapter_and_out_are_a_missing_argument(zoo, tmp_path, capsys):
    base, _ = zoo.pair("basic")
    proc = cli(capsys, "merge", base, tmp_path / "out")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == "error: the following arguments are required: out"
    assert proc.stderr.splitlines()[1].startswith("usage: qwen-merge merge ")
    proc = cli(capsys, "plan", base)
    assert proc.stderr.splitlines()[0] == "error: the following arguments are required: adapter"
    assert not (tmp_path / "out").exists()
