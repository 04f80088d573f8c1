"""What a new user sees: argument mistakes, the demo's paths, units, resume messages, progress in logs.

Each test runs the command line (a real subprocess, or `qwen_merge.cli.main([...])` in-process) and checks
stdout, stderr and the exit status.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from builders import cli_argv, cli_env, run_cli, tree_hash

from qwen_merge import merge_shards
from qwen_merge.cli import main
from qwen_merge.progress import PlainProgress, progress_bar
from qwen_merge.sinks.folder import FolderSink
from qwen_merge.sinks.output import check_free_space, partial_folder_of, write_error
from qwen_merge.units import human_bytes


def error_and_usage(text: str, command: str | None) -> str:
    """The `error: ...` line, checking that only the usage of `command` (or the top level) follows it."""
    lines = text.splitlines()
    assert lines and lines[0].startswith("error: "), text
    assert sum(line.startswith("error") for line in lines) == 1, text
    usage = f"usage: qwen-merge {command} " if command else "usage: qwen-merge [-h]"
    assert len(lines) > 1 and lines[1].startswith(usage), text
    assert all(line.startswith(" ") for line in lines[2:]), f"more than the usage after the error: {text!r}"
    assert "Traceback" not in text
    return lines[0]


# ---------------------------------------------------------------------------------- 1. argument mistakes

def test_mistyped_flag_is_one_error_line_with_a_hint_and_the_subcommand_usage(tmp_path):
    proc = run_cli("merge", "a", "b", "c", "--overwirte", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    line = error_and_usage(proc.stderr, "merge")
    assert "--overwirte" in line and "did you mean --overwrite?" in line, line
    assert proc.stdout == ""


@pytest.mark.parametrize("argv, command, says", [
    (["merge", "a", "b"], "merge", "required: out"),
    (["verify", "out", "--base", "b"], "verify", "--adapter"),
    (["plan", "a", "b", "--detial"], "plan", "did you mean --detail?"),
    (["plan", "a", "b", "--rounding", "pef"], "plan", "did you mean peft?"),
    (["--debug", "merge", "a", "b", "c", "--resme"], "merge", "did you mean --resume?"),
    (["demo", "a"], "demo", "unrecognized argument: a"),
    (["mrge", "a", "b", "c"], None, "did you mean merge?"),
    ([], None, "required: command"),
])
def test_argument_mistakes(capsys, argv, command, says):
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert says in error_and_usage(captured.err, command), captured.err
    assert captured.out == ""


def test_no_hint_when_nothing_is_close(capsys):
    assert main(["merge", "a", "b", "c", "--zzzzzz"]) == 1
    line = error_and_usage(capsys.readouterr().err, "merge")
    assert "did you mean" not in line, line


def test_help_still_exits_0(tmp_path):
    proc = run_cli("merge", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: qwen-merge merge") and "--overwrite" in proc.stdout
    assert proc.stderr == ""


def test_debug_before_the_subcommand_shows_a_traceback(zoo, tmp_path):
    base, adapter = zoo.pair("basic")
    proc = run_cli("--debug", "merge", base, adapter, base, cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "OutputError" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------- 2. demo

@pytest.mark.slow  # the whole demo in a child process
def test_demo_prints_no_deleted_paths(tmp_path):
    proc = run_cli("demo", "--quiet", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "qwen-merge-demo-" not in proc.stdout and "/" not in proc.stdout.replace("(alpha/r)", ""), proc.stdout
    assert "temporary" in proc.stdout and "--keep DIR" in proc.stdout, proc.stdout
    assert re.search(r"bf16 model \(\d+(\.\d+)? kB\)", proc.stdout), proc.stdout


@pytest.mark.slow  # the whole demo in a child process
def test_demo_keep_prints_the_kept_paths(tmp_path):
    keep = tmp_path / "kept"
    proc = run_cli("demo", "--quiet", "--keep", keep, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"into {keep / 'merged'}" in proc.stdout, proc.stdout
    assert (keep / "merged" / "qwen_merge.json").is_file()
    assert "temporary" not in proc.stdout


def test_demo_keep_refuses_a_used_folder(capsys, tmp_path):
    (tmp_path / "base").mkdir()
    assert main(["demo", "--quiet", "--keep", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--keep" in err, err


# --------------------------------------------------------------------------------------------- 3. units

@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (999, "999 B"), (1000, "1.00 kB"), (1234, "1.23 kB"), (9995, "10.0 kB"),
    (220_000, "220 kB"), (999_499, "999 kB"), (999_500, "1.00 MB"), (1_870_000_000, "1.87 GB"),
    (8_040_000_000, "8.04 GB"), (12_300_000_000_000, "12.3 TB"), (5 * 10**15, "5000 TB"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_merge_summary_uses_human_units(zoo, capsys, tmp_path):
    base, adapter = zoo.pair("basic")
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    written = sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert f"wrote {human_bytes(written)} in " in out, out


def test_space_messages_give_human_units_and_exact_bytes(monkeypatch, tmp_path):
    monkeypatch.setattr("qwen_merge.sinks.output.free_bytes", lambda _: 1_500_000)
    with pytest.raises(Exception, match=r"writes 2\.00 MB \(2000000 bytes\) but only 1\.50 MB \(1500000 bytes\)"):
        check_free_space(tmp_path, 2_000_000)
    message = str(write_error(tmp_path / "x", OSError(errno.ENOSPC, "No space left on device")))
    assert "1.50 MB (1500000 bytes) free" in message, message


# ----------------------------------------------------------------------------------- 4. changed resume

def interrupt(monkeypatch, base: Path, adapter: Path, dest: Path, **options) -> Path:
    """A merge killed after it wrote its resume state: Ctrl-C during the first shard."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(FolderSink, "consume", killed)
        with pytest.raises(KeyboardInterrupt):
            merge_shards(base, adapter, dest, progress=False, **options)
    assert partial_folder_of(dest).is_dir()
    return partial_folder_of(dest)


def one_error(capsys) -> str:
    """The one `error: ...` line of the last command (call `capsys.readouterr()` after building inputs:
    the fixtures print transformers progress bars)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_resume_names_the_changed_option(zoo, monkeypatch, capsys, tmp_path):
    base, adapter = zoo.pair("basic")
    partial = interrupt(monkeypatch, base, adapter, tmp_path / "out")
    capsys.readouterr()
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out"), "--resume", "--rounding", "peft"]) == 1
    line = one_error(capsys)
    assert str(partial) in line and "option rounding changed: 'single' -> 'peft'" in line, line


def test_resume_names_the_changed_base_file_and_adapter(zoo, monkeypatch, capsys, tmp_path):
    base = Path(shutil.copytree(zoo.pair("basic")[0], tmp_path / "base"))
    adapter = Path(shutil.copytree(zoo.pair("basic")[1], tmp_path / "adapter"))
    interrupt(monkeypatch, base, adapter, tmp_path / "out")
    config = (base / "config.json").read_bytes()
    (base / "config.json").unlink()  # same bytes, a new file: another inode and mtime
    (base / "config.json").write_bytes(config)
    (adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text() + "\n")
    capsys.readouterr()
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out"), "--resume", "--quiet"]) == 1
    line = one_error(capsys)
    assert re.search(r"base file config\.json changed \((mtime, inode|inode|mtime)\)", line), line
    assert "adapter_config.json changed" in line, line
    assert not re.search(r"option \w+ changed|size|adapter weights", line), f"names a change that is not: {line}"


# ------------------------------------------------------------------------------ 5. resume when finished

def test_resume_on_a_finished_merge_says_so(zoo, capsys, tmp_path):
    base, adapter = zoo.pair("basic")
    out = tmp_path / "out"
    merge_shards(base, adapter, out, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["merge", str(base), str(adapter), str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "already complete" in captured.out and "nothing to resume" in captured.out, captured.out
    assert "not empty" not in captured.out + captured.err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before, "a finished merge was rewritten"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert merge_shards(base, adapter, out, progress=False, resume=True).already_complete


def test_resume_on_another_finished_merge_names_the_difference(zoo, capsys, tmp_path):
    base, adapter = zoo.pair("basic")
    out = tmp_path / "out"
    merge_shards(base, adapter, out, progress=False)
    before = tree_hash(out)
    capsys.readouterr()
    assert main(["merge", str(base), str(adapter), str(out), "--resume", "--rounding", "peft"]) == 1
    line = one_error(capsys)
    assert "option rounding changed: 'single' -> 'peft'" in line and "--overwrite" in line, line
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    assert main(["merge", str(base), str(adapter), str(out), "--resume"]) == 1
    line = one_error(capsys)
    assert str(shard) in line and "missing" in line, line
    assert main(["merge", str(base), str(adapter), str(out), "--resume", "--overwrite", "--quiet"]) == 0
    assert tree_hash(out) == before


def test_resume_on_an_unrelated_folder_is_refused(zoo, capsys, tmp_path):
    base, adapter = zoo.pair("basic")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["merge", str(base), str(adapter), str(out), "--resume"]) == 1
    line = one_error(capsys)
    assert "qwen_merge.json" in line and "--overwrite" in line, line
    assert os.listdir(out) == ["notes.txt"]


# --------------------------------------------------------------------------------------------- 6. progress

def test_progress_in_a_log_file_is_plain_lines(zoo, tmp_path):
    base, adapter = zoo.pair("basic")
    log = tmp_path / "log.txt"
    with open(log, "wb") as stderr:
        proc = subprocess.run(cli_argv("merge", base, adapter, tmp_path / "out"), cwd=tmp_path, env=cli_env(),
                              stdout=subprocess.PIPE,
                              stderr=stderr, timeout=300)
    assert proc.returncode == 0
    text = log.read_bytes()
    assert b"\r" not in text, text[:300]
    lines = text.decode().splitlines()
    assert lines and all(re.fullmatch(r"merging: \S+ [kMG]?B / \S+ [kMG]?B \(\d+%\)", x) for x in lines), lines
    assert lines[-1].endswith("(100%)") and len(lines) <= 12, lines


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_every_tenth_or_ten_seconds(tmp_path):
    clock, log = Clock(), tmp_path / "log"
    with open(log, "w") as stream, PlainProgress(10_000, "merging", stream, clock=clock) as bar:
        bar.update(500)    # 5%: no line yet
        clock.now = 11.0
        bar.update(1)      # 10 s later: a line
        bar.update(999)    # 15%: not yet another 10% since that line
        bar.update(600)    # 21%: a line
        bar.update(7_900)  # the rest, then the final line is not repeated
    assert log.read_text().splitlines() == ["merging: 501 B / 10.0 kB (5%)", "merging: 2.10 kB / 10.0 kB (21%)",
                                            "merging: 10.0 kB / 10.0 kB (100%)"]


def test_progress_bar_is_tqdm_on_a_terminal_only(tmp_path):
    class Terminal:
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            pass

    with open(tmp_path / "log", "w") as stream:
        assert isinstance(progress_bar(10, "merging", stream=stream), PlainProgress)
    with progress_bar(10, "merging", stream=Terminal()) as bar:
        assert not isinstance(bar, PlainProgress)
        bar.update(10)
