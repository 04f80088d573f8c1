"""The GGUF sink: the merged model written as one GGUF file for llama.cpp, Ollama and other GGUF readers,
tensor by tensor as the merge produces it, with no safetensors copy in between.

The file's layout is known before the first byte (`planning.gguflayout`): the header (metadata and
tensor infos, made with the `gguf` package's writer) is written first, then each computed block or copied
span of a checkpoint tensor is converted to its GGUF type (`compute.ggufquant`) and written at its place
in the data section, so the experts of a MoE layer go into their stacked tensor slice after slice and
nothing is gathered in memory. The file is built inside a hidden folder beside the destination and moved
to it by one rename once complete and synced: a failed or killed run leaves no file at the destination.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from ..compute.pieces import Block, Piece
from ..errors import NonFiniteError, OutputError
from ..inputs.sources import read_exact
from ..planning.gguflayout import ALIGNMENT, GGML_TYPES, GGUFLayout, Placement
from ..progress import progress_bar
from .output import _fsync_dir, staging_folder, write_error
from .resume import ResumeRecord, ResumeState

if TYPE_CHECKING:  # for annotations only
    from ..inputs.tensorfile import TensorEntry
    from ..planning.ggufmeta import MetaField
    from .base import ShardStream

READ_BYTES = 8 << 20  # the span of unchanged bytes read and converted at once


class GGUFSink:
    """A merge into the GGUF file `dest`, as a context manager: entering creates (or, with `resume`, reopens)
    the partial folder beside `dest`, its file and resume state; `consume` writes the header and every
    tensor, records each shard once its bytes are synced, then syncs the file and moves it to `dest`. An
    error removes a partial folder this run created; an interrupt or a kill leaves it for `resume`."""

    ring_size = 1  # each block is converted and written before the next is computed

    def __init__(self, dest: Path, layout: GGUFLayout, fields: Sequence[MetaField], run: ResumeRecord, *,
                 resume: bool, progress: bool, allow_nonfinite: bool = False) -> None:
        self.dest, self.layout, self.fields, self.progress = dest, layout, fields, progress
        self._finite = not allow_nonfinite  # a value that becomes Inf in F16 stops the merge, as in a folder
        self._run, self._resume, self._stack = run, resume, ExitStack()

    def __enter__(self) -> GGUFSink:
        with self._stack as stack:
            folder, fresh = stack.enter_context(staging_folder(self.dest, resume=self._resume))
            self.path = folder / self.dest.name
            self.state = ResumeState(folder, self._run) if fresh else \
                ResumeState.load(folder, self._run, shard_files=False)
            if self.state.done and not self.path.is_file():
                raise OutputError(f"{self.path}: the interrupted merge recorded shards as written but its file is "
                                  f"missing; remove {folder} to start over")
            self.state.save()
            self.fd = _open(self.path)
            stack.callback(os.close, self.fd)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> bool | None:
        return self._stack.__exit__(*exc)

    def done(self) -> frozenset[str]:
        return frozenset(self.state.done)

    @property
    def remaining_bytes(self) -> int:
        """The file's bytes still to write (the header counted at most as 64 MiB, a vocabulary's worth)."""
        return (64 << 20) + self.layout.data_bytes - sum(self.layout.shard_bytes[name] for name in self.state.done)

    def consume(self, streams: Iterator[ShardStream]) -> None:
        header = self._header()
        self._data_start = _aligned(len(header))
        self._write(memoryview(header), 0)
        bar = progress_bar(self.layout.data_bytes, "writing GGUF", enabled=self.progress)
        with bar:
            bar.update(sum(self.layout.shard_bytes[name] for name in self.state.done))
            for stream in streams:
                for entry, pieces in stream.tensors():
                    self._tensor(entry, pieces, stream.shard.source.path, bar.update)
                self._sync()
                self.state.record(stream.shard.name, self.layout.shard_bytes[stream.shard.name], None)
                stream.finished()
        self._finish()

    def _header(self) -> bytes:
        """The header, metadata and tensor infos, as the `gguf` package's writer makes them."""
        import gguf
        import numpy

        writer = gguf.GGUFWriter(path=None, arch=self.layout.arch)
        for field in self.fields:
            sub_type = gguf.GGUFValueType[field.item_kind] if field.item_kind else None
            writer.add_key_value(field.key, field.value, gguf.GGUFValueType[field.kind], sub_type=sub_type)
        for t in self.layout.tensors:
            # the logical shape with a float dtype: the writer stores it as given (reversed, as ggml counts)
            writer.add_tensor_info(t.name, t.shape, numpy.float32, t.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(GGML_TYPES[t.ggml_type]))
        with tempfile.TemporaryDirectory(dir=self.path.parent) as scratch:
            header = Path(scratch) / "header.gguf"
            writer.write_header_to_file(path=header)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            writer.close()
            return header.read_bytes()

    def _tensor(self, entry: TensorEntry, pieces: Iterator[Piece], path: Path, advance) -> None:
        placements = self.layout.placements.get(entry.name)
        cols = entry.shape[-1] if entry.shape else 1
        source_row = entry.nbytes // max(1, _rows_of(entry))
        for piece in pieces:
            if isinstance(piece, Block):
                try:
                    if placements is not None:
                        self._rows(placements, entry, piece.offset // source_row, piece.data, cols)
                finally:
                    piece.release()
                continue
            if placements is None:
                continue
            step = max(1, READ_BYTES // source_row) * source_row
            buffer = bytearray(min(step, piece.length))
            for start in range(0, piece.length, step):
                view = memoryview(buffer)[:min(step, piece.length - start)]
                read_exact(piece.fd, view, piece.offset + start, path)
                self._rows(placements, entry, start // source_row, view, cols)
        if placements is not None:
            advance(sum(p.rows * self.layout.tensors[p.tensor].row_bytes for p in placements))

    def _rows(self, placements: Sequence[Placement], entry: TensorEntry, first: int, data: memoryview,
              cols: int) -> None:
        """Rows `first`.. of a checkpoint tensor (their bytes in `data`), converted and written where the
        placements put them."""
        from ..compute.ggufquant import encode

        source_row = len(data) // max(1, (count := _count(data, entry)))
        for p in placements:
            lo, hi = max(first, p.source_row), min(first + count, p.source_row + p.rows)
            if lo >= hi:
                continue
            tensor = self.layout.tensors[p.tensor]
            rows = data[(lo - first) * source_row:(hi - first) * source_row]
            where = self._data_start + tensor.offset + (p.dest_row + lo - p.source_row) * tensor.row_bytes
            try:
                for part in encode(rows, entry.dtype, cols, tensor.ggml_type, finite=self._finite):
                    self._write(part, where)
                    where += len(part)
            except NonFiniteError as e:
                raise NonFiniteError(f"tensor {entry.name!r} ({tensor.name}, {tensor.ggml_type}) {e}; write "
                                     f"--outtype bf16, or pass allow_nonfinite=True / --allow-nonfinite to write "
                                     f"the Inf anyway") from e

    def _write(self, data: memoryview, offset: int) -> None:
        data = data.cast("B")
        try:
            while data:
                written = os.pwrite(self.fd, data, offset)
                data, offset = data[written:], offset + written
        except OSError as e:
            raise write_error(self.path, e) from e

    def _sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise write_error(self.path, e) from e

    def _finish(self) -> None:
        """Pad the file to its full size, sync it and move it to `dest`."""
        size = self._data_start + self.layout.data_bytes
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError as e:
            raise write_error(self.path, e) from e
        self.state.remove()
        folder = self.path.parent
        try:
            if self.dest.is_dir():
                raise OutputError(f"{self.dest}: a folder appeared at the destination while merging; nothing was "
                                  f"replaced")
            os.replace(self.path, self.dest)
            _fsync_dir(self.dest.parent)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot move the finished file into place: {e.strerror or e}") from e
        shutil.rmtree(folder, ignore_errors=True)


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not truncated: a resumed run keeps what it has
    except OSError as e:
        raise write_error(path, e) from e


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _rows_of(entry: TensorEntry) -> int:
    rows = 1
    for n in entry.shape[:-1]:
        rows *= n
    return rows


def _count(data: memoryview, entry: TensorEntry) -> int:
    return len(data) * _rows_of(entry) // entry.nbytes if entry.nbytes else 0
