"""Writing shards: bytes in, finished files out. The writer owns a shard's whole life — the `.part` file,
the writes, the SHA-256, the fsync, the rename to its final name and the record in the resume state — so
a shard recorded as done is complete and durable on disk.

It is byte-only (no torch). Its threads run beside the caller, who produces the pieces:
* the assembler copies the pieces, in file order, into page-aligned staging chunks: a computed block by
  one memory copy (its ring buffer is free again at once), an unchanged span read straight from its
  source file into the chunk;
* the disk thread writes each full chunk with O_DIRECT, from the chunk to the device. The page cache is
  skipped on purpose: copying 8 GB into it cost 10 CPU-seconds on the 2-core VMs this was measured on,
  as much as the merge's arithmetic, while direct writes cost almost none. A shard's last, partial
  block goes through the page cache; where the filesystem refuses O_DIRECT (tmpfs), all chunks do;
* a hasher hashes the same chunks in the same order, so the SHA-256 costs no second pass over the output
  and runs on the other core while the caller computes (two hashers take shards in turn);
* the finisher syncs a completed shard, renames it and records it, while the next one is produced.

The life of one shard, phase by phase (`Phase`; `_Shard.enter` refuses any other order):

QUEUED    The caller's `write` makes the shard's record, `_Shard`: its name, its `.part` path, its header,
          the hasher it goes to (the next in turn) and its two results, `written` and `hashed`. It removes
          a `.part` file an interrupted run left, queues `_Begin(shard)`, every piece and `_End(shard)` for
          the assembler, and gives the finisher the job of completing the shard. A computed block is lent
          to the assembler alone, which gives its ring buffer back once the block is copied.
FILLING   The assembler takes `_Begin` and passes it on to the disk thread, which creates the `.part` file,
          and to the shard's hasher, which starts a SHA-256. It copies the header and then each piece into
          staging chunks; every full chunk is lent to both of its readers at once, the disk thread and that
          hasher, and whichever of them is done with it last gives it back to the pool (`_Chunk.done`).
FILLED    At `_End` the assembler lends out the last, partial chunk, notes the shard's length and passes
          `_End` on. The disk thread then closes the `.part` file and sets `written` (the bytes written);
          the hasher sets `hashed` (the hex digest). No chunk of the shard is in use once both are set.
WRITTEN,  The finisher, which has been waiting for `written` and then for `hashed`, enters these two
HASHED    phases as they arrive;
SYNCED    fsyncs the `.part` file;
RENAMED   renames it to the shard's name;
RECORDED  and records its size and SHA-256 in the resume state, then tells `on_done`. A shard is done only
          now, and a resume trusts only the shards so recorded: each is complete and durable.

Each phase is entered by one thread, after the thread that entered the one before it has handed the shard
on (through a queue or a result), so the phase needs no lock.

On an error, in any thread, no one is left waiting. The failing thread keeps the error for the caller,
whose `write` raises it at its next piece, and fails the results of the shard it was working on; from
then on it only drains its queue: it gives back every chunk and block it is handed and fails the results
of every shard it sees begin or end, with its own error (a full disk, say). The finisher of each such
shard raises that error instead of waiting, and `close`, which waits for the finishers in turn, raises the
first. A finisher's own failure (the fsync, the rename, the record) is raised by the next `write` or by
`close`. A failed shard stays in the phase it reached and is never recorded; its `.part` file is left to
whoever removes the partial folder (or to a resume, which writes it anew). `abort` (or an exception
leaving the `with` block) drains every queue in pipeline order, then fails the results of every shard
still pending, including one cut off between its pieces.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy

from ..compute.pieces import Block, Piece, RawSpan
from ..errors import OutputError
from ..inputs.sources import Files
from ..planning.memory import STAGING_CHUNK_BYTES, STAGING_CHUNKS  # filled, queued, written and hashed
from .output import write_error
from .resume import ResumeState

# SHA-256 is sequential within a file and runs at about 1.4 GB/s on one core: shards alternate between
# two hashing threads, so hashing a model of many shards can use both cores while they are free.
HASHERS = 2
ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffers aligned to the device's block (at most 4 KiB)


class Phase(enum.Enum):
    """Where a shard is in its life (the module's docstring tells it), and which thread moves it there."""

    QUEUED = enum.auto()  # the caller, in `write`: made, its pieces queued for the assembler
    FILLING = enum.auto()  # the assembler: its header and pieces are being copied into chunks
    FILLED = enum.auto()  # the assembler: every byte is in a chunk lent to the disk thread and its hasher
    WRITTEN = enum.auto()  # the finisher: the disk thread wrote every byte to `.part` and closed it
    HASHED = enum.auto()  # the finisher: its hasher has the SHA-256 of the same bytes
    SYNCED = enum.auto()  # the finisher: `.part` is on the device (fsync)
    RENAMED = enum.auto()  # the finisher: `.part` has the shard's name
    RECORDED = enum.auto()  # the finisher: done in the resume state


# The legal transitions: each phase is entered from this one only. QUEUED is entered by being made.
_ENTERED_FROM = {
    Phase.FILLING: Phase.QUEUED,
    Phase.FILLED: Phase.FILLING,
    Phase.WRITTEN: Phase.FILLED,
    Phase.HASHED: Phase.WRITTEN,
    Phase.SYNCED: Phase.HASHED,
    Phase.RENAMED: Phase.SYNCED,
    Phase.RECORDED: Phase.RENAMED,
}


class PhaseError(RuntimeError):
    """A shard or a chunk was handled out of order: a bug in the writer, never a problem with the files."""


class _Shard:
    """One shard between `write` and its record: what the threads need to know of it, its phase, and the
    two results its finisher waits for (failed, by whichever thread fails, if it will not be finished)."""

    __slots__ = ("name", "part", "header", "hasher", "phase", "length", "written", "hashed")

    def __init__(self, name: str, part: Path, header: bytes, hasher: _Stage) -> None:
        self.name, self.part, self.header, self.hasher = name, part, header, hasher
        self.phase = Phase.QUEUED
        self.length = 0  # the shard's size in bytes, known once it is FILLED
        self.written: Future[int] = Future()  # the disk thread's: the bytes written, the `.part` file closed
        self.hashed: Future[str] = Future()  # its hasher's: the SHA-256 of those bytes, in hex

    def enter(self, phase: Phase) -> None:
        expected = _ENTERED_FROM.get(phase)
        if self.phase is not expected:
            wanted = f"expected phase {expected.name}" if expected else "a shard is only made in it"
            raise PhaseError(f"shard {self.name} cannot enter phase {phase.name}: {wanted}, "
                             f"found phase {self.phase.name}")
        self.phase = phase

    def fail(self, error: BaseException) -> None:
        """The shard will not be finished: its finisher raises `error` instead of waiting."""
        for result in (self.written, self.hashed):
            try:
                result.set_exception(error)
            except InvalidStateError:  # already set, or failed by another thread
                pass


def _set(result: Future, value: object) -> None:
    """Set a shard's result, unless another thread has failed it already."""
    try:
        result.set_result(value)
    except InvalidStateError:
        pass


@dataclass(frozen=True, slots=True)
class _Begin:
    """On a queue: the shard's bytes follow — its pieces (to the assembler) or its chunks (to the disk
    thread and its hasher), in file order. The assembler passes on the caller's `_Begin` as it is."""

    shard: _Shard


@dataclass(frozen=True, slots=True)
class _End:
    """On a queue: the shard's bytes are complete. Passed on like `_Begin`."""

    shard: _Shard


_STOP = object()  # the last item of every queue: its thread stops


@dataclass(frozen=True, slots=True)
class _Stage:
    """One of the writer's threads, by name, and the queue it takes its work from."""

    name: str
    inbox: queue.SimpleQueue
    thread: threading.Thread


# A full chunk's readers, by name: each tells the chunk when it is done with it (`_Chunk.done`).
_DISK, _HASHER = "disk thread", "hasher"


class _Chunk:
    """A page-aligned staging buffer and the file bytes it holds: [offset, offset + fill). The assembler
    fills it and lends it to both its readers; the last of them to be done with it gives it back."""

    __slots__ = ("memory", "view", "offset", "fill", "readers", "_pool", "_lock")

    def __init__(self, pool: _ChunkPool) -> None:
        self.memory = mmap.mmap(-1, STAGING_CHUNK_BYTES)  # anonymous memory: page-aligned, as O_DIRECT needs
        self.view = memoryview(self.memory)
        self.offset, self.fill = 0, 0
        self.readers: set[str] = set()  # the readers not yet done with it
        self._pool, self._lock = pool, threading.Lock()

    def lend(self) -> None:
        """The assembler hands the full chunk on to the disk thread and the shard's hasher."""
        self.readers = {_DISK, _HASHER}

    def done(self, reader: str) -> None:
        """`reader` is done with the chunk (wrote it, hashed it, or dropped it); the last one gives it back."""
        with self._lock:
            if reader not in self.readers:
                raise PhaseError(f"the {reader} gave back the chunk at byte {self.offset} it was not lent")
            self.readers.remove(reader)
            last = not self.readers
        if last:
            self._pool.put(self)


class _ChunkPool(queue.SimpleQueue):
    def __init__(self, size: int) -> None:
        super().__init__()
        for _ in range(size):
            self.put(_Chunk(self))

    def close(self) -> None:
        """Let go of the idle chunks, so their memory is unmapped once nothing views it any more."""
        while not self.empty():
            self.get()


class ShardWriter:
    """Writes shards into `folder`, one `write` call each, in the background; `close` waits for all of
    them. `on_bytes(n)` is told of every n bytes written (from the disk thread); `on_done(name)` of every
    shard complete and recorded (from the finisher thread)."""

    def __init__(self, folder: Path, state: ResumeState, files: Files, on_bytes: Callable[[int], None],
                 on_done: Callable[[str], None] = lambda name: None) -> None:
        self.folder, self.state, self.on_done = folder, state, on_done
        self._chunks = _ChunkPool(STAGING_CHUNKS)
        self._errors: list[BaseException] = []
        self._stopped = self._dropping = False
        self._disk = self._start("disk", _Disk(on_bytes))
        self._hashers = [self._start(f"hash{i}", _Hasher()) for i in range(HASHERS)]
        self._assembler = self._start("assemble", _Assembler(self._chunks, self._disk.inbox, files))
        self._stages = (self._assembler, self._disk, *self._hashers)  # in pipeline order
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-merge-finish")
        self._finished: list[Future] = []
        self._shards: list[_Shard] = []  # every shard queued, to fail the results an abort leaves pending

    def write(self, name: str, header: bytes, pieces: Iterable[Piece]) -> None:
        """Queue shard `name`: its header, then its pieces in order. Returns when every piece is queued
        (the last ones may still be written); raises at once if a write or hash has failed."""
        part = self.folder / f"{name}.part"
        part.unlink(missing_ok=True)  # a half-written shard of an interrupted run
        shard = _Shard(name, part, header, hasher=self._hashers[len(self._shards) % HASHERS])
        self._shards.append(shard)
        queue_up = self._assembler.inbox.put
        queue_up(_Begin(shard))
        for piece in pieces:
            self._check()
            queue_up(piece)
        queue_up(_End(shard))
        self._finished.append(self._finisher.submit(self._finish, shard))
        self._harvest()

    def close(self) -> None:
        """Wait until every queued shard is written, hashed, synced, renamed and recorded."""
        try:
            for future in self._finished:
                future.result()
            self._check()
        finally:
            self._stop(drain=False)

    def abort(self) -> None:
        """Stop at once: pieces still queued are dropped, nothing more is written or recorded."""
        self._stop(drain=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type | None, *rest: object) -> None:
        self.abort()

    def _start(self, name: str, worker: _Assembler | _Disk | _Hasher) -> _Stage:
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        thread = threading.Thread(target=self._run, args=(inbox, worker), daemon=True, name=f"qwen-merge-{name}")
        thread.start()
        return _Stage(name, inbox, thread)

    def _stop(self, drain: bool) -> None:
        if self._stopped:
            return
        self._stopped, self._dropping = True, drain
        for stage in self._stages:  # in pipeline order: each drains into the next
            stage.inbox.put(_STOP)
            stage.thread.join()
        # A shard cut off between its pieces (an interrupt while it was queued) has results no thread will
        # set any more: fail them, so its finisher does not wait forever.
        for shard in self._shards:
            shard.fail(OutputError("the merge stopped before this shard was complete"))
        self._finisher.shutdown(wait=True)
        self._chunks.close()

    def _check(self) -> None:
        if self._errors:
            raise self._errors[0]

    def _harvest(self) -> None:
        """Raise the error of a shard that already failed to finish (a sync or a rename)."""
        for future in self._finished:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def _run(self, inbox: queue.SimpleQueue, worker: _Assembler | _Disk | _Hasher) -> None:
        """Feed `worker` until the stop mark. After a failure, or when aborted, items are only drained —
        shards failed — so nobody waits on a shard forever. Either way the chunk or block an item carries
        is given back here, once, when the worker is done with it."""
        failed: BaseException | None = None
        reader = worker.reader
        while (item := inbox.get()) is not _STOP:
            kind = type(item)
            try:
                if failed is None and not self._dropping:
                    worker.take(item)
                elif kind is _Begin or kind is _End:
                    # the shards still queued fail with this worker's own error (a full disk, say), which is
                    # what whoever waits on them must report, not that they were cut off
                    item.shard.fail(failed or OutputError("the merge stopped before this shard was complete"))
            except BaseException as e:  # noqa: BLE001 - handed to the producer's thread
                failed = e
                self._errors.append(e)
                if kind is _Begin or kind is _End:
                    item.shard.fail(e)
                worker.abandon(e)
            finally:
                if kind is _Chunk:
                    item.done(reader)
                elif kind is Block:
                    item.release()
        worker.close()

    def _finish(self, shard: _Shard) -> None:
        size = shard.written.result()
        shard.enter(Phase.WRITTEN)
        digest = shard.hashed.result()
        shard.enter(Phase.HASHED)
        _fsync(shard.part)
        shard.enter(Phase.SYNCED)
        os.replace(shard.part, self.folder / shard.name)
        shard.enter(Phase.RENAMED)
        self.state.record(shard.name, size, digest)
        shard.enter(Phase.RECORDED)
        self.on_done(shard.name)


class _Assembler:
    """Copies a shard's header and pieces, in order, into staging chunks and lends each full chunk to the
    disk thread and the shard's hasher."""

    reader = None  # lent no chunks; `_run` gives back the blocks it copies

    def __init__(self, chunks: _ChunkPool, disk: queue.SimpleQueue, files: Files) -> None:
        self.chunks, self.disk, self.files = chunks, disk, files
        self.shard: _Shard | None = None  # the shard being filled
        self.chunk: _Chunk | None = None  # the chunk being filled, lent to no one yet
        self.offset = 0  # the shard's bytes copied so far

    def take(self, item: object) -> None:
        kind = type(item)
        if kind is Block:
            self._add(item.data)
        elif kind is RawSpan:
            self._span(item)
        elif kind is _Begin:
            self._begin(item)
        elif kind is _End:
            self._end(item)
        else:
            raise TypeError(f"the assembler takes pieces and shard marks, not {item!r}")

    def abandon(self, error: BaseException) -> None:
        """The shard being filled will not be finished: fail its results, give its chunk back."""
        if self.shard is not None:
            self.shard.fail(error)
            self.shard = None
        self.close()

    def close(self) -> None:
        if self.chunk is not None:  # lent to no one: straight back to the pool
            self.chunks.put(self.chunk)
            self.chunk = None

    def _begin(self, begin: _Begin) -> None:
        begin.shard.enter(Phase.FILLING)
        self.shard, self.offset = begin.shard, 0
        self.disk.put(begin)
        self.shard.hasher.inbox.put(begin)
        self._add(memoryview(self.shard.header))

    def _end(self, end: _End) -> None:
        self._lend()
        end.shard.length = self.offset
        end.shard.enter(Phase.FILLED)
        self.disk.put(end)
        end.shard.hasher.inbox.put(end)
        self.shard = None

    def _room(self) -> memoryview:
        """Free space in the current chunk, lending a full one out first."""
        if self.chunk is not None and self.chunk.fill == STAGING_CHUNK_BYTES:
            self._lend()
        if self.chunk is None:
            self.chunk = self.chunks.get()
            self.chunk.offset, self.chunk.fill = self.offset, 0
        return self.chunk.view[self.chunk.fill:]

    def _add(self, data: memoryview) -> None:
        data = numpy.frombuffer(data.cast("B"), numpy.uint8)
        while len(data):
            room = self._room()
            n = min(len(room), len(data))
            # numpy copies without holding the GIL (a memoryview assignment holds it for the whole copy,
            # stalling the merging thread's every torch call meanwhile)
            numpy.copyto(numpy.frombuffer(room, numpy.uint8)[:n], data[:n])
            self._advance(n)
            data = data[n:]

    def _span(self, span: RawSpan) -> None:
        done = 0
        while done < span.length:
            room = self._room()
            n = min(len(room), span.length - done)
            self.files.read(span.fd, room[:n], span.offset + done, self.shard.part)
            self._advance(n)
            done += n

    def _advance(self, n: int) -> None:
        self.chunk.fill += n
        self.offset += n

    def _lend(self) -> None:
        """Hand the chunk being filled on to its two readers: the disk thread and the shard's hasher."""
        chunk, self.chunk = self.chunk, None
        if chunk is None:
            return
        chunk.lend()
        self.disk.put(chunk)
        self.shard.hasher.inbox.put(chunk)


class _Disk:
    """The disk thread's side: one `.part` file at a time, written chunk by chunk at their offsets."""

    reader = _DISK

    def __init__(self, on_bytes: Callable[[int], None]) -> None:
        self.on_bytes = on_bytes
        self.shard: _Shard | None = None  # the shard whose `.part` file is open
        self.fd = self.direct = -1

    def take(self, item: object) -> None:
        kind = type(item)
        if kind is _Chunk:
            self._write(item)
        elif kind is _Begin:
            self.shard = item.shard
            self.fd = os.open(self.shard.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self.direct = open_direct(self.shard.part)
        elif kind is _End:
            self.close()
            _set(item.shard.written, item.shard.length)
            self.shard = None

    def abandon(self, error: BaseException) -> None:
        if self.shard is not None:
            self.shard.fail(error)
            self.shard = None
        self.close()

    def close(self) -> None:
        for fd in (self.direct, self.fd):
            if fd >= 0:
                os.close(fd)
        self.direct = self.fd = -1

    def _write(self, chunk: _Chunk) -> None:
        whole = chunk.fill - chunk.fill % ALIGN if self.direct >= 0 else 0
        if whole:
            write_all(self.direct, chunk.view[:whole], chunk.offset, self.shard.part)
        if whole < chunk.fill:  # the unaligned end of a shard, or no O_DIRECT here: through the page cache
            write_all(self.fd, chunk.view[whole:chunk.fill], chunk.offset + whole, self.shard.part)
        self.on_bytes(chunk.fill)


class _Hasher:
    """A hasher thread's side: the SHA-256 of the shard being written, fed its chunks in file order."""

    reader = _HASHER

    def __init__(self) -> None:
        self.shard: _Shard | None = None  # the shard being hashed
        self.digest = None

    def take(self, item: object) -> None:
        kind = type(item)
        if kind is _Chunk:
            self.digest.update(item.view[:item.fill])
        elif kind is _Begin:
            self.shard, self.digest = item.shard, hashlib.sha256()
        elif kind is _End:
            _set(item.shard.hashed, self.digest.hexdigest())
            self.shard = self.digest = None

    def abandon(self, error: BaseException) -> None:
        if self.shard is not None:
            self.shard.fail(error)
        self.shard = self.digest = None

    def close(self) -> None:
        pass


def open_direct(path: Path) -> int:
    """A second descriptor of the new `.part` file, for writes that bypass the page cache; -1 where the
    filesystem does not offer them (tmpfs, some network filesystems)."""
    if not hasattr(os, "O_DIRECT"):
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return -1
        raise write_error(path, e) from e


def write_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as e:
        raise write_error(path, e) from e


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # Linux syncs a file's data through any descriptor of it
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        os.close(fd)
