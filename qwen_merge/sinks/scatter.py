"""Writing one file at scattered offsets without the page cache: the GGUF sink's writes land where the
layout puts each tensor, mostly one after the other (a dense model's tensors come in file order) and
sometimes not (a MoE layer's experts go into three stacked tensors in turn).

`ScatterWriter` gathers each run of adjacent writes in a page-aligned chunk, and its disk thread writes the
chunk's whole 4 KiB pages with O_DIRECT and its ragged ends through the page cache while the next chunk
fills, as the folder output's disk thread does: copying 8 GB into the page cache costs about 10
CPU-seconds on a 2-core VM, direct writes almost none, but each waits for the device. The padding between
two tensors continues a run (it is zeros, and nothing else is written there). A page is written either
whole and directly, or in part and through the cache, never both ways: every byte of the file is written
once, and a run's direct pages hold only that run's bytes.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from collections.abc import Mapping
from pathlib import Path

from .writer import ALIGN, open_direct, write_all

CHUNK_BYTES = 8 << 20  # one run's buffer: whole pages, written directly when full
CHUNKS = 3  # one being filled, up to two being written (a direct write waits for the device)
_STOP = object()


class _Chunk:
    """A page-aligned buffer (anonymous memory is) and the run of the file it holds."""

    def __init__(self) -> None:
        self.memory = mmap.mmap(-1, CHUNK_BYTES)
        self.view = memoryview(self.memory)
        self.base = self.start = self.end = -1  # the file offset of the buffer's first byte; the run in it

    def close(self) -> None:
        try:
            self.view.release()
            self.memory.close()
        except BufferError:  # an error's traceback still holds a slice of the chunk: freed with it
            pass


class ScatterWriter:
    """Writes to the file open as `fd` at `path`; `padding` maps the offset where a tensor's bytes end to
    where the next tensor starts (the zeros between). Runs are written by the disk thread while the next
    fill: `wait` (before a sync) returns once all are written; an error there is raised by the next call."""

    def __init__(self, path: Path, fd: int, padding: Mapping[int, int]) -> None:
        self.path, self.fd, self.padding = path, fd, padding
        self.direct = open_direct(path)
        self._chunks = [_Chunk() for _ in range(CHUNKS)]
        self._free: queue.SimpleQueue[_Chunk] = queue.SimpleQueue()
        for chunk in self._chunks:
            self._free.put(chunk)
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._run: _Chunk | None = None  # the chunk being filled
        self._thread = threading.Thread(target=self._disk, name="qwen-merge-gguf-disk", daemon=True)
        self._thread.start()

    def write(self, data: memoryview, offset: int) -> None:
        self._raise()
        run = self._run
        if run is not None and offset != run.end:
            if self.padding.get(run.end) == offset and offset <= run.base + CHUNK_BYTES:
                run.view[run.end - run.base:offset - run.base] = bytes(offset - run.end)
                run.end = offset
            else:
                self.flush()
        while data:
            if self._run is not None and self._run.end == self._run.base + CHUNK_BYTES:  # full: whole pages
                self.flush()
            if self._run is None:
                self._run = run = self._free.get()
                run.base, run.start, run.end = offset - offset % ALIGN, offset, offset
            run = self._run
            n = min(run.base + CHUNK_BYTES - run.end, len(data))
            run.view[run.end - run.base:run.end - run.base + n] = data[:n]
            run.end, offset, data = run.end + n, offset + n, data[n:]

    def flush(self) -> None:
        """The run being filled handed to the disk thread."""
        if self._run is not None:
            self._jobs.put(self._run)
            self._run = None

    def wait(self) -> None:
        """Every write so far is in the file (through the page cache or on the device)."""
        self.flush()
        self._jobs.join()
        self._raise()

    def close(self) -> None:
        """Write what is buffered, end the disk thread, free the chunks; a second call does nothing more."""
        if self._thread.is_alive():
            self.flush()
            self._jobs.put(_STOP)
            self._thread.join()
        for chunk in self._chunks:
            chunk.close()
        if self.direct >= 0:
            os.close(self.direct)
            self.direct = -1

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _disk(self) -> None:
        while (run := self._jobs.get()) is not _STOP:
            try:
                if self._error is None:
                    self._write_run(run)
            except BaseException as e:  # kept for the filling thread, which raises it
                self._error = e
            finally:
                self._free.put(run)
                self._jobs.task_done()
        self._jobs.task_done()

    def _write_run(self, run: _Chunk) -> None:
        """A run's whole pages directly, its ends through the page cache."""
        start, end, base, view = run.start, run.end, run.base, run.view
        lo, hi = (-(-start // ALIGN) * ALIGN, end - end % ALIGN) if self.direct >= 0 else (end, end)
        if lo < hi:
            write_all(self.direct, view[lo - base:hi - base], lo, self.path)
            write_all(self.fd, view[start - base:lo - base], start, self.path)
            write_all(self.fd, view[hi - base:end - base], hi, self.path)
        else:
            write_all(self.fd, view[start - base:end - base], start, self.path)
