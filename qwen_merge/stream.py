"""Execute a plan as a stream of pieces, tensor by tensor: the one code path behind both `merge_shards`
(which writes the pieces to files) and `iter_merged` (which assembles them into tensors).

A piece is either a `RawSpan` (bytes to copy unchanged from the source shard) or a `MergedBlock` (rows of
a merged tensor, already rounded to its dtype). Source bytes are read with `pread` into buffers we own,
never mapped, so resident memory stays bounded by the row block whatever the shard size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .compute import Factors, Workspace, as_tensor, make_factors, merge_rows
from .errors import FormatError
from .plan import RING_SIZE, PlannedMerge, ShardPlan
from .tensorfile import TensorEntry


@dataclass(frozen=True, slots=True)
class RawSpan:
    """`length` unchanged bytes at absolute `offset` of the source shard."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class MergedBlock:
    """Merged rows of a tensor; `offset` is the byte offset of the first row inside the tensor.

    `rows` views a buffer that is reused: it stays valid while the next block is computed, not longer.
    """

    offset: int
    rows: torch.Tensor


Piece = RawSpan | MergedBlock


def read_exact(fd: int, buffer: bytearray | memoryview, offset: int, path: object) -> None:
    """Fill `buffer` from `fd` at `offset`, failing loudly if the file is shorter than its header says."""
    view, done = memoryview(buffer).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise FormatError(f"{path}: file ended at byte {offset + done}; it changed or was truncated while reading")
        done += got


@contextmanager
def open_sources(shard: ShardPlan, adapter_path: os.PathLike) -> Iterator[tuple[int, int]]:
    """File descriptors of a source shard and of the adapter weights, closed afterwards."""
    src = os.open(shard.source.path, os.O_RDONLY)
    try:
        ada = os.open(adapter_path, os.O_RDONLY)
        try:
            yield src, ada
        finally:
            os.close(ada)
    finally:
        os.close(src)


def shard_pieces(shard: ShardPlan, src: int, ada: int, adapter_data_offset: int, workspace: Workspace
                 ) -> Iterator[tuple[TensorEntry, Iterator[Piece]]]:
    """For each tensor of the shard in data order: the entry and an iterator over its pieces.

    `workspace` (one per run, `new_workspace()`) holds the reused block buffers."""
    base = shard.source.data_offset
    for entry in shard.source.entries:
        merge = shard.merges.get(entry.name)
        if merge is None:
            yield entry, iter((RawSpan(base + entry.start, entry.nbytes),))
        else:
            yield entry, merged_blocks(entry, merge, src, base, ada, adapter_data_offset, shard.source.path,
                                       workspace)


def new_workspace() -> Workspace:
    return Workspace(RING_SIZE)


def merged_blocks(entry: TensorEntry, merge: PlannedMerge, src: int, base: int, ada: int, ada_base: int,
                  path: object, workspace: Workspace) -> Iterator[MergedBlock]:
    """Merge one tensor in row blocks: read rows of W, add the scaled delta, yield the rounded rows."""
    factors = _load_factors(merge, ada, ada_base)
    rows_total, row_bytes, row_shape = entry.shape[0], entry.row_bytes, entry.shape[1:]
    for row0 in range(0, rows_total, merge.block_rows):
        rows = min(merge.block_rows, rows_total - row0)
        view = workspace.raw("read", rows * row_bytes)
        read_exact(src, view, base + entry.start + row0 * row_bytes, path)
        w_rows = as_tensor(view, entry.dtype, (rows, *row_shape))
        buffers = workspace.next_block(rows, row_shape, entry.dtype)
        yield MergedBlock(row0 * row_bytes, merge_rows(w_rows, factors, row0, buffers))


def _load_factors(merge: PlannedMerge, ada: int, ada_base: int) -> Factors:
    def load(e: TensorEntry) -> torch.Tensor:
        buffer = bytearray(e.nbytes)
        read_exact(ada, buffer, ada_base + e.start, "adapter weights")
        return as_tensor(buffer, e.dtype, e.shape)

    return make_factors(load(merge.pair.a), load(merge.pair.b), merge.pair.scale, merge.transpose)
