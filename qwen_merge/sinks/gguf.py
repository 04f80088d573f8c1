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

import math
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from ..compute.pieces import Block, Piece
from ..errors import NonFiniteError, OutputError
from ..inputs.sources import read_exact
from ..planning.gguflayout import ALIGNMENT, GGML_TYPES, GGUFLayout, Placement
from ..planning.memory import RING_SIZE
from ..progress import progress_bar
from .ggufheader import header_bytes
from .output import _fsync_dir, write_error
from .resume import ResumeRecord, staged
from .scatter import ScatterWriter

if TYPE_CHECKING:  # for annotations only
    from ..inputs.tensorfile import TensorEntry
    from ..planning.ggufmeta import MetaField
    from .base import ShardStream

READ_BYTES = 8 << 20  # the span of unchanged bytes read and converted at once
QUEUE_ITEMS = 4  # pieces waiting for each converter thread
LANES = 2  # converter threads: Q8_0 takes more CPU than the merge; bf16 measured faster with two as well
_STOP = object()  # the end of the converter's queue


class GGUFSink:
    """A merge into the GGUF file `dest`, as a context manager: entering creates (or, with `resume`, reopens)
    the partial folder beside `dest`, its file and resume state; `consume` writes the header and every
    tensor, records each shard once its bytes are synced, then syncs the file and moves it to `dest`. An
    error removes a partial folder this run created; an interrupt or a kill leaves it for `resume`."""

    ring_size = RING_SIZE  # computed blocks alive at once: queued, converted and written while the next computes

    def __init__(self, dest: Path, layout: GGUFLayout, fields: Sequence[MetaField], run: ResumeRecord, *,
                 resume: bool, progress: bool, allow_nonfinite: bool = False) -> None:
        self.dest, self.layout, self.fields, self.progress = dest, layout, fields, progress
        self._finite = not allow_nonfinite  # a value that becomes Inf in F16 stops the merge, as in a folder
        self._run, self._resume, self._stack = run, resume, ExitStack()

    def __enter__(self) -> GGUFSink:
        with self._stack as stack:
            self.state = staged(stack, self.dest, self._run, resume=self._resume, shard_files=False)
            folder = self.state.path.parent
            self.path = folder / self.dest.name
            if self.state.done and not self.path.is_file():
                raise OutputError(f"{self.path}: the interrupted merge recorded shards as written but its file is "
                                  f"missing; remove {folder} to start over")
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
        """The header, then every piece handed to a converter thread as it is computed: the caller's thread
        merges while the converters convert and write (Q8_0 costs more CPU than the merge itself)."""
        header = self._header()
        self._data_start = start = _aligned(len(header))
        self._write(memoryview(header), 0)
        tensors = self.layout.tensors
        padding = {start + a.offset + a.nbytes: start + b.offset for a, b in zip(tensors, tensors[1:])}
        bar = progress_bar(self.layout.data_bytes, "writing GGUF", enabled=self.progress)
        with bar, _Converter(self, padding, bar.update) as converter:
            bar.update(sum(self.layout.shard_bytes[name] for name in self.state.done))
            for stream in streams:
                for entry, pieces in stream.tensors():
                    placements = self.layout.placements.get(entry.name)
                    for piece in pieces:
                        converter.put((entry, placements, piece, stream.shard.source.path))
                converter.put(stream)
            converter.close()
        self._finish()

    def _shard_written(self, stream: ShardStream) -> None:
        """On the finisher thread: every piece of the shard is written; sync and record it."""
        self._sync()
        self.state.record(stream.shard.name, self.layout.shard_bytes[stream.shard.name], None)
        stream.finished()

    def _header(self) -> bytes:
        """The header: metadata and tensor infos."""
        return header_bytes(self.layout.arch, self.fields, self.layout.tensors, GGML_TYPES)

    def _piece(self, entry: TensorEntry, placements: Sequence[Placement] | None, piece: Piece, path: Path,
               out: ScatterWriter) -> int:
        """One piece of a checkpoint tensor converted and written; returns the GGUF bytes written. A copied
        tensor is one span from its first byte; a computed one comes as blocks of whole rows. A tensor the
        file leaves out (no placements) is dropped."""
        row = entry.nbytes // max(1, math.prod(entry.shape[:-1]))  # bytes of one checkpoint row
        if isinstance(piece, Block):
            try:
                return self._rows(placements, entry, piece.offset // row, piece.data, row, out) if placements else 0
            finally:
                piece.release()
        written = 0
        if placements:
            step = max(1, READ_BYTES // row) * row
            buffer = memoryview(bytearray(min(step, piece.length)))
            for start in range(0, piece.length, step):
                view = buffer[:min(step, piece.length - start)]
                read_exact(piece.fd, view, piece.offset + start, path)
                written += self._rows(placements, entry, start // row, view, row, out)
        return written

    def _rows(self, placements: Sequence[Placement], entry: TensorEntry, first: int, data: memoryview,
              row: int, out: ScatterWriter) -> int:
        """Rows `first`.. of a checkpoint tensor (`row` bytes each, in `data`), converted and written where
        the placements put them; returns the GGUF bytes written."""
        written = 0
        for part, where in self._parts(placements, entry, first, data, row):
            out.write(part, where)
            written += len(part)
        return written

    def _parts(self, placements: Sequence[Placement], entry: TensorEntry, first: int, data: memoryview,
               row: int) -> Iterator[tuple[memoryview, int]]:
        """The GGUF bytes of rows `first`.. of a checkpoint tensor, each with the file offset it goes to."""
        from ..compute.ggufquant import encode

        count = len(data) // row
        for p in placements:
            lo, hi = max(first, p.source_row), min(first + count, p.source_row + p.rows)
            if lo >= hi:
                continue
            tensor = self.layout.tensors[p.tensor]
            where = self._data_start + tensor.offset + (p.dest_row + lo - p.source_row) * tensor.row_bytes
            try:
                for part in encode(data[(lo - first) * row:(hi - first) * row], entry.dtype, tensor.shape[-1],
                                   tensor.ggml_type, finite=self._finite):
                    yield part, where
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


class _ShardEnd:
    """A shard's end, sent to every lane: the last lane to reach it (each having written its pieces of the
    shard) syncs and records the shard."""

    def __init__(self, stream: ShardStream, lanes: int) -> None:
        self.stream, self._left, self._lock = stream, lanes, threading.Lock()

    def arrive(self) -> bool:
        with self._lock:
            self._left -= 1
            return self._left == 0


class _Lane:
    """One converter thread with its queue and its writer (a disk thread of its own)."""

    def __init__(self, converter: _Converter, sink: GGUFSink, padding: Mapping[int, int]) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_ITEMS)
        self.out = ScatterWriter(sink.path, sink.fd, padding)
        self.thread = threading.Thread(target=converter.run, args=(self,), name="qwen-merge-gguf", daemon=True)


class _Converter:
    """The converter threads (`LANES`), each taking `(entry, placements, piece, path)` from
    its short queue (a piece goes to the emptiest) and writing at the piece's place, which no other piece
    shares; a shard's `ShardStream` goes to every lane after its pieces. A computed block's ring buffer is
    released once converted and written, so the ring bounds what waits. An error on a lane is raised by
    the next `put` or by `close`; after it the lanes only release what they are handed, so the caller never
    waits on a full queue."""

    def __init__(self, sink: GGUFSink, padding: Mapping[int, int], advance: Callable[[int], None]) -> None:
        self.sink, self.advance = sink, advance
        self.error: BaseException | None = None
        self.lanes = [_Lane(self, sink, padding) for _ in range(LANES)]
        self.finished: queue.SimpleQueue = queue.SimpleQueue()  # shards written, to sync and record
        self.finisher = threading.Thread(target=self._finish, name="qwen-merge-gguf-sync", daemon=True)

    def __enter__(self) -> _Converter:
        for lane in self.lanes:
            lane.thread.start()
        self.finisher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()  # after an error on the caller's side: stop after what is queued

    def put(self, item: object) -> None:
        """A piece, to the lane with the shortest queue (Q8_0's pieces cost more than the merge made them);
        or a shard's stream, to every lane."""
        if self.error is not None:
            raise self.error
        if isinstance(item, tuple):
            min(self.lanes, key=lambda lane: lane.queue.qsize()).queue.put(item)
        else:
            end = _ShardEnd(item, len(self.lanes))
            for lane in self.lanes:
                lane.queue.put(end)

    def close(self) -> None:
        """Wait for everything queued to be written; raise a lane's error."""
        self._stop()
        if self.error is not None:
            raise self.error

    def _stop(self) -> None:
        for lane in self.lanes:
            if lane.thread.is_alive():
                lane.queue.put(_STOP)
        for lane in self.lanes:
            if lane.thread.ident is not None:
                lane.thread.join()
            lane.out.close()
        if self.finisher.is_alive():
            self.finished.put(_STOP)
            self.finisher.join()

    def _finish(self) -> None:
        """The finisher thread: each written shard synced and recorded while the lanes go on (a sync waits
        for the device)."""
        while (stream := self.finished.get()) is not _STOP:
            try:
                if self.error is None:
                    self.sink._shard_written(stream)
            except BaseException as e:  # kept for the caller's thread, which raises it
                self.error = e

    def run(self, lane: _Lane) -> None:
        from ..compute.ggufquant import one_thread

        one_thread()
        while (item := lane.queue.get()) is not _STOP:
            if self.error is not None:
                _release(item)
                continue
            try:
                if isinstance(item, tuple):
                    self.advance(self.sink._piece(*item, lane.out))
                else:
                    lane.out.wait()
                    if item.arrive():
                        self.finished.put(item.stream)
            except BaseException as e:  # kept for the caller's thread, which raises it
                self.error = e
                _release(item)


def _release(item: object) -> None:
    if isinstance(item, tuple) and isinstance(item[2], Block):
        item[2].release()
