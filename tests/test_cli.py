"""The command line, run as a real subprocess: `python -m qwen_merge ...`."""

from __future__ import annotations

import os

import pytest
from builders import one_error_line, run_cli, tree_hash

from qwen_merge import merge_shards, plan_merge


def test_plan_prints_counts(zoo, tmp_path):
    base, adapter = zoo.pair("basic")
    plan = plan_merge(base, adapter)
    proc = run_cli("plan", base, adapter, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert str(len(plan.merges)) in proc.stdout, proc.stdout
    assert str(plan.copied) in proc.stdout, proc.stdout
    assert os.listdir(tmp_path) == [], "plan wrote files"


def test_plan_detail_lists_tensors(zoo, tmp_path):
    base, adapter = zoo.pair("patterns")
    plan = plan_merge(base, adapter)
    proc = run_cli("plan", base, adapter, "--detail", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for m in plan.merges:
        assert m.name in proc.stdout, m.name


def test_merge_quiet(zoo, tmp_path):
    base, adapter = zoo.pair("basic")
    before = (tree_hash(base), tree_hash(adapter))
    out = tmp_path / "cli_out"
    proc = run_cli("merge", base, adapter, out, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"--quiet printed on stderr: {proc.stderr!r}"
    reference = tmp_path / "api_out"
    merge_shards(base, adapter, reference, progress=False)
    assert tree_hash(out) == tree_hash(reference), "CLI output differs from merge_shards output"
    assert (tree_hash(base), tree_hash(adapter)) == before
    assert sorted(os.listdir(tmp_path)) == ["api_out", "cli_out"]


def test_merge_shows_progress_and_overwrite(zoo, tmp_path):
    base, adapter = zoo.pair("gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("x")
    proc = run_cli("merge", base, adapter, out, cwd=tmp_path)
    one_error_line(proc)  # non-empty folder without --overwrite
    assert (out / "stale").exists()
    proc = run_cli("merge", base, adapter, out, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip(), "no progress on stderr without --quiet"
    assert "\r" not in proc.stderr, "progress redrew a bar (carriage returns) into a pipe"
    assert not (out / "stale").exists()
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()


@pytest.mark.parametrize("case", ["dest_is_base", "missing_base", "missing_adapter_config", "peft_type"])
def test_user_error_is_one_line(zoo, tmp_path, case):
    base, adapter = zoo.pair("basic")
    out = tmp_path / "out"
    if case == "dest_is_base":
        args = ("merge", base, adapter, base)
    elif case == "missing_base":
        args = ("merge", tmp_path / "no_such_model", adapter, out)
    elif case == "missing_adapter_config":
        bad = tmp_path / "adapter"
        bad.mkdir()
        (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        args = ("merge", base, bad, out)
    else:
        bad = tmp_path / "adapter"
        bad.mkdir()
        (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        text = (adapter / "adapter_config.json").read_text().replace('"LORA"', '"LOKR"')
        (bad / "adapter_config.json").write_text(text)
        args = ("merge", base, bad, out)
    before = tree_hash(base)
    proc = run_cli(*args, cwd=tmp_path)
    line = one_error_line(proc)
    if case == "missing_adapter_config":
        assert "adapter_config.json" in line
    if case == "peft_type":
        assert "LOKR" in line or "peft_type" in line
    assert not out.exists()
    assert tree_hash(base) == before
    # the same error through `plan`
    if case != "dest_is_base":
        one_error_line(run_cli("plan", *args[1:3], cwd=tmp_path))


def test_debug_shows_traceback(zoo, tmp_path):
    base, adapter = zoo.pair("basic")
    proc = run_cli("merge", base, adapter, base, "--debug", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr, proc.stderr
    assert "OutputError" in proc.stderr, proc.stderr


@pytest.mark.slow  # the whole demo in a child process
def test_demo(tmp_path):
    proc = run_cli("demo", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip(), "demo printed nothing"
    assert os.listdir(tmp_path) == [], "demo left files in the working directory"
