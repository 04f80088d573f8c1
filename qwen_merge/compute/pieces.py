"""What travels from the planner's shards to the writer: pieces of bytes, and the buffers they live in.

A shard's tensor data is a sequence of pieces in file order:
* `RawSpan`: bytes copied unchanged from an input file (a base shard, or an adapter tensor that replaces
  a base tensor in the same dtype); the writer copies them in the kernel;
* `Block`: computed rows of a tensor, already in the output dtype, in a buffer from the `BlockRing`.

This module does not import torch: only `stream`/`compute` turn bytes into tensors and back, and only
for the tensors the plan computes. `shard_pieces` (per tensor, for `iter_merged` and `verify`) and
`shard_runs` (adjacent unchanged tensors as one span, for writing) take the computation as a function.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..inputs.sources import Files
from ..inputs.tensorfile import TensorEntry, TensorFile
from ..planning.memory import BATCH_BYTES
from ..planning.plan import OpKind, ShardPlan, TensorOp


@dataclass(frozen=True, slots=True)
class RawSpan:
    """`length` unchanged bytes at absolute `offset` of the file open as `fd`."""

    fd: int
    offset: int
    length: int


class Shared:
    """A pooled buffer lent to one consumer at a time, often on another thread: the consumer's `release`
    gives it back to its pool (`give_back`)."""

    __slots__ = ("_give_back",)

    def __init__(self, give_back: Callable[[Shared], None]) -> None:
        self._give_back = give_back

    def release(self) -> None:
        self._give_back(self)


class RingSlot(Shared):
    """One reusable output buffer of the ring; grows to the largest block it has held."""

    __slots__ = ("buffer",)

    def __init__(self, ring: BlockRing) -> None:
        super().__init__(ring.give_back)
        self.buffer = bytearray()

    def view(self, nbytes: int) -> memoryview:
        if len(self.buffer) < nbytes:
            self.buffer = bytearray(nbytes)
        return memoryview(self.buffer)[:nbytes]


class BlockRing:
    """The output buffers of computed blocks, and the one rule about them: a block's buffer is reused only
    after its consumer has released it (the writer's assembler, once it is copied into a staging chunk, or
    the sink that assembles a tensor from it). `take` waits while all `size` slots are in use, which also bounds memory."""

    def __init__(self, size: int) -> None:
        self._free: queue.SimpleQueue[RingSlot] = queue.SimpleQueue()
        for _ in range(size):
            self._free.put(RingSlot(self))

    def take(self) -> RingSlot:
        return self._free.get()

    def give_back(self, slot: RingSlot) -> None:
        self._free.put(slot)


@dataclass(frozen=True, slots=True)
class Block:
    """Computed rows of a tensor; `offset` is the byte offset of the first row inside the tensor. `data`
    views `slot`'s buffer, valid until the block is released."""

    offset: int
    data: memoryview
    slot: RingSlot

    def release(self) -> None:
        self.slot.release()


Piece = RawSpan | Block
COPY = OpKind.COPY  # the kind whose bytes are copied, not computed (a name: `OpKind.COPY` costs 0.2 µs a tensor)
ComputeOp = Callable[[TensorOp], Iterator[Block]]
ComputeBatch = Callable[[tuple[TensorOp, ...]], Iterator[Block]]


def shard_pieces(shard: ShardPlan, files: Files, compute: ComputeOp) -> Iterator[tuple[TensorEntry, Iterator[Piece]]]:
    """For each output tensor of the shard, in output order: its entry and an iterator over its pieces.
    `compute(op)` yields the blocks of a tensor the plan computes; it is called lazily, when the
    tensor's pieces are iterated."""
    for entry in shard.entries:
        op = shard.ops.get(entry.name)
        if op is None:
            yield entry, iter((span(files, *shard.copy_source(entry.name)),))
        elif op.kind is COPY:
            yield entry, iter((span(files, op.source.file, op.source.entry),))
        else:
            yield entry, compute(op)


def shard_runs(shard: ShardPlan, files: Files, compute: ComputeOp, compute_batch: ComputeBatch) -> Iterator[Piece]:
    """The shard's pieces in file order, for writing, with two economies for models of many tensors:
    adjacent unchanged bytes of one input file become one span (one copy call, however many tensors it
    holds; the run is kept as numbers until it ends), and adjacent small per-expert tensors are merged as
    one batch (`compute_batch`, one block)."""
    entries, ops = shard.entries, shard.ops
    run = _Run()
    i = 0
    while i < len(entries):
        op = ops.get(entries[i].name)
        if op is None or op.kind is COPY:
            file, entry = shard.copy_source(entries[i].name) if op is None else (op.source.file, op.source.entry)
            if (span := run.extend(files.fd(file.path), file.data_offset + entry.start, entry.nbytes)) is not None:
                yield span
            i += 1
            continue
        if (span := run.end()) is not None:
            yield span
        batch = _batch(shard, i) if op.batchable else ()
        if len(batch) > 1:
            yield from compute_batch(batch)
            i += len(batch)
        else:
            yield from compute(op)
            i += 1
    if (span := run.end()) is not None:
        yield span


class _Run:
    """Adjacent bytes of one input file being gathered into one span."""

    __slots__ = ("fd", "start", "stop")

    def __init__(self) -> None:
        self.fd, self.start, self.stop = -1, 0, 0

    def extend(self, fd: int, offset: int, length: int) -> RawSpan | None:
        """Add these bytes; returns the run they do not continue, now complete."""
        if fd == self.fd and offset == self.stop:
            self.stop += length
            return None
        done = self.end()
        self.fd, self.start, self.stop = fd, offset, offset + length
        return done

    def end(self) -> RawSpan | None:
        if self.fd < 0:
            return None
        done = RawSpan(self.fd, self.start, self.stop - self.start)
        self.fd = -1
        return done


def _batch(shard: ShardPlan, first: int) -> tuple[TensorOp, ...]:
    """The batchable ops from entry `first` on that follow each other, up to BATCH_BYTES."""
    entries, ops = shard.entries, shard.ops
    batch = [ops[entries[first].name]]
    size = batch[0].source.entry.nbytes
    for k in range(first + 1, len(entries)):
        op = ops.get(entries[k].name)
        if op is None or not op.batchable or not op.follows(batch[-1]) or size + entries[k].nbytes > BATCH_BYTES:
            break
        batch.append(op)
        size += entries[k].nbytes
    return tuple(batch)


def span(files: Files, file: TensorFile, entry: TensorEntry) -> RawSpan:
    return RawSpan(files.fd(file.path), file.data_offset + entry.start, entry.nbytes)
