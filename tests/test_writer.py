"""The writer's shard life (qwen_merge/sinks/writer.py): the phases in their one legal order, each entered
by the thread the module says, an illegal move refused naming the phase expected and the one found, and an
error in any of the writer's threads (assembler, disk thread, hasher, finisher) failing its shard so the
merge stops with that error, without hanging, leaving nothing behind — through Python and the CLI.
Disk-full errors from the real filesystem are in test_limits.py, interrupted and killed runs in
test_crash.py."""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from builders import in_process_cli, in_process_error_line, tree_hash, writer_threads

from qwen_merge import OutputError, merge_shards
from qwen_merge.sinks import writer
from qwen_merge.sinks.output import write_error
from qwen_merge.sinks.writer import Phase, PhaseError

LIFE = list(Phase)
# The demo pair's last shard: its only chunk reaches the disk thread and the hasher after its last piece is
# queued, when `close` already waits for its finisher, so a thread that failed without failing the shard's
# results would leave the merge waiting forever.
FAILING_SHARD = "model-00003-of-00003.safetensors"
HANG_S = 60


def test_phases_are_one_chain_from_queued_to_recorded():
    """Every phase but QUEUED is entered from the one before it, in the order `Phase` lists them."""
    assert LIFE[0] is Phase.QUEUED and LIFE[-1] is Phase.RECORDED
    assert writer._ENTERED_FROM == dict(zip(LIFE[1:], LIFE[:-1]))


def test_illegal_transition_names_the_expected_and_the_found_phase():
    shard = writer._Shard("model-00001-of-00002.safetensors", Path("x.part"), b"", hasher=None)
    for phase in LIFE:
        expected = writer._ENTERED_FROM.get(phase)
        for found in LIFE:
            if found is expected:
                continue
            shard.phase = found
            with pytest.raises(PhaseError) as info:
                shard.enter(phase)
            message = str(info.value)
            assert shard.phase is found, f"a refused move to {phase.name} changed the phase"
            assert "model-00001-of-00002.safetensors" in message and phase.name in message, message
            assert f"found phase {found.name}" in message, message
            if expected is None:
                assert "only made" in message, message
            else:
                assert f"expected phase {expected.name}" in message, message
    shard.phase = Phase.QUEUED
    for phase in LIFE[1:]:
        shard.enter(phase)
    assert shard.phase is Phase.RECORDED


def test_a_chunk_given_back_twice_is_refused():
    pool = writer._ChunkPool(1)
    chunk = pool.get()
    chunk.lend()
    chunk.done(writer._DISK)
    assert pool.empty(), "given back while the hasher still reads it"
    with pytest.raises(PhaseError, match="disk thread gave back the chunk at byte 0"):
        chunk.done(writer._DISK)
    chunk.done(writer._HASHER)
    assert pool.get_nowait() is chunk
    pool.close()


def test_each_phase_is_entered_in_order_by_its_thread(demo_inputs, demo_merged, tmp_path, monkeypatch):
    entered: dict[str, list[tuple[Phase, str]]] = {}
    enter = writer._Shard.enter

    def recording(shard, phase):
        enter(shard, phase)
        entered.setdefault(shard.name, []).append((phase, threading.current_thread().name))

    monkeypatch.setattr(writer._Shard, "enter", recording)
    merge_shards(*demo_inputs, tmp_path / "out", progress=False)
    assert tree_hash(tmp_path / "out") == tree_hash(demo_merged)
    assert len(entered) == 3, entered
    for name, moves in entered.items():
        assert [phase for phase, _ in moves] == LIFE[1:], (name, moves)
        threads = [thread.split("_")[0] for _, thread in moves]
        assert threads == ["qwen-merge-assemble"] * 2 + ["qwen-merge-finish"] * 5, (name, moves)


# ------------------------------------------------------------------------------ an error in each thread

def _fail_taking(worker: type) -> Callable:
    """`worker.take` failing on the first chunk or piece of FAILING_SHARD."""
    take = worker.take

    def failing(self, item):
        if self.shard is not None and self.shard.name == FAILING_SHARD and type(item) not in MARKS:
            raise OutputError(f"injected failure in the {type(self).__name__.strip('_').lower()}")
        return take(self, item)
    return failing


def _fail_on_failing_shard(function: Callable) -> Callable:
    """`function(..., path)` raising an I/O error (EIO) when `path` is FAILING_SHARD's `.part` file."""
    def failing(*args):
        path = args[-1]
        if path.name == f"{FAILING_SHARD}.part":
            raise write_error(path, OSError(errno.EIO, os.strerror(errno.EIO)))
        return function(*args)
    return failing


MARKS = (writer._Begin, writer._End)
EIO_MESSAGE = f"{FAILING_SHARD}.part: write failed: Input/output error"
# thread -> (what to replace, its failing stand-in, the error's message)
FAILURES = {
    "assembler": ((writer._Assembler, "take"), _fail_taking(writer._Assembler), "injected failure in the assembler"),
    "disk thread": ((writer, "write_all"), _fail_on_failing_shard(writer.write_all), EIO_MESSAGE),
    "hasher": ((writer._Hasher, "take"), _fail_taking(writer._Hasher), "injected failure in the hasher"),
    "finisher": ((writer, "_fsync"), _fail_on_failing_shard(writer._fsync), EIO_MESSAGE),
}


def _inject(monkeypatch, thread: str) -> str:
    (owner, name), stand_in, message = FAILURES[thread]
    monkeypatch.setattr(owner, name, stand_in)
    return message


def _within(seconds: float, call: Callable):
    """What `call()` returns, or what it raised raised here; fails the test if it has not returned after
    `seconds` (a thread waiting for a shard that no one will finish)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((call(), None))
        except BaseException as e:  # noqa: BLE001 - raised again in the test's thread
            outcome.append((None, e))

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(seconds)
    assert not runner.is_alive(), f"still running after {seconds} s: something waits forever"
    value, error = outcome[0]
    if error is not None:
        raise error
    return value


@pytest.mark.parametrize("thread", list(FAILURES))
def test_an_error_in_a_writer_thread_stops_the_merge(thread, demo_inputs, tmp_path, monkeypatch):
    message = _inject(monkeypatch, thread)
    dest = tmp_path / "dest" / "out"
    dest.parent.mkdir()
    with pytest.raises(OutputError, match=re.escape(message)):
        _within(HANG_S, lambda: merge_shards(*demo_inputs, dest, progress=False))
    assert os.listdir(dest.parent) == [], f"left behind: {os.listdir(dest.parent)}"
    assert writer_threads() == [], f"threads left running: {writer_threads()}"


@pytest.mark.parametrize("thread", list(FAILURES))
def test_an_error_in_a_writer_thread_is_one_cli_line(thread, demo_inputs, tmp_path, monkeypatch, capsys):
    message = _inject(monkeypatch, thread)
    dest = tmp_path / "dest" / "out"
    dest.parent.mkdir()
    proc = _within(HANG_S, lambda: in_process_cli(capsys, "merge", *demo_inputs, dest, "--quiet"))
    line = in_process_error_line(proc)
    assert message in line, line
    assert os.listdir(dest.parent) == [], f"left behind: {os.listdir(dest.parent)}"
    assert writer_threads() == [], f"threads left running: {writer_threads()}"
