"""`plan`, `merge` and `verify` agree with each other, from the command line and from Python.

* `plan` refuses what `merge` refuses: an adapter the base's manifest says is merged into it already
  (AlreadyMergedError), with the same `force` / `--force` escape.
* `verify` takes the options of the merge from the output's manifest; an option given that differs from
  the recorded one is one error naming both.
* `plan`'s output size is the bytes `merge` writes: one figure, computed in one place.
* `plan --json` / `report.to_dict(plan)`: every tensor, the totals `plan` prints, memory, disk, downloads.
* `--dtype` takes the names `dtype=` takes; an option error names the flag on the command line and the
  keyword from Python; `plan ... | head` ends quietly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from builders import locate, one_error_line, run_cli, start_cli

from qwen_merge import AlreadyMergedError, OptionError, merge_shards, plan_merge, verify_merge
from qwen_merge.cli import BROKEN_PIPE_STATUS, main
from qwen_merge.dtypes import DTYPE_NAMES, DTYPE_OF_NAME
from qwen_merge.planning.manifest import output_files
from qwen_merge.report import render, to_dict
from qwen_merge.units import human_bytes

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def merged_demo(demo_merged) -> Path:
    """The demo base merged with the demo adapter, with its manifest: a base that already holds the adapter."""
    return demo_merged


def error_line(capsys) -> str:
    """The one stderr line of an in-process `main` that failed with a user error."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# -- plan raises what merge raises ----------------------------------------------------------------------


def test_plan_refuses_an_adapter_already_merged_into_the_base_as_merge_does(merged_demo, demo_inputs, tmp_path):
    _, adapter = demo_inputs
    with pytest.raises(AlreadyMergedError) as planned:
        plan_merge(merged_demo, adapter)
    with pytest.raises(AlreadyMergedError) as merged:
        merge_shards(merged_demo, adapter, tmp_path / "twice", progress=False)
    assert str(planned.value) == str(merged.value) and "already merged with this adapter" in str(planned.value)
    assert not (tmp_path / "twice").exists()
    plan = plan_merge(merged_demo, adapter, force=True)
    assert len(plan.merges) == 28


def test_plan_on_the_command_line_refuses_it_too_and_force_plans(merged_demo, demo_inputs, tmp_path):
    _, adapter = demo_inputs
    line = one_error_line(run_cli("plan", merged_demo, adapter, cwd=tmp_path))
    assert "already merged with this adapter" in line and "--force" in line, line
    proc = run_cli("plan", merged_demo, adapter, "--force", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "merged:  28 tensors" in proc.stdout


def test_planning_into_a_base_without_a_manifest_reads_no_adapter_bytes(demo_inputs, monkeypatch):
    """The double-merge check hashes the adapter only when the base records merged adapters."""
    import qwen_merge.planning.manifest as manifest_module

    def no_hash(path):
        raise AssertionError(f"{path} was hashed while planning")

    monkeypatch.setattr(manifest_module, "sha256_file", no_hash)
    assert plan_merge(*demo_inputs).merges


# -- verify reads the options from the manifest ---------------------------------------------------------


def test_verify_takes_dtype_and_max_shard_size_from_the_manifest(zoo):
    base, adapter = zoo.pair("basic_fp32_base")
    for options in ({"dtype": "bfloat16"}, {"max_shard_size": "60KB"}):
        out = zoo.merged("basic_fp32_base", **options).out
        report = verify_merge(out, base, adapter)
        assert report.ok, (options, report.problems)
        proc = run_cli("verify", out, "--base", base, "--adapter", adapter)
        assert proc.returncode == 0, (options, proc.stdout + proc.stderr)
        assert proc.stdout.startswith("verify: OK"), proc.stdout
        # the same value, spelled otherwise, is no conflict
        assert verify_merge(out, base, adapter, **{k: v.upper() for k, v in options.items()}).ok


def test_verify_without_the_manifest_checks_with_the_options_given(zoo, tmp_path):
    """What the manifest now answers: the same folder without it fails with the default options (the issue's
    false problems) and passes with the merge's."""
    base, adapter = zoo.pair("basic_fp32_base")
    out = Path(shutil.copytree(zoo.merged("basic_fp32_base", dtype="bfloat16").out, tmp_path / "out"))
    (out / "qwen_merge.json").unlink()
    assert len(verify_merge(out, base, adapter).problems) > 10
    assert verify_merge(out, base, adapter, dtype="bfloat16").ok


def test_a_damaged_output_still_fails_with_the_recorded_options(zoo, tmp_path):
    base, adapter = zoo.pair("basic_fp32_base")
    out = Path(shutil.copytree(zoo.merged("basic_fp32_base", dtype="bfloat16").out, tmp_path / "out"))
    path, start, _ = locate(out, Q0)
    data = bytearray(path.read_bytes())
    data[start + 1] ^= 0x40
    path.write_bytes(bytes(data))
    report = verify_merge(out, base, adapter)
    assert not report.ok and len(report.problems) == 1 and Q0 in report.problems[0], report.problems
    proc = run_cli("verify", out, "--base", base, "--adapter", adapter)
    assert proc.returncode == 1 and Q0 in proc.stdout


def test_an_option_that_contradicts_the_manifest_is_one_error_naming_both(zoo, capsys):
    base, adapter = zoo.pair("basic_fp32_base")
    out = zoo.merged("basic_fp32_base", dtype="bfloat16").out
    manifest = out / "qwen_merge.json"
    with pytest.raises(OptionError) as info:
        verify_merge(out, base, adapter, dtype="float16")
    assert str(info.value).startswith(f"dtype: 'float16' given, but {manifest} records 'bfloat16'"), info.value
    assert main(["verify", str(out), "--base", str(base), "--adapter", str(adapter), "--dtype", "fp16"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: --dtype: 'float16' given, but {manifest} records 'bfloat16'"), line
    assert main(["verify", str(out), "--base", str(base), "--adapter", str(adapter), "--max-shard-size", "1MB"]) == 1
    assert error_line(capsys).startswith(f"error: --max-shard-size: 1000000 given, but {manifest} records None")


def test_an_unreadable_manifest_is_a_problem_and_the_options_given_are_used(demo_inputs, merged_demo, tmp_path):
    out = Path(shutil.copytree(merged_demo, tmp_path / "out"))
    (out / "qwen_merge.json").write_text('{"options": {"dtype": "int8"}}\n')
    report = verify_merge(out, *demo_inputs)
    assert not report.ok and len(report.problems) == 1, report.problems
    assert "qwen_merge.json: the options of the merge cannot be read" in report.problems[0]
    assert "'int8' is not an output dtype" in report.problems[0]


# -- one figure for the output's size --------------------------------------------------------------------


@pytest.mark.slow  # merges through the command line
@pytest.mark.parametrize("options", [{}, {"dtype": "float32", "max_shard_size": "100KB"}])
def test_the_planned_output_size_is_the_bytes_merge_writes(demo_inputs, tmp_path, options):
    """`--dtype` rewrites config.json, `--max-shard-size` adds files: every file is counted as written."""
    base, adapter = demo_inputs
    plan = plan_merge(base, adapter, **options)
    report = merge_shards(base, adapter, tmp_path / "api", progress=False, **options)
    on_disk = {p.name: p.stat().st_size for p in (tmp_path / "api").iterdir()}
    assert output_files(plan) == on_disk
    assert plan.output_bytes == report.bytes_written == sum(on_disk.values())

    flags = [x for key, value in options.items() for x in (f"--{key.replace('_', '-')}", value)]
    planned = run_cli("plan", base, adapter, *flags, cwd=tmp_path)
    merged = run_cli("merge", base, adapter, tmp_path / "cli", *flags, cwd=tmp_path)
    assert planned.returncode == 0 and merged.returncode == 0, planned.stderr + merged.stderr
    size = re.search(r"^output:  (\S+ \S+) in (\d+) files", planned.stdout, re.M)
    wrote = re.search(r"wrote (\S+ \S+) in (\d+) files", merged.stdout)
    assert size and wrote and size.groups() == wrote.groups() == (human_bytes(plan.output_bytes), str(len(on_disk)))


# -- plan --json ------------------------------------------------------------------------------------------


def test_plan_json_is_to_dict_and_agrees_with_the_text(demo_inputs, capsys):
    base, adapter = demo_inputs
    plan = plan_merge(base, adapter)
    assert main(["plan", str(base), str(adapter), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == to_dict(plan)

    text = render(plan)
    totals = document["totals"]
    assert f"merged:  {totals['merged']} tensors" in text and f"copied:  {totals['copied']} tensors" in text
    output = document["output"]
    assert f"output:  {human_bytes(output['bytes'])} in {len(output['files'])} files" in text
    assert f"predicted peak memory: {document['memory']['predicted_peak_bytes'] / 2**20:.0f} MiB" in text
    assert output["bytes"] == plan.output_bytes == sum(output["files"].values())
    assert document["disk"] == {"needed_bytes": output["bytes"], "low_disk_needed_bytes": None}
    assert document["downloads"] is None and document["base"]["hub"] is None

    tensors = document["tensors"]
    stored = [e.name for s in plan.shards for e in s.entries]
    assert [t["name"] for t in tensors] == stored and totals["tensors"] == len(stored)
    assert totals["actions"] == {"copy": plan.copied, "merge": len(plan.merges)}
    merges = {op.name: op for op in plan.merges}
    for tensor in tensors:
        op = merges.get(tensor["name"])
        assert tensor["action"] == ("merge" if op else "copy")
        assert (tensor["delta"] is None) == (op is None)
        if op:
            assert (tensor["delta"]["rank"], tensor["delta"]["scale"], tensor["shard"]) == (op.rank, op.scale, op.shard)
            assert tensor["delta"]["kind"] == "linear" and tensor["source"]["adapter"] is False


def test_plan_json_with_a_dtype_lists_each_conversion(demo_inputs, capsys):
    base, adapter = demo_inputs
    assert main(["plan", str(base), str(adapter), "--json", "--dtype", "float32"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["options"]["dtype"] == "F32" and document["config"]["torch_dtype"] == "float32"
    assert document["totals"]["actions"] == {"convert": 19, "merge": 28}
    converted = [t for t in document["tensors"] if t["action"] == "convert"]
    assert all(t["dtype"] == "F32" and t["source"]["dtype"] == "BF16" for t in converted)


# -- dtype names, option errors, a closed pipe --------------------------------------------------------------


def test_dtype_accepts_the_same_names_on_the_command_line_and_in_python(demo_inputs, capsys):
    base, adapter = demo_inputs
    names = [*DTYPE_OF_NAME, *DTYPE_NAMES, "torch.bfloat16", "BFloat16", "FP16"]
    for name in names:
        stored = plan_merge(base, adapter, dtype=name).options.dtype
        assert main(["plan", str(base), str(adapter), "--dtype", name, "--json"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["options"]["dtype"] == stored, name
    proc = run_cli("plan", "--help")
    help_text = " ".join(proc.stdout.split())
    assert all(name in help_text for name in [*DTYPE_OF_NAME, *DTYPE_NAMES]), help_text


def test_option_errors_name_the_flag_on_the_command_line_and_the_keyword_in_python(demo_inputs, capsys):
    base, adapter = demo_inputs
    for keyword, flag, value, says in (("max_shard_size", "--max-shard-size", "3XB", "'3XB' is not a size"),
                                       ("dtype", "--dtype", "int8", "'int8' is not an output dtype"),
                                       ("tokenizer", "--tokenizer", "", "must be one of auto, base, adapter")):
        with pytest.raises(OptionError) as info:
            plan_merge(base, adapter, **{keyword: value})
        assert str(info.value).startswith(f"{keyword}: {says}"), info.value
        assert main(["plan", str(base), str(adapter), flag, value]) == 1
        line = error_line(capsys)
        assert line.startswith(f"error: {flag}: {says}") and f" {keyword}:" not in line, line
    line = one_error_line(run_cli("merge", base, adapter, "unused", "--dtype", "fp8"))
    assert line.startswith("error: --dtype: 'fp8' is not an output dtype; expected one of bfloat16 (bf16, BF16)")


def test_plan_detail_and_json_exclude_each_other(demo_inputs, capsys):
    assert main(["plan", *map(str, demo_inputs), "--detail", "--json"]) == 1
    assert "not allowed with argument" in capsys.readouterr().err


def test_plan_into_a_closed_pipe_ends_quietly(demo_inputs):
    """`qwen-merge plan ... | head -2`: the reader is gone before plan writes (a real pipe, closed at once)."""
    proc = start_cli("plan", *demo_inputs, "--detail")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == BROKEN_PIPE_STATUS == 141, err
    assert err == "", err


def test_main_into_a_closed_pipe_returns_141_without_a_traceback(demo_inputs, monkeypatch, capsys):
    read, write = os.pipe()
    os.close(read)
    with open(write, "w") as closed:
        monkeypatch.setattr("sys.stdout", closed)
        assert main(["plan", *map(str, demo_inputs), "--json"]) == BROKEN_PIPE_STATUS
        monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_a_pipe_that_reads_everything_still_exits_0(demo_inputs):
    proc = start_cli("plan", *demo_inputs)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out and err == b"", err


def test_the_documented_plan_json_has_the_keys_to_dict_gives(demo_inputs):
    """docs/usage.md's example of `plan --json` is a real document's shape: the same keys at every level."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "usage.md").read_text()
    example = json.loads(re.search(r"### `plan --json`.*?```json\n(.*?)```", text, re.S)[1])
    document = to_dict(plan_merge(*demo_inputs))
    assert example.keys() == document.keys()
    for key in ("base", "adapter", "options", "totals", "output", "memory", "disk"):
        assert example[key].keys() == document[key].keys(), key
    copy, merge = example["tensors"]
    first_merge = next(t for t in document["tensors"] if t["action"] == "merge")
    assert copy.keys() == merge.keys() == first_merge.keys()
    assert merge["delta"].keys() == first_merge["delta"].keys()
