"""Crash safety and resume (issue 5, item 2).

`python -m qwen_merge merge` runs as a real subprocess on one cached input (8 shards x 48 MiB of bf16, every
tensor merged: ~0.8 s of merging after ~1.1 s of start-up, then ~0.4 s to exit) and is SIGKILLed at seeded
random moments spread over the run. After every kill the destination is either absent or a complete merge
byte-identical to an uninterrupted run, and every shard the partial folder records as complete is already
the final shard.
The next run resumes from exactly that state (`--resume`); it may itself be killed, so the chain resumes
from many different states, and every run that finishes is compared byte for byte with the reference,
manifest included.

Also: resume continues rather than restarts (completed shards are not rewritten), `resume=True` from the
API, refusals when the adapter, the base or the options changed, a plain rerun over a leftover partial
folder is refused with a hint to --resume, Ctrl-C leaves a resumable state, and two independent runs
are byte-identical.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from builders import (ADAPTER_ST, copy_tree, edit_tensors, file_sha256, one_error_line, rewrite_adapter, run_cli,
                      start_cli, tree_hash, write_linear_pair)

from qwen_merge import QwenMergeError, merge_shards

pytestmark = pytest.mark.slow  # real processes, killed and resumed

SHARDS, PER_SHARD, ROWS, COLS, RANK = 8, 4, 2048, 3072, 16
STATE = "qwen_merge.partial.json"
MANIFEST = "qwen_merge.json"
KILLS = 20
SEED = 20240605


def shard_name(i: int) -> str:
    return f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"


def partial_of(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.qwen-merge-partial"


def merge_args(inputs: "Inputs", dest: Path, *extra: str) -> list:
    """`qwen-merge merge` of the cached inputs into dest, quietly."""
    return ["merge", inputs.base, inputs.adapter, dest, "--quiet", *extra]


def read_state(partial: Path) -> dict:
    path = partial / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Inputs:
    base: Path
    adapter: Path
    reference: Path  # an uninterrupted CLI run
    ref_hashes: dict[str, str]
    startup_s: float  # from spawn until the partial folder appears
    merge_s: float  # from then until the destination appears
    input_hashes: dict | None = None  # every file of base and adapter, before any run


def _timed_run(base: Path, adapter: Path, reference: Path, again: bool) -> tuple[float, float]:
    """An uninterrupted CLI run into `reference` (replaced `again`): (seconds until its partial folder
    appears, seconds from then until the destination appears)."""
    if again:
        shutil.rmtree(reference)
    begin = time.monotonic()
    proc = start_cli(*merge_args(Inputs(base, adapter, reference, {}, 0, 0), reference))
    startup = published = None
    while proc.poll() is None:
        now = time.monotonic() - begin
        if startup is None and partial_of(reference).exists():
            startup = now
        if published is None and reference.exists():
            published = now
        time.sleep(0.001)
    _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert startup is not None and published is not None
    return startup, published - startup


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-inputs")
    base, adapter = root / "base", root / "adapter"
    # alpha/r = 1.5: not a power of two, so the scale is a separate pass (more work per tensor)
    write_linear_pair(base, adapter, {shard_name(s): [(f"model.layers.{s * PER_SHARD + t}.mlp.up_proj.weight", ROWS,
                                                       COLS, True) for t in range(PER_SHARD)] for s in range(SHARDS)},
                      rank=RANK, alpha=24, seed=7, factor_std=0.01, target_modules=["up_proj"],
                      base_config={"model_type": "qwen3", "num_hidden_layers": SHARDS * PER_SHARD})

    input_hashes = {"base": tree_hash(base), "adapter": tree_hash(adapter)}
    os.sync()  # the timed reference run must not pay for writing back the inputs just built
    reference = root / "reference"
    # the faster of two runs: a first run slowed by what ran before it would spread the kills past the writes
    timings = [_timed_run(base, adapter, reference, again=k > 0) for k in range(2)]
    startup, merge = min(timings, key=lambda t: t[1])
    yield Inputs(base, adapter, reference, tree_hash(reference), startup, merge, input_hashes)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _remove_outputs(tmp_path):
    """The outputs here are hundreds of MB; do not leave them to pytest's retention of old temp folders."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def killed_state(inputs, tmp_path_factory):
    """A partial folder left by a run SIGKILLed after its first shards were recorded complete."""
    root = tmp_path_factory.mktemp("crash-killed")
    dest = root / "out"
    proc = start_cli(*merge_args(inputs, dest))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(read_state(partial_of(dest)).get("done", {})) >= 2:
            break
        time.sleep(0.002)
    proc.kill()
    proc.communicate()
    assert not dest.exists(), "the run finished before it could be killed"
    done = read_state(partial_of(dest))["done"]
    assert 2 <= len(done) < SHARDS, done
    yield partial_of(dest)
    shutil.rmtree(root, ignore_errors=True)


def place_partial(killed_state: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return copy_tree(killed_state, partial_of(dest))


def check_partial(partial: Path, inputs: Inputs, verified: dict) -> int:
    """Every shard the state records as complete is the final shard, byte for byte. Returns how many."""
    if not partial.exists():
        return 0
    done = read_state(partial).get("done", {})  # must parse: written to a temp file and renamed
    for name, info in done.items():
        path = partial / name
        assert path.is_file(), f"{name} recorded complete but missing: {sorted(os.listdir(partial))}"
        assert info["sha256"] == inputs.ref_hashes[name], f"{name}: recorded hash differs from the reference"
        st = path.stat()
        key = (name, st.st_ino, st.st_mtime_ns, st.st_size)
        if key not in verified:
            assert file_sha256(path) == inputs.ref_hashes[name], f"{name} recorded complete but its bytes differ"
            verified[key] = True
    return len(done)


def _exits_within(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_sigkill_at_random_moments_then_resume(inputs, tmp_path):
    """>= 20 SIGKILLs at seeded random moments; after each, the destination is absent or complete, and the
    next run resumes from that state; every finished run is byte-identical to the uninterrupted one."""
    rng = random.Random(SEED)
    dest = tmp_path / "out"
    partial = partial_of(dest)
    verified: dict = {}
    kills = finished = resumed_finished = 0
    kinds = dict.fromkeys(("before the partial folder", "after publishing", "with shards complete",
                           "with a shard half-written"), 0)
    runs = 0
    final = False  # the last run: once KILLS are done, a resume left to finish
    while not final:
        runs += 1
        assert runs < 4 * KILLS, "the chain does not finish"
        resuming = partial.exists()
        final = kills >= KILLS and resuming
        state = partial / STATE
        old_state = state.stat().st_mtime_ns if state.exists() else None
        proc = start_cli(*merge_args(inputs, dest, *(["--resume"] if resuming else [])))
        begin = time.monotonic()
        # Some kills land inside start-up (before, or just as, anything is written). The others land at a
        # random moment of the merge itself, measured from when this run (re)writes its state file, across
        # the time the shards still to be written take.
        remaining = 1 - len(read_state(partial).get("done", {})) / SHARDS if resuming else 1
        work = remaining * inputs.merge_s
        killed = False
        if final:
            proc.wait(timeout=300)
        elif kills % 7 == 0:
            killed = not _exits_within(proc, rng.uniform(0.3, 1.0) * inputs.startup_s)
        else:
            while proc.poll() is None and (not state.exists() or state.stat().st_mtime_ns == old_state):
                time.sleep(0.002)
            # now and then around the end: publishing and exiting
            window = (work, work + 0.3) if kills % 7 == 3 else (0, work)
            killed = proc.poll() is None and not _exits_within(proc, rng.uniform(*window))
        if killed:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        stderr = proc.stderr.read().decode()
        proc.stdout.close()
        proc.stderr.close()
        beside = sorted(p.name for p in tmp_path.iterdir())
        assert set(beside) <= {"out", partial.name}, f"unexpected files beside the destination: {beside}"
        if killed:
            kills += 1
            assert not dest.exists() or tree_hash(dest) == inputs.ref_hashes, \
                f"kill #{kills} at {time.monotonic() - begin:.2f} s left an incomplete destination"
            n_done = check_partial(partial, inputs, verified)
            if dest.exists():  # killed after the rename that published it: complete, checked above
                kinds["after publishing"] += 1
                resumed_finished += resuming
                shutil.rmtree(dest)
            elif not partial.exists():
                kinds["before the partial folder"] += 1
            elif any(p.name.endswith(".part") for p in partial.iterdir()):
                kinds["with a shard half-written"] += 1
            if n_done:
                kinds["with shards complete"] += 1
        else:
            assert proc.returncode == 0, stderr
            assert stderr == "", stderr
            assert tree_hash(dest) == inputs.ref_hashes, f"run {runs} (resume={resuming}) differs from the reference"
            assert not partial.exists(), "a finished run left its partial folder"
            finished += 1
            resumed_finished += resuming
            if not final:
                shutil.rmtree(dest)  # start the next chain fresh
    print(f"start-up {inputs.startup_s:.2f} s, merge {inputs.merge_s:.2f} s; {kills} kills in {runs} runs "
          f"({finished} ran to the end; {resumed_finished} resumed runs completed a merge): {kinds}")
    assert kills >= 20
    assert kinds["with shards complete"] >= 3, kinds
    assert kinds["with a shard half-written"] >= 3, kinds
    assert resumed_finished >= 1
    assert tree_hash(dest) == inputs.ref_hashes
    assert {"base": tree_hash(inputs.base), "adapter": tree_hash(inputs.adapter)} == inputs.input_hashes, \
        "an input changed"


def test_resume_continues_and_matches(inputs, killed_state, tmp_path):
    """--resume keeps the completed shards (same inode, never rewritten) and the result is byte-identical."""
    dest = tmp_path / "out"
    partial = place_partial(killed_state, dest)
    done = read_state(partial)["done"]
    kept = {name: (partial / name).stat() for name in done}
    proc = run_cli(*merge_args(inputs, dest, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert tree_hash(dest) == inputs.ref_hashes
    for name, before in kept.items():
        after = (dest / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"{name} was rewritten"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_resume_true_from_the_api(inputs, killed_state, tmp_path):
    dest = tmp_path / "out"
    place_partial(killed_state, dest)
    merge_shards(inputs.base, inputs.adapter, dest, progress=False, resume=True)
    assert tree_hash(dest) == inputs.ref_hashes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _edit_adapter_weights(inputs: Inputs, root: Path) -> dict:
    adapter = copy_tree(inputs.adapter, root / "adapter")

    def bump(tensors: dict) -> None:
        tensors[min(tensors)][0, 0] += 1.0

    edit_tensors(adapter / ADAPTER_ST, bump)
    return {"adapter": adapter}


def _edit_adapter_config(inputs: Inputs, root: Path) -> dict:
    return {"adapter": rewrite_adapter(inputs.adapter, root / "adapter", config={"lora_alpha": 25})}


def _base_copy(inputs: Inputs, root: Path) -> Path:
    base = root / "base"
    base.mkdir()
    for p in inputs.base.iterdir():
        os.link(p, base / p.name)  # hard links: cheap; a file that is edited is replaced, never written to
    return base


def _edit_base_shard_same_size(inputs: Inputs, root: Path) -> dict:
    """One value of the first shard (recorded complete by the killed run) changes; the size does not."""
    base = _base_copy(inputs, root)
    path = base / shard_name(0)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.unlink()
    path.write_bytes(bytes(data))
    return {"base": base}


def _edit_base_config_same_size(inputs: Inputs, root: Path) -> dict:
    base = _base_copy(inputs, root)
    path = base / "config.json"
    text = path.read_text().replace("qwen3", "qwen2")
    path.unlink()
    path.write_text(text)
    return {"base": base}


def _rounding_peft(inputs: Inputs, root: Path) -> dict:
    return {"rounding": "peft"}


CHANGES = {
    "adapter_weights": _edit_adapter_weights,
    "adapter_config": _edit_adapter_config,
    "base_shard_same_size": _edit_base_shard_same_size,
    "base_config_same_size": _edit_base_config_same_size,
    "rounding_option": _rounding_peft,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_resume_refused_when_inputs_or_options_changed(change, inputs, killed_state, tmp_path):
    """Resuming with other inputs or options would mix shards of two different merges. It must be refused
    (leaving the interrupted work as it was), or else produce exactly what a fresh merge of the new inputs
    gives."""
    dest = tmp_path / "dest" / "out"
    partial = place_partial(killed_state, dest)
    before = tree_hash(partial)
    changed = CHANGES[change](inputs, tmp_path)
    base, adapter = changed.get("base", inputs.base), changed.get("adapter", inputs.adapter)
    options = {k: v for k, v in changed.items() if k not in ("base", "adapter")}
    try:
        merge_shards(base, adapter, dest, progress=False, resume=True, **options)
    except QwenMergeError as e:
        message = str(e)
        assert "\n" not in message.strip(), message
        assert not dest.exists(), "a refused resume wrote the destination"
        assert partial.exists() and tree_hash(partial) == before, (
            f"a refused resume deleted or changed the interrupted work (message: {message!r})")
        return
    fresh = tmp_path / "fresh"
    merge_shards(base, adapter, fresh, progress=False, **options)
    assert tree_hash(dest) == tree_hash(fresh), (
        f"resume after a change ({change}) mixed shards of the old and new inputs instead of refusing")


def test_cli_resume_refused_with_other_options(inputs, killed_state, tmp_path):
    dest = tmp_path / "out"
    partial = place_partial(killed_state, dest)
    before = tree_hash(partial)
    line = one_error_line(run_cli(*merge_args(inputs, dest, "--resume", "--rounding", "peft")))
    assert str(partial) in line, line
    assert not dest.exists()
    assert partial.exists() and tree_hash(partial) == before, f"the refusal deleted the interrupted work: {line}"


def test_plain_rerun_over_partial_is_refused(inputs, killed_state, tmp_path):
    dest = tmp_path / "out"
    partial = place_partial(killed_state, dest)
    before = tree_hash(partial)
    line = one_error_line(run_cli(*merge_args(inputs, dest)))
    assert "--resume" in line and str(partial) in line, line
    assert not dest.exists() and tree_hash(partial) == before
    with pytest.raises(QwenMergeError, match="resume"):
        merge_shards(inputs.base, inputs.adapter, dest, progress=False)
    assert not dest.exists() and tree_hash(partial) == before


def test_ctrl_c_leaves_a_resumable_state(inputs, tmp_path):
    dest = tmp_path / "out"
    proc = start_cli(*merge_args(inputs, dest))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not read_state(partial_of(dest)).get("done"):
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the merge hung after Ctrl-C")
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 130, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--resume" in lines[0], stderr
    assert not dest.exists() and partial_of(dest).exists()
    assert run_cli(*merge_args(inputs, dest, "--resume")).returncode == 0
    assert tree_hash(dest) == inputs.ref_hashes


def test_two_independent_runs_are_byte_identical(inputs, tmp_path):
    """An API run equals the CLI reference run, manifest included (the kill chain compares further CLI runs);
    the manifest holds no path, host or time."""
    merge_shards(inputs.base, inputs.adapter, tmp_path / "api", progress=False)
    assert tree_hash(tmp_path / "api") == inputs.ref_hashes
    text = (tmp_path / "api" / MANIFEST).read_text()
    manifest = json.loads(text)
    for varying in (str(tmp_path), str(inputs.base), str(inputs.reference), socket.gethostname()):
        assert varying not in text, f"manifest contains {varying!r}"
    assert manifest["output"]["shards"] == {
        name: {"sha256": inputs.ref_hashes[name], "size": (inputs.reference / name).stat().st_size}
        for name in (shard_name(i) for i in range(SHARDS))}
