"""Reading the input files' bytes: descriptors opened once per run, exact positioned reads, and the one
value comparison planning needs. No torch and no mmap: bytes are read with `pread` into buffers the
caller owns, so resident memory stays what the caller allocated.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy

from ..dtypes import DTYPE_BITS
from ..errors import FormatError
from .tensorfile import TensorEntry, TensorFile

SAME_VALUES_CHUNK_BYTES = 16 << 20  # bytes of each tensor `same_values` reads at a time
SMALL_READ = 1 << 20  # reads up to this size are done at once, on the caller's thread
TAIL_ROOM = 1 << 20  # spare room after a read-ahead buffer, for a read that ends a little past the guess


def read_exact(fd: int, buffer: bytearray | memoryview, offset: int, path: object) -> None:
    """Fill `buffer` from `fd` at `offset`, failing loudly if the file is shorter than its header says."""
    view, done = memoryview(buffer).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise FormatError(f"{path}: file ended at byte {offset + done}; it changed or was truncated while reading")
        done += got


class Files:
    """Read-only descriptors of the input files, opened on first use and closed together (a context
    manager). (Hints to the kernel — POSIX_FADV_SEQUENTIAL, WILLNEED windows ahead of the reads — were
    measured here and made cold-cache merges slower: 23.7 s instead of 19.5 s on 8 GB; `ReadAhead` reads
    ahead itself instead.)"""

    def __init__(self, before_open: Callable[[Path], None] | None = None) -> None:
        self._fds: dict[Path, int] = {}
        self._retired: list[int] = []
        self._before_open = before_open  # e.g. wait until a file downloading from the Hub is complete
        self._lock = threading.Lock()

    def read(self, fd: int, buffer: bytearray | memoryview, offset: int, path: object) -> None:
        read_exact(fd, buffer, offset, path)

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            if self._before_open is not None:
                self._before_open(path)
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def retire(self, path: Path) -> None:
        """Let go of a file no later read needs, so deleting it frees its disk space now. Its descriptor
        number stays taken (pointed at /dev/null until `close`): a read-ahead still in flight on it reads
        nothing instead of another file that would otherwise reuse the number."""
        with self._lock:
            fd = self._fds.pop(path, None)
            if fd is not None:
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, fd)
                os.close(null)
                self._retired.append(fd)

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._retired]:
                os.close(fd)
            self._fds.clear()
            self._retired.clear()

    def __enter__(self) -> Files:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadAhead:
    """Positioned reads for one consumer, each large one followed by a read of the bytes after it on a
    thread of its own: a pass through a tensor's rows (and on into the next tensor) finds each block
    already read while the one before was being merged, so the disk, or the page cache copy, runs beside
    the arithmetic instead of between its steps.

    A read that starts inside the range fetched ahead but ends a little past it (the next layer's experts,
    after the attention tensors between them) takes what was fetched and reads only the rest. A read
    outside the range is done at once. Small reads (a small tensor merged between copied ones) are done
    at once on the caller's thread, unless already fetched: handing them to a thread costs more than the
    read, and they neither wait for nor discard a guess still in flight, which may serve the next large read.

    `read` returns a view that stays valid until the next `read`."""

    def __init__(self, files: Files) -> None:
        self.files = files
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-merge-read")
        # two buffers alternate between the caller's last read and the read ahead; a third holds small reads
        self._buffers = [bytearray(), bytearray(), bytearray()]
        self._ahead: _Guess | None = None
        self._current = 0  # the buffer the last large read is in
        self._sizes: dict[int, int] = {}  # fd -> file size: nothing is read past the end

    def read(self, fd: int, offset: int, length: int, path: object) -> memoryview:
        ahead = self._ahead
        if length <= SMALL_READ:
            if ahead is not None and ahead.done.done() and ahead.holds(fd, offset, length):
                return memoryview(self._buffers[1 - self._current])[offset - ahead.offset:][:length]
            view = self._buffer(2, length)
            self.files.read(fd, view, offset, path)
            return view
        self._ahead = None
        if ahead is not None and ahead.wait() and ahead.starts(fd, offset, length):
            view = self._take(ahead, offset, length, path)
        else:  # no guess, or a wrong or failed one (a retired file: this read reports the error)
            view = self._buffer(self._current, length)
            self.files.read(fd, view, offset, path)
        self._fetch(fd, offset + length, max(length, ahead.length if ahead else 0), path)
        return view

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.wait()
        self._pool.shutdown(wait=True)

    def _take(self, ahead: _Guess, offset: int, length: int, path: object) -> memoryview:
        """The guessed buffer becomes the caller's; bytes past the guess are read into its spare room."""
        self._current = 1 - self._current
        buffer = memoryview(self._buffers[self._current])
        start, end = offset - ahead.offset, offset - ahead.offset + length
        if end > ahead.got:
            self.files.read(ahead.fd, buffer[ahead.got:end], ahead.offset + ahead.got, path)
        return buffer[start:end]

    def _fetch(self, fd: int, offset: int, length: int, path: object) -> None:
        if fd not in self._sizes:
            self._sizes[fd] = os.fstat(fd).st_size
        length = min(length, self._sizes[fd] - offset)
        if length <= 0:
            return
        view = self._buffer(1 - self._current, length + TAIL_ROOM)[:length]
        self._ahead = _Guess(fd, offset, length, self._pool.submit(self._fill, fd, view, offset, path))

    def _fill(self, fd: int, view: memoryview, offset: int, path: object) -> int:
        self.files.read(fd, view, offset, path)
        return len(view)

    def _buffer(self, index: int, length: int) -> memoryview:
        if len(self._buffers[index]) < length:
            self._buffers[index] = bytearray(length)
        return memoryview(self._buffers[index])[:length]


class _Guess:
    """A read ahead: `length` bytes of `fd` from `offset`, read on the thread (`done` says how many)."""

    __slots__ = ("fd", "offset", "length", "done", "got")

    def __init__(self, fd: int, offset: int, length: int, done: Future) -> None:
        self.fd, self.offset, self.length, self.done, self.got = fd, offset, length, done, 0

    def wait(self) -> int:
        """The bytes read: 0 for a failed guess (a retired file), which counts as a miss."""
        self.got = 0 if self.done.exception() is not None else self.done.result()
        return self.got

    def holds(self, fd: int, offset: int, length: int) -> bool:
        return fd == self.fd and self.offset <= offset and offset + length <= self.offset + self.wait()

    def starts(self, fd: int, offset: int, length: int) -> bool:
        """Whether a read of these bytes is served by the guess: it starts inside the bytes read and ends
        within the buffer's spare room after them."""
        return fd == self.fd and self.offset <= offset < self.offset + self.got and \
            offset + length <= self.offset + self.length + TAIL_ROOM


def same_values(file: TensorFile, x: TensorEntry, y: TensorEntry, transposed: bool) -> bool:
    """Whether two tensors of one file hold the same values bit for bit, `y` read transposed (the
    tied-embedding signature of PEFT's `ensure_weight_tying`)."""
    if x.dtype != y.dtype or x.shape != (y.shape[::-1] if transposed else y.shape):
        return False
    with open(file.path, "rb") as f:
        if not transposed:
            return all(a == b for a, b in zip(_chunks(f, file, x), _chunks(f, file, y), strict=True))
        bits = {1: numpy.uint8, 2: numpy.uint16, 4: numpy.uint32, 8: numpy.uint64}[DTYPE_BITS[x.dtype] // 8]

        def read(e: TensorEntry) -> numpy.ndarray:
            f.seek(file.data_offset + e.start)
            return numpy.frombuffer(f.read(e.nbytes), dtype=bits).reshape(e.shape)

        return bool(numpy.array_equal(read(x), read(y).T))


def same_bytes(file_a: TensorFile, a: TensorEntry, file_b: TensorFile, b: TensorEntry) -> bool:
    """Whether two tensors of two files hold the same bytes (an adapter's saved copy of a base tensor), read
    in chunks; False when `file_b` is not on disk (a Hub shard not downloaded yet)."""
    if (a.dtype, a.shape) != (b.dtype, b.shape) or not file_b.path.is_file():
        return False
    with open(file_a.path, "rb") as fa, open(file_b.path, "rb") as fb:
        return all(x == y for x, y in zip(_chunks(fa, file_a, a), _chunks(fb, file_b, b), strict=True))


def _chunks(f, file: TensorFile, e: TensorEntry):
    for start in range(e.start, e.end, SAME_VALUES_CHUNK_BYTES):
        f.seek(file.data_offset + start)
        yield f.read(min(SAME_VALUES_CHUNK_BYTES, e.end - start))
