"""Reading the input files' bytes: descriptors opened once per run, exact positioned reads, and the one
value comparison planning needs. No torch and no mmap: bytes are read with `pread` into buffers the
caller owns, so resident memory stays what the caller allocated.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy

from .errors import FormatError
from .tensorfile import DTYPE_BITS, TensorEntry, TensorFile

CHUNK_BYTES = 16 << 20


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
    manager). Each is opened for sequential reading, so the kernel reads ahead further."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Files:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _chunks(f, file: TensorFile, e: TensorEntry):
    for start in range(e.start, e.end, CHUNK_BYTES):
        f.seek(file.data_offset + start)
        yield f.read(min(CHUNK_BYTES, e.end - start))
