"""Execute a plan as a stream of pieces, tensor by tensor: the one code path behind both `merge_shards`
(which writes the pieces to files) and `iter_merged` (which assembles them into tensors).

A piece is either a `RawSpan` (bytes to copy unchanged from the source shard) or a `MergedBlock` (rows of
a merged tensor, already rounded to its dtype). Source bytes are read with `pread` into buffers we own,
never mapped, so resident memory stays bounded by the row block whatever the shard size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Container, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .compute import (TORCH_DTYPES, ExpertFactors, Factors, Workspace, ZeroNormError, add_vector, as_tensor,
                      cast_rows, column_sumsq, expert_factors, finish_column_norms, make_factors, merge_rows,
                      split_experts)
from .errors import FormatError, MismatchError
from .plan import RING_SIZE, ShardPlan, TensorOp
from .tensorfile import DTYPE_BITS, TensorEntry, TensorFile


@dataclass(frozen=True, slots=True)
class RawSpan:
    """`length` unchanged bytes at absolute `offset` of the file open as `fd` (a base shard or the adapter)."""

    fd: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class MergedBlock:
    """Computed rows of a tensor; `offset` is the byte offset of the first row inside the tensor.

    `rows` views a buffer that is reused: it stays valid while the next block is computed, not longer.
    """

    offset: int
    rows: torch.Tensor


Piece = RawSpan | MergedBlock
CACHED_FACTORS = 4  # split fused-expert LoRAs kept: a layer's gate_up and down, and the next layer's


def read_exact(fd: int, buffer: bytearray | memoryview, offset: int, path: object) -> None:
    """Fill `buffer` from `fd` at `offset`, failing loudly if the file is shorter than its header says."""
    view, done = memoryview(buffer).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise FormatError(f"{path}: file ended at byte {offset + done}; it changed or was truncated while reading")
        done += got


class Files:
    """Read-only descriptors of the input files, opened on first use and closed together."""

    def __init__(self, adapter: TensorFile) -> None:
        self.adapter, self._fds, self._cache, self._seen = adapter, {}, {}, set()

    def first_use(self, entry: TensorEntry) -> bool:
        """True the first time an adapter tensor is used in this run (to check it once, not per expert)."""
        if entry.name in self._seen:
            return False
        self._seen.add(entry.name)
        return True

    def experts(self, op: TensorOp) -> ExpertFactors:
        """The fused-expert LoRA of `op` split per expert, kept while the next tensors use it (the experts of
        a layer are stored together, so a few entries suffice)."""
        pair = op.pair
        key = (pair.a.name, pair.b.name)
        if key not in self._cache:
            if len(self._cache) >= CACHED_FACTORS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = split_experts(_load(self, pair.a, op), _load(self, pair.b, op), pair.scale,
                                             pair.experts, pair.rank)
        return self._cache[key]

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@contextmanager
def open_files(adapter: TensorFile) -> Iterator[Files]:
    """Descriptors for one run; `adapter` is the adapter's weights file, where small tensors come from."""
    files = Files(adapter)
    try:
        yield files
    finally:
        files.close()


def new_workspace() -> Workspace:
    return Workspace(RING_SIZE)


def shard_pieces(shard: ShardPlan, files: Files, workspace: Workspace,
                 blocks: Callable[[TensorOp], Container[int]] | None = None
                 ) -> Iterator[tuple[TensorEntry, Iterator[Piece]]]:
    """For each output tensor of the shard, in output order: its entry and an iterator over its pieces.

    `blocks(op)`, when given, selects which row blocks of a computed tensor to produce (verification
    samples a few); by default all are."""
    base = shard.source.entry_map()
    for entry in shard.entries:
        op = shard.ops.get(entry.name)
        if op is None:
            yield entry, iter((_span(files, shard.source, base[entry.name]),))
        elif op.is_raw_copy:
            yield entry, iter((_span(files, op.source.file, op.source.entry),))
        else:
            yield entry, op_blocks(op, files, workspace, blocks(op) if blocks else None)


def _span(files: Files, file: TensorFile, entry: TensorEntry) -> RawSpan:
    return RawSpan(files.fd(file.path), file.data_offset + entry.start, entry.nbytes)


def op_blocks(op: TensorOp, files: Files, workspace: Workspace, blocks: Container[int] | None = None
              ) -> Iterator[MergedBlock]:
    """Compute one tensor in row blocks: read rows of the source, round them to the output dtype if needed,
    add the delta (and DoRA), overwrite token rows; yield each finished block (only block indexes in
    `blocks`, when given)."""
    shape = op.matrix
    reader = _RowReader(op, files, workspace, shape)
    if op.pair is not None and op.part == "bias":
        vector = _load(files, op.pair.bias, op, "F32").mul_(op.pair.scale)  # fl32(lora_B.bias · fl32(s))
        yield MergedBlock(0, add_vector(reader.rows(0, 1), vector, workspace.next_block(1, shape[1:], op.dtype)))
        return
    factors = _factors(op, files, reader) if op.pair is not None else None
    tokens = _tokens(op, files)
    out_row_bytes = math.prod(shape[1:]) * DTYPE_BITS[op.dtype] // 8
    for index, row0 in enumerate(range(0, shape[0], op.block_rows)):
        if blocks is not None and index not in blocks:
            continue
        rows = min(op.block_rows, shape[0] - row0)
        w_rows, buffers = reader.rows(row0, rows), workspace.next_block(rows, shape[1:], op.dtype)
        block = cast_rows(w_rows, buffers) if factors is None else _merge(op, w_rows, factors, row0, buffers)
        for token_id, values in tokens:
            if row0 <= token_id < row0 + rows:
                block[token_id - row0] = values
        if factors is not None and op.check_finite and op.dtype == "F16":  # finite inputs overflow only in fp16
            _check_finite(op, block, f"{op.source.file.path}: {op.name} rows {row0}..{row0 + rows - 1} merged")
        yield MergedBlock(row0 * out_row_bytes, block)


def _check_finite(op: TensorOp, values: torch.Tensor, what: str) -> None:
    """NaN or Inf in an adapter tensor, or a merge that overflows (fp16), would poison the model silently."""
    if not bool(torch.isfinite(values).all()):
        raise MismatchError(f"{what}: holds NaN or Inf; the adapter is broken or the merge overflows {op.dtype} "
                            f"(pass allow_nonfinite=True / --allow-nonfinite to write it anyway)")


class _RowReader:
    """Rows of an op's source, in the output dtype (a replacement stored in another dtype is rounded
    first, as loading it into the base parameter does in PEFT)."""

    def __init__(self, op: TensorOp, files: Files, workspace: Workspace, shape: tuple[int, ...]) -> None:
        self.op, self.workspace, self.shape = op, workspace, shape
        self.fd, self.file = files.fd(op.source.file.path), op.source.file
        self.entry = op.source.entry
        self.row_bytes = math.prod(shape[1:]) * DTYPE_BITS[self.entry.dtype] // 8

    def rows(self, row0: int, rows: int) -> torch.Tensor:
        view = self.workspace.raw("read", rows * self.row_bytes)
        read_exact(self.fd, view, self.file.data_offset + self.entry.start + row0 * self.row_bytes, self.file.path)
        w = as_tensor(view, self.entry.dtype, (rows, *self.shape[1:]))
        if self.entry.dtype == self.op.dtype:
            return w
        return self.workspace.tensor("source", self.op.dtype, w.shape).copy_(w)


def _merge(op: TensorOp, w_rows: torch.Tensor, factors: Factors, row0: int, buffers) -> torch.Tensor:
    try:
        return merge_rows(w_rows, factors, row0, buffers)
    except ZeroNormError as e:
        raise _zero_norm(op, e) from None


def _zero_norm(op: TensorOp, e: ZeroNormError) -> MismatchError:
    return MismatchError(f"{op.name}: DoRA norm of {e.axis} {e.index} of W + ΔW is zero; the merged weight "
                         f"would be NaN (PEFT has no epsilon either)")


def _factors(op: TensorOp, files: Files, reader: _RowReader) -> Factors:
    pair = op.pair
    if pair.kind == "experts":  # the fused factors serve every expert of a layer: split them once
        return expert_factors(files.experts(op), expert=pair.expert, rows=pair.rows,
                              transposed=pair.transposed, round_delta=op.round_delta)
    magnitude = _load(files, pair.magnitude, op) if pair.magnitude is not None else None
    factors = make_factors(_load(files, pair.a, op), _load(files, pair.b, op), pair.scale, op.transpose,
                           round_delta=op.round_delta, magnitude=magnitude)
    if magnitude is None or not op.transpose:
        return factors
    sumsq = None  # DoRA per column needs every row first: a first pass over the blocks for the norms
    for row0 in range(0, reader.shape[0], op.block_rows):
        rows = min(op.block_rows, reader.shape[0] - row0)
        sumsq = column_sumsq(reader.rows(row0, rows), factors, row0,
                             reader.workspace.next_block(rows, reader.shape[1:], op.dtype), sumsq)
    try:
        return finish_column_norms(sumsq, factors)
    except ZeroNormError as e:
        raise _zero_norm(op, e) from None


def _tokens(op: TensorOp, files: Files) -> list[tuple[int, torch.Tensor]]:
    if op.tokens is None:
        return []
    values = _load(files, op.tokens.values, op).to(TORCH_DTYPES[op.dtype])  # one rounding of each trained row
    return list(zip(op.tokens.indices, values, strict=True))


def _load(files: Files, entry: TensorEntry, op: TensorOp, dtype: str | None = None) -> torch.Tensor:
    """A whole (small) adapter tensor for `op`: factors, magnitudes, biases, token rows. The first time a
    run loads it, it is checked for NaN/Inf (unless the op allows them)."""
    file = files.adapter
    buffer = bytearray(entry.nbytes)
    read_exact(files.fd(file.path), buffer, file.data_offset + entry.start, file.path)
    tensor = as_tensor(buffer, entry.dtype, entry.shape)
    if op.check_finite and files.first_use(entry):
        _check_finite(op, tensor, f"{file.path}: tensor {entry.name!r} (for {op.name})")
    return tensor.to(TORCH_DTYPES[dtype]) if dtype else tensor
