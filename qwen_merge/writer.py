"""Writing shards: bytes in, finished files out. The writer owns a shard's whole life — the `.part` file,
the writes, the SHA-256, the fsync, the rename to its final name and the record in the resume state — so
a shard recorded as done is complete and durable on disk.

It is byte-only (no torch) and runs its threads beside the caller, who produces the pieces:
* the writer thread writes pieces in order: computed blocks with `pwrite`, unchanged spans with
  `copy_file_range` (in the kernel, a reflink where the filesystem has them);
* a hasher thread hashes the same pieces in the same order — computed blocks from their buffers,
  unchanged spans read back from their (cached) source — so the SHA-256 costs no second pass over the
  output and runs on the other core while the caller computes (two hashers take shards in turn);
* the finisher syncs a completed shard, renames it and records it, while the next one is produced.
A computed block's buffer goes back to the ring once both the writer and the hasher are done with it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import read_json
from .errors import OutputError
from .manifest import differences
from .output import write_error, write_json_atomic
from .pieces import Block, Piece, RawSpan
from .sources import read_exact

STATE_NAME = "qwen_merge.partial.json"
COPY_CHUNK = 64 << 20  # bytes per copy_file_range call (progress moves at least this often)
# SHA-256 is sequential within a file and runs at about 1.4 GB/s on one core: shards alternate between
# two hashing threads, so hashing a model of many shards can use both cores while they are free.
HASHERS = 2
HASH_CHUNK = 4 << 20  # bytes of an unchanged span read back per hash update


class ResumeState:
    """The state file of a partial folder: the run's identity and the shards completed so far, rewritten
    atomically at every change so an interrupted run can be resumed from it."""

    def __init__(self, folder: Path, identity: dict, done: dict[str, dict]) -> None:
        self.path, self.identity, self.done = folder / STATE_NAME, identity, dict(done)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path, identity: dict) -> ResumeState:
        """The shards an interrupted run left complete in `folder`, if it ran with the same identity.

        Raises:
            OutputError: the run had other inputs or options (each difference named), or a shard it
                recorded is missing or has another size."""
        path = folder / STATE_NAME
        if not path.is_file():
            return cls(folder, identity, {})  # killed before the first record: nothing was complete
        state = read_json(path, STATE_NAME)
        if changes := differences(state.get("identity") or {}, identity):
            raise OutputError(f"{folder}: cannot resume, the interrupted merge had other inputs or options "
                              f"({'; '.join(changes)}); rerun with the same ones, or remove the folder to start over")
        done = state.get("done", {})
        for name, info in done.items():
            if not (folder / name).is_file() or (folder / name).stat().st_size != info.get("size"):
                raise OutputError(f"{folder / name}: a shard recorded as complete is missing or has the wrong size")
        return cls(folder, identity, done)

    def save(self) -> None:
        with self._lock:
            write_json_atomic(self.path, {"identity": self.identity, "done": self.done})

    def record(self, name: str, info: dict) -> None:
        with self._lock:
            self.done[name] = info
        self.save()

    def remove(self) -> None:
        self.path.unlink()


@dataclass(frozen=True, slots=True)
class _Start:
    part: Path
    header: bytes


@dataclass(frozen=True, slots=True)
class _End:
    size: Future
    sha256: Future


_STOP = object()


def _cancel(item: object, error: BaseException) -> None:
    """A shard end that will not be reached: fail its futures, so its finisher stops waiting."""
    if isinstance(item, _End):
        for future in (item.size, item.sha256):
            if not future.done():
                future.set_exception(error)


class ShardWriter:
    """Writes shards into `folder`, one `write` call each, in the background; `close` waits for all of
    them. `on_bytes(n)` is told of every n bytes written (from the writer thread)."""

    def __init__(self, folder: Path, state: ResumeState, on_bytes: Callable[[int], None]) -> None:
        self.folder, self.state = folder, state
        self._writes: queue.SimpleQueue = queue.SimpleQueue()
        self._hashes = [queue.SimpleQueue() for _ in range(HASHERS)]
        self._errors: list[BaseException] = []
        workers = [(self._writes, _Writer(on_bytes), "write")]
        workers += [(q, _Hasher(), f"hash{i}") for i, q in enumerate(self._hashes)]
        self._threads = [threading.Thread(target=self._run, args=(q, worker), daemon=True, name=f"qwen-merge-{n}")
                         for q, worker, n in workers]
        for thread in self._threads:
            thread.start()
        self._shards = 0
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-merge-finish")
        self._finished: list[Future] = []
        self._stopped = self._dropping = False

    def write(self, name: str, header: bytes, pieces: Iterable[Piece]) -> None:
        """Queue shard `name`: its header, then its pieces in order. Returns when every piece is queued
        (the last ones may still be written); raises at once if a write or hash has failed."""
        part = self.folder / f"{name}.part"
        part.unlink(missing_ok=True)  # a half-written shard of an interrupted run
        hashes, self._shards = self._hashes[self._shards % HASHERS], self._shards + 1
        self._put(_Start(part, header), hashes)
        for piece in pieces:
            self._check()
            if isinstance(piece, Block):
                piece.slot.hold(2)  # the writer and the hasher each release it
            self._put(piece, hashes)
        end = _End(Future(), Future())
        self._put(end, hashes)
        self._finished.append(self._finisher.submit(self._finish, name, part, end))
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
        for q in (self._writes, *self._hashes):
            q.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._finisher.shutdown(wait=True)

    def _put(self, item: object, hashes: queue.SimpleQueue) -> None:
        self._writes.put(item)
        hashes.put(item)

    def _check(self) -> None:
        if self._errors:
            raise self._errors[0]

    def _harvest(self) -> None:
        """Raise the error of a shard that already failed to finish (a sync or a rename)."""
        for future in self._finished:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def _run(self, items: queue.SimpleQueue, worker: _Writer | _Hasher) -> None:
        """Feed `worker` until the stop mark. After a failure, or when aborted, items are only drained —
        buffers released, pending shards failed — so nobody waits on a buffer or a shard forever."""
        failed = False
        while (item := items.get()) is not _STOP:
            try:
                if failed or self._dropping:
                    _cancel(item, OutputError("the merge stopped before this shard was complete"))
                else:
                    worker.take(item)
            except BaseException as e:  # noqa: BLE001 - handed to the producer's thread
                failed = True
                self._errors.append(e)
                _cancel(item, e)
            finally:
                if isinstance(item, Block):
                    item.release()
        worker.close()

    def _finish(self, name: str, part: Path, end: _End) -> None:
        size, digest = end.size.result(), end.sha256.result()
        _fsync(part)
        os.replace(part, self.folder / name)
        self.state.record(name, {"size": size, "sha256": digest})


class _Writer:
    """The writer thread's side: one open `.part` file at a time, written at increasing offsets."""

    def __init__(self, on_bytes: Callable[[int], None]) -> None:
        self.on_bytes, self.fd, self.pos, self.path = on_bytes, -1, 0, None

    def take(self, item: object) -> None:
        if isinstance(item, _Start):
            self.path = item.part
            self.fd = os.open(item.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self.pos = 0
            self._write(memoryview(item.header))
        elif isinstance(item, Block):
            self._write(item.data)
        elif isinstance(item, RawSpan):
            self._copy(item)
        elif isinstance(item, _End):
            os.close(self.fd)
            self.fd = -1
            item.size.set_result(self.pos)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _write(self, data: memoryview) -> None:
        _write_all(self.fd, data, self.pos, self.path)
        self.pos += len(data)
        self.on_bytes(len(data))

    def _copy(self, span: RawSpan) -> None:
        for done in range(0, span.length, COPY_CHUNK):
            n = min(COPY_CHUNK, span.length - done)
            _copy_range(span.fd, self.fd, span.offset + done, self.pos, n, self.path)
            self.pos += n
            self.on_bytes(n)


class _Hasher:
    """The hasher thread's side: the SHA-256 of the shard being written, fed in file order."""

    def __init__(self) -> None:
        self.digest, self.path = None, None
        self.buffer = bytearray(HASH_CHUNK)

    def take(self, item: object) -> None:
        if isinstance(item, _Start):
            self.digest, self.path = hashlib.sha256(item.header), item.part
        elif isinstance(item, Block):
            self.digest.update(item.data)
        elif isinstance(item, RawSpan):
            self._span(item)
        elif isinstance(item, _End):
            item.sha256.set_result(self.digest.hexdigest())

    def close(self) -> None:
        pass

    def _span(self, span: RawSpan) -> None:
        view = memoryview(self.buffer)
        for done in range(0, span.length, HASH_CHUNK):
            n = min(HASH_CHUNK, span.length - done)
            read_exact(span.fd, view[:n], span.offset + done, self.path)
            self.digest.update(view[:n])


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, n: int, path: Path) -> None:
    """Copy n bytes in the kernel (reflink where the filesystem offers it), else through a buffer."""
    done = 0
    try:
        while done < n:
            got = os.copy_file_range(src, dst, n - done, src_off + done, dst_off + done)
            if got == 0:
                raise OutputError(f"{path}: source ended early while copying at byte {src_off + done}")
            done += got
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            raise write_error(path, e) from e
    data = bytearray(n - done)
    read_exact(src, data, src_off + done, path)
    _write_all(dst, memoryview(data), dst_off + done, path)


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
