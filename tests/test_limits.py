"""Resource limits (issue 5, items 4 and 6): memory and disk.

* Memory: `qwen-merge merge` runs under RLIMIT_DATA = 1 GiB on a model whose two shards are each larger
  than 1 GiB (1.125 GiB: a 640 MiB and a 512 MiB bf16 tensor; the LoRA touches three of the four), and
  succeeds, with sampled row blocks equal to W + s·B@A and the untouched tensor byte-identical. A guard
  shows the limit really bites: a child under it cannot hold one shard.
* Disk full, RLIMIT_FSIZE: the output files cannot grow past a small limit (SIGXFSZ ignored, so writes
  fail with EFBIG): exit 1, one `error:` line saying how many bytes were needed and how many are free,
  nothing at the destination, no partial folder.
* Disk full, tmpfs (when this machine lets root mount one; checked by a real attempt, else skipped): a
  merge larger than the filesystem is refused before anything is written, saying needed and free bytes;
  and a merge that passes that check but runs out of space while writing (ENOSPC) fails cleanly too.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from builders import (REPO, cli_argv, cli_env, locate, one_error_line, run_cli, run_python, ulp_distance,
                      write_linear_pair, writer_threads)
from safetensors import safe_open

from qwen_merge import DiskFullError, merge_shards, plan_merge

pytestmark = pytest.mark.slow  # gigabyte inputs and resource limits in child processes

GIB = 1 << 30
RANK, ALPHA = 16, 32  # scale 2
COLS = 16384
# shard -> [(tensor, rows, merged?)]; each shard is 640 MiB + 512 MiB = 1.125 GiB of bf16
BIG_SHARDS = {
    "model-00001-of-00002.safetensors": [("model.layers.0.mlp.up_proj.weight", 20480, True),
                                         ("model.layers.0.mlp.down_proj.weight", 16384, False)],
    "model-00002-of-00002.safetensors": [("model.layers.1.mlp.up_proj.weight", 20480, True),
                                         ("model.layers.1.mlp.down_proj.weight", 16384, True)],
}


def says_needed_and_free(message: str) -> bool:
    """Whether the message gives both numbers a user needs to act: bytes needed and bytes free."""
    return "free" in message.lower() and len(re.findall(r"\d+ bytes", message)) >= 2


def assert_says_needed_and_free(message: str) -> None:
    assert says_needed_and_free(message), f"does not say how many bytes were needed and how many are free: {message!r}"


def assert_clean(dest: Path) -> None:
    assert not dest.exists(), f"{dest} was created"
    leftovers = [p.name for p in dest.parent.iterdir() if "qwen-merge" in p.name or p.name.endswith(".part")]
    assert not leftovers, f"left beside the destination: {leftovers}"


# ------------------------------------------------------------------------------------------------ memory

@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """Two 1.125 GiB shards (written chunk by chunk, never held) and an adapter, written once; deleted when
    the module ends."""
    root = tmp_path_factory.mktemp("limits-big")
    base, adapter = root / "base", root / "adapter"
    factors = write_linear_pair(
        base, adapter, {shard: [(name, rows, COLS, merged) for name, rows, merged in tensors]
                        for shard, tensors in BIG_SHARDS.items()},
        rank=RANK, alpha=ALPHA, seed=11, factor_std=0.05, streamed=True, base_config={"model_type": "qwen3"},
        target_modules=["up_proj", "down_proj"])
    for shard in BIG_SHARDS:
        assert (base / shard).stat().st_size > GIB
    yield base, adapter, factors
    shutil.rmtree(root, ignore_errors=True)


def _limit_data() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (GIB, GIB))


def test_the_data_limit_bites():
    """Guard: under RLIMIT_DATA = 1 GiB a process cannot even hold one 1.125 GiB shard in memory."""
    child = run_python("bytearray(9 << 27)", preexec_fn=_limit_data, capture_output=True, text=True, timeout=60)
    assert child.returncode != 0 and "MemoryError" in child.stderr, child.stderr


def _sha256_range(path: Path, start: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while length:
            chunk = f.read(min(length, 1 << 24))
            assert chunk, "file ended early"
            digest.update(chunk)
            length -= len(chunk)
    return digest.hexdigest()


def test_merge_under_1gib_data_limit_with_shards_over_1gib(big_model, tmp_path):
    base, adapter, factors = big_model
    out = tmp_path / "out"
    log = tmp_path / "stderr.txt"
    try:
        with open(log, "w") as err:
            proc = subprocess.Popen(cli_argv("merge", base, adapter, out, "--quiet"), preexec_fn=_limit_data,
                                    stdout=err, stderr=err, env=cli_env(), cwd=REPO)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0, log.read_text()[-3000:]
        print(f"merged 2 x 1.125 GiB shards under RLIMIT_DATA = 1 GiB; child max RSS {usage.ru_maxrss / 1024:.0f} MiB")
        for shard in BIG_SHARDS:
            assert (out / shard).stat().st_size == (base / shard).stat().st_size

        scale = ALPHA / RANK
        for shard, tensors in BIG_SHARDS.items():
            with safe_open(base / shard, "pt") as b, safe_open(out / shard, "pt") as o:
                for name, rows, merged in tensors:
                    if not merged:
                        continue
                    module = "base_model.model." + name.removesuffix(".weight")
                    a, bf = factors[module + ".lora_A.weight"], factors[module + ".lora_B.weight"]
                    for row0 in (0, rows // 2 - 64, rows - 128):  # first, a middle and the last row block
                        w = b.get_slice(name)[row0:row0 + 128]
                        got = o.get_slice(name)[row0:row0 + 128]
                        want = (w.float() + (bf[row0:row0 + 128] @ a) * scale).to(torch.bfloat16)
                        ulps = ulp_distance(want, got)
                        assert int(ulps.max()) <= 1, f"{name} rows {row0}..: off by {int(ulps.max())} ulp"
                        assert int((ulps > 0).sum()) <= want.numel() // 1000, f"{name} rows {row0}..: too many 1-ulp"
        # the untouched 512 MiB tensor is byte-identical (same offsets: the header length is kept)
        path, start, entry = locate(base, "model.layers.0.mlp.down_proj.weight")
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        assert _sha256_range(path, start, size) == _sha256_range(out / path.name, start, size)
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- disk full

def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_file_size_limit_fails_cleanly(demo_inputs, tmp_path):
    base, adapter = demo_inputs
    out = tmp_path / "dest" / "out"
    out.parent.mkdir()
    proc = run_cli("merge", base, adapter, out, "--quiet", preexec_fn=_file_size_limit(64 << 10), timeout=120)
    line = one_error_line(proc)
    assert_clean(out)
    assert_says_needed_and_free(line)


@contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs mounted at `folder`, or a skip when this machine does not allow it (a real attempt)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def _bigger_model(root: Path) -> tuple[Path, Path]:
    """Two 12 MiB shards, more than a 20 MiB tmpfs holds (a LoRA on the first one's tensor)."""
    base, adapter = root / "base", root / "adapter"
    write_linear_pair(base, adapter, {f"model-0000{i + 1}-of-00002.safetensors": [
        (f"model.layers.{i}.mlp.up_proj.weight", 2048, 3072, i == 0)] for i in range(2)}, rank=4, alpha=8, seed=3)
    return base, adapter


def test_free_space_checked_before_writing(tmp_path):
    base, adapter = _bigger_model(tmp_path)
    needed = plan_merge(base, adapter).output_bytes
    with tmpfs(tmp_path / "small", "20m") as mount:
        assert shutil.disk_usage(mount).free < needed
        out = mount / "out"
        with pytest.raises(DiskFullError) as info:
            merge_shards(base, adapter, out, progress=False)
        message = str(info.value)
        assert "\n" not in message
        assert str(needed) in message, f"needed bytes ({needed}) not stated: {message}"
        assert_says_needed_and_free(message)
        assert os.listdir(mount) == [], os.listdir(mount)
        assert shutil.disk_usage(mount).used == 0

        line = one_error_line(run_cli("merge", base, adapter, out, "--quiet", timeout=120))
        assert str(needed) in line
        assert os.listdir(mount) == []


def test_running_out_of_space_while_writing(demo_inputs, tmp_path):
    """Free space a little above what the plan counts passes the pre-write check; the files' page rounding then
    fills the tmpfs while writing (ENOSPC) — in a shard, the state file, a side file, the index or the
    manifest, depending on the exact free space. Every such failure must be a DiskFullError with one line
    saying needed and free bytes, and leave nothing but what was there before: no file, no writer thread."""
    base, adapter = demo_inputs
    needed = plan_merge(base, adapter).output_bytes
    with tmpfs(tmp_path / "small", "4m") as mount:
        out = mount / "out"
        filler = mount / "filler"
        outcomes, problems, mid_write = [], [], None
        for slack in range(0, 49152, 2048):  # the output's 10 files round up to pages: about 40 KiB of slack
            filler.unlink(missing_ok=True)
            filler.write_bytes(b"\0" * (shutil.disk_usage(mount).free - needed - slack))
            try:
                merge_shards(base, adapter, out, progress=False)
                outcomes.append((slack, "merged"))
                shutil.rmtree(out)
                continue
            except Exception as e:  # noqa: BLE001 - every failure is classified below
                error = e
            if writer_threads():
                problems.append(f"slack {slack}: writer threads left running: {writer_threads()}")
            listing = sorted(os.listdir(mount))
            if listing != ["filler"]:
                problems.append(f"slack {slack}: left {listing}")
                for p in mount.iterdir():
                    if p.name != "filler":
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            if isinstance(error, DiskFullError) and "the merge writes" in str(error):
                outcomes.append((slack, "pre-write check"))
                continue
            outcomes.append((slack, f"{type(error).__name__}: {str(error).replace(str(mount), '<tmpfs>')}"))
            if not isinstance(error, DiskFullError):
                problems.append(f"slack {slack}: {type(error).__name__} instead of DiskFullError: {error}")
            elif not says_needed_and_free(str(error)) or "\n" in str(error).strip():
                problems.append(f"slack {slack}: message lacks needed/free bytes: {error}")
            if mid_write is None:
                mid_write = slack
        print("\n".join(f"slack {s}: {o}" for s, o in outcomes))
        assert mid_write is not None, f"no free-space setting ran out of space while writing: {outcomes}"
        assert any(o == "merged" for _, o in outcomes), outcomes

        # the same through the CLI, at the first setting that runs out mid-write
        filler.unlink()
        filler.write_bytes(b"\0" * (shutil.disk_usage(mount).free - needed - mid_write))
        proc = run_cli("merge", base, adapter, out, "--quiet", timeout=120)
        if sorted(os.listdir(mount)) != ["filler"]:
            problems.append(f"CLI: left {sorted(os.listdir(mount))}")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        if proc.returncode != 1 or "Traceback" in proc.stderr or len(lines) != 1 or not lines[0].startswith("error:"):
            problems.append(f"CLI: exit {proc.returncode}, stderr {proc.stderr[-1500:]!r}")
        assert not problems, "\n".join(problems)
