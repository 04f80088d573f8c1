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
A chunk goes back to its pool once both the disk thread and the hasher are done with it.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy

from ..compute.pieces import Block, Piece, RawSpan, Shared
from ..errors import OutputError
from ..inputs.sources import Files
from ..planning.memory import STAGING_CHUNK_BYTES, STAGING_CHUNKS  # filled, queued, written and hashed
from .output import write_error
from .resume import ResumeState

# SHA-256 is sequential within a file and runs at about 1.4 GB/s on one core: shards alternate between
# two hashing threads, so hashing a model of many shards can use both cores while they are free.
HASHERS = 2
ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffers aligned to the device's block (at most 4 KiB)


class _Chunk(Shared):
    """A page-aligned staging buffer and the file bytes it holds: [offset, offset + fill)."""

    __slots__ = ("memory", "view", "offset", "fill")

    def __init__(self, pool: _ChunkPool) -> None:
        super().__init__(pool.put)
        self.memory = mmap.mmap(-1, STAGING_CHUNK_BYTES)  # anonymous memory: page-aligned, as O_DIRECT needs
        self.view = memoryview(self.memory)
        self.offset, self.fill = 0, 0


class _ChunkPool(queue.SimpleQueue):
    def __init__(self, size: int) -> None:
        super().__init__()
        for _ in range(size):
            self.put(_Chunk(self))

    def close(self) -> None:
        """Let go of the idle chunks, so their memory is unmapped once nothing views it any more."""
        while not self.empty():
            self.get()


@dataclass(frozen=True, slots=True)
class _Start:
    """Shard begins: its `.part` file and header, the hasher queue it goes to, and its results."""

    part: Path
    header: bytes
    hashes: queue.SimpleQueue
    size: Future
    sha256: Future


@dataclass(frozen=True, slots=True)
class _End:
    pass


@dataclass(frozen=True, slots=True)
class _Open:
    part: Path
    size: Future
    sha256: Future


@dataclass(frozen=True, slots=True)
class _Close:
    size: Future
    sha256: Future
    length: int


_STOP = object()


def _cancel(item: object, error: BaseException) -> None:
    """Fail the results of a shard that will not be finished, so nobody waits for them; give back buffers."""
    if isinstance(item, (_Start, _Open, _Close)):
        for future in (item.size, item.sha256):
            if not future.done():
                future.set_exception(error)


def _release(item: object) -> None:
    if isinstance(item, (Block, _Chunk)):
        item.release()


class ShardWriter:
    """Writes shards into `folder`, one `write` call each, in the background; `close` waits for all of
    them. `on_bytes(n)` is told of every n bytes written (from the disk thread); `on_done(name)` of every
    shard complete and recorded (from the finisher thread)."""

    def __init__(self, folder: Path, state: ResumeState, files: Files, on_bytes: Callable[[int], None],
                 on_done: Callable[[str], None] = lambda name: None) -> None:
        self.folder, self.state, self.on_done = folder, state, on_done
        self._chunks = _ChunkPool(STAGING_CHUNKS)
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._disk: queue.SimpleQueue = queue.SimpleQueue()
        self._hashes = [queue.SimpleQueue() for _ in range(HASHERS)]
        self._errors: list[BaseException] = []
        workers = [(self._pieces, _Assembler(self._chunks, self._disk, files), "assemble"),
                   (self._disk, _Disk(on_bytes), "disk")]
        workers += [(q, _Hasher(), f"hash{i}") for i, q in enumerate(self._hashes)]
        self._threads = [threading.Thread(target=self._run, args=(q, worker), daemon=True, name=f"qwen-merge-{n}")
                         for q, worker, n in workers]
        for thread in self._threads:
            thread.start()
        self._shards = 0
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-merge-finish")
        self._finished: list[Future] = []
        self._starts: list[_Start] = []  # every shard queued, to fail the results an abort leaves pending
        self._stopped = self._dropping = False

    def write(self, name: str, header: bytes, pieces: Iterable[Piece]) -> None:
        """Queue shard `name`: its header, then its pieces in order. Returns when every piece is queued
        (the last ones may still be written); raises at once if a write or hash has failed."""
        part = self.folder / f"{name}.part"
        part.unlink(missing_ok=True)  # a half-written shard of an interrupted run
        start = _Start(part, header, self._hashes[self._shards % HASHERS], Future(), Future())
        self._shards += 1
        self._starts.append(start)
        self._pieces.put(start)
        for piece in pieces:
            self._check()
            if isinstance(piece, Block):
                piece.slot.hold(1)  # the assembler copies it out and releases it
            self._pieces.put(piece)
        self._pieces.put(_End())
        self._finished.append(self._finisher.submit(self._finish, name, part, start))
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

    def _stop(self, drain: bool) -> None:
        if self._stopped:
            return
        self._stopped, self._dropping = True, drain
        for q in (self._pieces, self._disk, *self._hashes):  # in pipeline order: each drains into the next
            q.put(_STOP)
            self._threads[[self._pieces, self._disk, *self._hashes].index(q)].join()
        # A shard cut off between its pieces (an interrupt while it was queued) has results no thread will
        # set any more: fail them, so its finisher does not wait forever.
        for start in self._starts:
            _cancel(start, OutputError("the merge stopped before this shard was complete"))
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

    def _run(self, items: queue.SimpleQueue, worker: _Assembler | _Disk | _Hasher) -> None:
        """Feed `worker` until the stop mark. After a failure, or when aborted, items are only drained —
        buffers released, pending shards failed — so nobody waits on a buffer or a shard forever."""
        failed: BaseException | None = None
        while (item := items.get()) is not _STOP:
            try:
                if failed or self._dropping:
                    # the shards still queued fail with this worker's own error (a full disk, say), which is
                    # what whoever waits on them must report, not that they were cut off
                    _cancel(item, failed or OutputError("the merge stopped before this shard was complete"))
                    worker.drop(item)
                else:
                    worker.take(item)
            except BaseException as e:  # noqa: BLE001 - handed to the producer's thread
                failed = e
                self._errors.append(e)
                _cancel(item, e)
                worker.drop(item)
                worker.abandon(e)
        worker.close()

    def _finish(self, name: str, part: Path, start: _Start) -> None:
        size, digest = start.size.result(), start.sha256.result()
        _fsync(part)
        os.replace(part, self.folder / name)
        self.state.record(name, size, digest)
        self.on_done(name)


class _Assembler:
    """Copies a shard's header and pieces, in order, into staging chunks and hands each chunk on to the
    disk thread and the shard's hasher."""

    def __init__(self, chunks: _ChunkPool, disk: queue.SimpleQueue, files: Files) -> None:
        self.chunks, self.disk, self.files = chunks, disk, files
        self.chunk: _Chunk | None = None
        self.start: _Start | None = None
        self.offset = 0

    def take(self, item: object) -> None:
        if isinstance(item, _Start):
            self.start, self.offset = item, 0
            for q in (self.disk, item.hashes):
                q.put(_Open(item.part, item.size, item.sha256))
            self._add(memoryview(item.header))
        elif isinstance(item, Block):
            try:
                self._add(item.data)
            finally:
                item.release()
        elif isinstance(item, RawSpan):
            self._span(item)
        elif isinstance(item, _End):
            self._hand_on()
            close = _Close(self.start.size, self.start.sha256, self.offset)
            for q in (self.disk, self.start.hashes):
                q.put(close)
            self.start = None

    def drop(self, item: object) -> None:
        _release(item)

    def abandon(self, error: BaseException) -> None:
        """The shard being assembled will not be finished: fail its results, give its chunk back."""
        if self.start is not None:
            _cancel(self.start, error)
            self.start = None
        self.close()

    def close(self) -> None:
        if self.chunk is not None:
            self.chunk.hold(1)
            self.chunk.release()
            self.chunk = None

    def _room(self) -> memoryview:
        """Free space in the current chunk, handing a full one on first."""
        if self.chunk is not None and self.chunk.fill == STAGING_CHUNK_BYTES:
            self._hand_on()
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
            self.files.read(span.fd, room[:n], span.offset + done, self.start.part)
            self._advance(n)
            done += n

    def _advance(self, n: int) -> None:
        self.chunk.fill += n
        self.offset += n

    def _hand_on(self) -> None:
        chunk, self.chunk = self.chunk, None
        if chunk is None:
            return
        chunk.hold(2)  # the disk thread and the hasher each release it
        self.disk.put(chunk)
        self.start.hashes.put(chunk)


class _Disk:
    """The disk thread's side: one `.part` file at a time, written chunk by chunk at their offsets."""

    def __init__(self, on_bytes: Callable[[int], None]) -> None:
        self.on_bytes, self.direct, self.fd, self.path = on_bytes, -1, -1, None

    def take(self, item: object) -> None:
        if isinstance(item, _Open):
            self.path = item.part
            self.fd = os.open(item.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self.direct = _open_direct(item.part)
        elif isinstance(item, _Chunk):
            try:
                self._write(item)
            finally:
                item.release()
        elif isinstance(item, _Close):
            self.close()
            item.size.set_result(item.length)

    def drop(self, item: object) -> None:
        _release(item)

    def abandon(self, error: BaseException) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self.direct, self.fd):
            if fd >= 0:
                os.close(fd)
        self.direct = self.fd = -1

    def _write(self, chunk: _Chunk) -> None:
        whole = chunk.fill - chunk.fill % ALIGN if self.direct >= 0 else 0
        if whole:
            _write_all(self.direct, chunk.view[:whole], chunk.offset, self.path)
        if whole < chunk.fill:  # the unaligned end of a shard, or no O_DIRECT here: through the page cache
            _write_all(self.fd, chunk.view[whole:chunk.fill], chunk.offset + whole, self.path)
        self.on_bytes(chunk.fill)


class _Hasher:
    """A hasher thread's side: the SHA-256 of the shard being written, fed its chunks in file order."""

    def __init__(self) -> None:
        self.digest = None

    def take(self, item: object) -> None:
        if isinstance(item, _Open):
            self.digest = hashlib.sha256()
        elif isinstance(item, _Chunk):
            try:
                self.digest.update(item.view[:item.fill])
            finally:
                item.release()
        elif isinstance(item, _Close):
            item.sha256.set_result(self.digest.hexdigest())

    def drop(self, item: object) -> None:
        _release(item)

    def abandon(self, error: BaseException) -> None:
        self.digest = None

    def close(self) -> None:
        pass


def _open_direct(path: Path) -> int:
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


def _write_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
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
