"""Writing one file at scattered offsets without the page cache: the GGUF sink's writes land where the
layout puts each tensor, mostly one after the other (a dense model's tensors come in file order) and
sometimes not (a MoE layer's experts go into three stacked tensors in turn).

`ScatterWriter` gathers each run of adjacent writes in a page-aligned chunk and writes the chunk's whole
4 KiB pages with O_DIRECT and its ragged ends through the page cache, as the folder output's disk thread
does: copying 8 GB into the page cache costs about 10 CPU-seconds on a 2-core VM, direct writes almost
none. The padding between two tensors continues a run (it is zeros, and nothing else is written there).
A page is written either whole and directly, or in part and through the cache, never both ways: every
byte of the file is written once, and a run's direct pages hold only that run's bytes.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from pathlib import Path

from .writer import ALIGN, open_direct, write_all

CHUNK_BYTES = 8 << 20  # one run's buffer: whole pages, written directly when full


class ScatterWriter:
    """Writes to the file open as `fd` at `path`; `padding` maps the offset where a tensor's bytes end to
    where the next tensor starts (the zeros between). `flush` before syncing; `close` at the end."""

    def __init__(self, path: Path, fd: int, padding: Mapping[int, int]) -> None:
        self.path, self.fd, self.padding = path, fd, padding
        self.direct = open_direct(path)
        self._chunk = mmap.mmap(-1, CHUNK_BYTES)  # anonymous, so page-aligned, as O_DIRECT wants
        self._view = memoryview(self._chunk)
        self._base = self._start = self._end = -1  # the chunk's file offset; the run buffered in it

    def write(self, data: memoryview, offset: int) -> None:
        if self._start >= 0 and offset != self._end:
            if self.padding.get(self._end) == offset and offset <= self._base + CHUNK_BYTES:
                self._view[self._end - self._base:offset - self._base] = bytes(offset - self._end)
                self._end = offset
            else:
                self.flush()
        while data:
            if self._start >= 0 and self._end == self._base + CHUNK_BYTES:  # full: written as whole pages
                self.flush()
            if self._start < 0:
                self._base = offset - offset % ALIGN
                self._start = self._end = offset
            n = min(self._base + CHUNK_BYTES - self._end, len(data))
            self._view[self._end - self._base:self._end - self._base + n] = data[:n]
            self._end, offset, data = self._end + n, offset + n, data[n:]

    def flush(self) -> None:
        """The buffered run written: its whole pages directly, its ends through the page cache."""
        start, end, base = self._start, self._end, self._base
        if start < 0:
            return
        lo, hi = (-(-start // ALIGN) * ALIGN, end - end % ALIGN) if self.direct >= 0 else (end, end)
        if lo < hi:
            write_all(self.direct, self._view[lo - base:hi - base], lo, self.path)
            write_all(self.fd, self._view[start - base:lo - base], start, self.path)
            write_all(self.fd, self._view[hi - base:end - base], hi, self.path)
        else:
            write_all(self.fd, self._view[start - base:end - base], start, self.path)
        self._start = self._end = -1

    def close(self) -> None:
        try:
            self._view.release()
            self._chunk.close()
        except BufferError:  # an error's traceback still holds a slice of the chunk: freed with it
            pass
        if self.direct >= 0:
            os.close(self.direct)
            self.direct = -1
