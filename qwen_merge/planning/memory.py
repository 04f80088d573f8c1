"""The memory model: what a merge keeps resident, predicted from the plan before anything runs.

`plan` shows the prediction; `tests/test_memory.py` checks the measured peak (VmHWM) stays under it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..dtypes import DTYPE_BITS
from ..inputs.digest import HASH_READ_BYTES
from ..inputs.sources import TAIL_ROOM

if TYPE_CHECKING:  # for annotations only: the planner imports this module
    from .plan import TensorOp

# Resident size of the interpreter with torch, numpy and tqdm imported, measured on Linux x86-64.
RUNTIME_BYTES = 256 << 20
THREADS_BYTES = 16 << 20  # the writer, hashing and finishing threads: stacks, heap arenas
# The writer's staging chunks: each is one direct write and one hash update. Each write and update lets go
# of the GIL and waits to take it back while the merging thread runs Python; 8 MiB chunks halve those waits
# against 4 MiB (a merge of 18,867 small tensors: 5 % faster; the disk writes 8 MiB at the speed of 4 MiB).
STAGING_CHUNK_BYTES, STAGING_CHUNKS = 8 << 20, 4
# The plan's Python objects (entries, headers, ops, pairs), measured on an 18,867-tensor MoE: 6 MiB with 192
# ops, 37 MiB with 18,528
PLAN_BYTES_PER_TENSOR, PLAN_BYTES_PER_OP = 512, 2048
RING_SIZE = 8  # computed blocks alive at once: computed, queued behind copies, written and hashed
BATCH_BYTES = 4 << 20  # most bytes of adjacent per-expert tensors merged as one batch (one read, one block)
SUB_BLOCK_BYTES = 1 << 20  # fp32 scratch per sub-block (compute.SUB_BLOCK_BYTES)


def predict_peak(ops: Iterable[TensorOp], tensors: int = 0) -> int:
    """Runtime, threads and their buffers + the plan itself (`tensors` output tensors and `ops`) + the
    largest op's working set: the factors, raw and in fp32; a read buffer and RING_SIZE output buffers per
    row block (per batch, for small experts); fp32 sub-block scratch (1 MiB each, unless a row is larger:
    the delta scratch holds at least two rows) and the finiteness mask; token rows, and DoRA's norms."""
    ops = list(ops)
    shapes = {_shape_key(op): op for op in ops}  # thousands of experts share a handful of shapes
    plan = PLAN_BYTES_PER_TENSOR * tensors + PLAN_BYTES_PER_OP * len(ops)
    fixed = RUNTIME_BYTES + THREADS_BYTES + STAGING_CHUNKS * STAGING_CHUNK_BYTES + HASH_READ_BYTES
    return fixed + plan + max((_working_set(op) for op in shapes.values()), default=0)


def _shape_key(op: TensorOp) -> tuple:
    pair = op.pair
    return (op.matrix, op.dtype, op.block_rows, pair and (pair.a.shape, pair.b.shape, pair.magnitude is not None),
            op.tokens and op.tokens.values.shape, op.shape, op.dequant is not None, op.requant is not None,
            op.packed and tuple(s.entry.nbytes for s in op.packed.companions),
            op.scales_of and _shape_key(op.scales_of))


def _working_set(op: TensorOp) -> int:
    if op.scales_of is not None:  # the new scales of a requantized weight: that weight's rows again
        return _working_set(op.scales_of) + op.source.entry.nbytes
    factors = math.prod(op.pair.a.shape) + math.prod(op.pair.b.shape) if op.pair else 0
    # raw, fp32 and oriented; wide (float64) ops add two float64 halves of each and the split's temporaries
    extra = (3 * 4 + (64 if op.wide else 0)) * factors
    extra += 2 * 4 * math.prod(op.tokens.values.shape) if op.tokens else 0
    extra += 16 * max(op.shape) if op.pair and op.pair.magnitude is not None else 0
    if op.batchable:  # adjacent small experts merged as one block: BATCH_BYTES read ahead (two buffers),
        # in each ring slot, and as fp32 twice (the weights and the delta) and the rounded delta once
        fp32 = BATCH_BYTES * 4 // (DTYPE_BITS[op.dtype] // 8)
        return extra + 2 * (BATCH_BYTES + TAIL_ROOM) + RING_SIZE * BATCH_BYTES + 2 * fp32 + BATCH_BYTES
    row_elems = op.matrix[1]
    row_bytes = row_elems * DTYPE_BITS[op.dtype] // 8
    widen = 2 if op.wide else 1  # float64 scratch holds as many rows as the fp32 one: twice the bytes
    scratch = 3 * widen * max(SUB_BLOCK_BYTES, 8 * row_elems) + op.block_rows * row_elems
    if op.packed is not None:  # each byte's index (int32), the values in fp32 and in the output dtype; the tables
        scratch += (2 + 4 + DTYPE_BITS[op.dtype] // 8) * op.block_rows * row_elems
        scratch += sum(8 * s.entry.nbytes for s in op.packed.companions)  # as stored, in fp32 and decoded
    if op.dequant is not None or op.requant is not None:  # fp32 rows: dequantized, and merged before requant
        scratch += 2 * 4 * op.block_rows * row_elems + 2 * (op.dequant or op.requant).source.entry.nbytes
    return extra + (1 + RING_SIZE) * op.block_rows * max(row_bytes, 1) + scratch
