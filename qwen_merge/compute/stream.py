"""Compute the tensors a plan changes, in row blocks: the torch side of a run.

`Computer.blocks(op)` reads rows of the op's source with `pread` into buffers it owns, merges them
(`compute`), and yields each finished block as bytes in a buffer of the `BlockRing` (`pieces.Block`).
`merge_shards`, `iter_merged` and `verify_merge` all compute through it, so a tensor written to disk, one
handed to a converter and one recomputed for verification come from the same code.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterator

import torch

from ..dtypes import DTYPE_BITS
from ..errors import NonFiniteError, ZeroNormError
from ..inputs.adapter import Kind
from ..inputs.sources import Files, ReadAhead, read_exact
from ..inputs.tensorfile import TensorEntry, TensorFile
from ..planning.plan import OpKind, TensorOp
from ..planning.quant import BlockScale, PackedWeight
from ..planning.recipe import Pair, SumPair
from . import blockquant, bnb4dequant
from .arithmetic import (TORCH_DTYPES, ExpertFactors, Factors, Workspace, ZeroNormFound, add_experts, add_vector,
                         all_finite, as_tensor, batched_exact, cast_rows, column_sumsq, expert_factors, expert_rows,
                         finish_column_norms, make_factors, merge_rows, split_experts, sum_factors, widen)
from .pieces import Block, BlockRing

CACHED_FACTORS = 4  # split fused-expert LoRAs kept: a layer's gate_up and down, and the next layer's


class Computer:
    """Computes ops for one run: the adapter's file, the input descriptors, the ring the blocks go into,
    and what is kept between tensors (scratch buffers, split expert factors, which adapter tensors were
    already checked for NaN/Inf)."""

    def __init__(self, adapter: TensorFile, files: Files, ring: BlockRing, others: tuple[TensorFile, ...] = ()
                 ) -> None:
        self.adapter, self.files, self.ring = adapter, files, ring
        # several adapters: the file of each adapter tensor (the first adapter's is `adapter`)
        self._owner = {id(e): f for f in others for e in f.entries}
        self.workspace = Workspace()
        self.reader = ReadAhead(files)  # source rows: the next block is read while this one is merged
        self._experts: dict[tuple[str, str, str], ExpertFactors] = {}
        self._checked: set[tuple[str, str]] = set()
        self._new_scales: dict[str, torch.Tensor] = {}  # requantized weight -> its scales, until written

    def blocks(self, op: TensorOp, only: Container[int] | None = None) -> Iterator[Block]:
        """The op's row blocks in order (only the block indexes in `only`, when given): read the source
        rows, round them to the output dtype if needed, add the delta (and DoRA), set token rows; or
        requantize them, or write the new block scales of a requantized weight: as the op's kind says."""
        match op.kind:  # every kind has its case (tests/test_opkinds.py)
            case OpKind.MERGE | OpKind.CONVERT | OpKind.TOKENS | OpKind.COPY:  # the common kinds first
                return self._rows(op, only)
            case OpKind.BIAS:
                return self._bias(op)
            case OpKind.REQUANT:
                return self._requantized(op, only)
            case OpKind.SCALES:
                return self._scales(op)

    def _rows(self, op: TensorOp, only: Container[int] | None) -> Iterator[Block]:
        """The source rows in the output dtype, with the delta added (MERGE), then the token rows set."""
        reader = self._row_reader(op)
        factors = self._factors(op, reader) if op.pair is not None else None
        tokens = self._tokens(op)

        def fill(buffers, row0: int, rows: int) -> torch.Tensor:
            w_rows = reader.rows(row0, rows)
            out = cast_rows(w_rows, buffers) if factors is None else self._merge(op, w_rows, factors, row0, buffers)
            for token_id, values in tokens:
                if row0 <= token_id < row0 + rows:
                    out[token_id - row0] = values
            self._check_output(op, out, row0, rows)
            return out

        yield from self._row_blocks(op, only, fill)

    def _bias(self, op: TensorOp) -> Iterator[Block]:
        """fl32(lora_B.bias · fl32(s)) added as PEFT does; an fp32 output in float64 (`TensorOp.wide`)."""
        reader = self._row_reader(op)
        if isinstance(op.pair, SumPair):  # Σ wᵢ·sᵢ·biasᵢ in float64, rounded once to the working precision
            vector = sum(self._load(t.pair.bias, op, "F64").mul_(t.factor) for t in op.pair.terms)
            vector = vector.to(torch.float64 if op.wide else torch.float32)
        else:
            vector = self._load(op.pair.bias, op, "F64" if op.wide else "F32").mul_(op.pair.scale)
        yield self._block(op, 0, 1, lambda buffers, row0, rows: add_vector(reader.rows(0, 1), vector, buffers))

    def _requantized(self, op: TensorOp, only: Container[int] | None) -> Iterator[Block]:
        """The merged rows requantized to e4m3 per block; on a whole pass, the new block scales are kept
        for the op that writes them (`_scales`)."""
        reader = self._row_reader(op)
        factors = self._factors(op, reader) if op.pair is not None else None
        scales = self._scale_rows(op) if only is None else None

        def fill(buffers, row0: int, rows: int) -> torch.Tensor:
            v, new = self._requant_rows(op, reader.rows(row0, rows), factors, row0)
            if scales is not None:
                scales[row0 // op.requant.block[0]:][:new.shape[0]] = new
            return blockquant.quantize(v, new, op.requant.block, buffers.out)

        yield from self._row_blocks(op, only, fill)
        if scales is not None:
            self._new_scales[op.name] = scales

    def _row_blocks(self, op: TensorOp, only: Container[int] | None, fill) -> Iterator[Block]:
        """Each row block of the op (those in `only`, when given) computed by `fill(buffers, row0, rows)`."""
        rows_total = op.matrix[0]
        for index, row0 in enumerate(range(0, rows_total, op.block_rows)):
            if only is not None and index not in only:
                continue
            yield self._block(op, row0, min(op.block_rows, rows_total - row0), fill)

    def close(self) -> None:
        self.reader.close()

    def requant_error(self, op: TensorOp, index: int, q: memoryview, stored_scales: memoryview
                      ) -> tuple[int, int, float]:
        """For `verify`: row block `index` of a requantized weight as stored (e4m3 bytes `q`, and the bytes of
        the whole tensor's stored block scales) against the exact merged values: (elements beyond the
        rounding bound, the first of them, the largest error as a multiple of the bound)."""
        entry = op.requant.source.entry
        scales = as_tensor(stored_scales, entry.dtype, entry.shape).to(torch.float32)
        rows_total, cols = op.matrix
        row0 = index * op.block_rows
        rows, b0 = min(op.block_rows, rows_total - row0), op.requant.block[0]
        reader = self._row_reader(op)
        factors = self._factors(op, reader) if op.pair is not None else None
        v, _ = self._requant_rows(op, reader.rows(row0, rows), factors, row0)
        rows_scales = scales[row0 // b0:-(-(row0 + rows) // b0)]
        got = torch.empty(rows, cols, dtype=torch.float32)
        blockquant.dequantize(as_tensor(q, "F8_E4M3", (rows, cols)), rows_scales, op.requant.block, got,
                              torch.empty(rows, cols, dtype=torch.int32))
        bound = blockquant.rounding_bound(v, rows_scales, op.requant.block)
        ratio = (got - v).abs_().div_(bound.add_(v.abs() * 2**-20))  # + fp32 rounding of the recomputation
        ratio.nan_to_num_(nan=float("inf"))
        beyond = torch.nonzero(ratio.view(-1) > 1).view(-1)
        return len(beyond), int(beyond[0]) if len(beyond) else -1, float(ratio.max())

    def _row_reader(self, op: TensorOp) -> _RowReader | _PackedReader:
        if op.packed is not None:
            return _PackedReader(op, self.files, self.reader, self.workspace, *self._packed_tables(op.packed))
        scales = self._scales32(op.dequant) if op.dequant is not None else None
        return _RowReader(op, self.files, self.reader, self.workspace, op.matrix, scales)

    def _scale_rows(self, op: TensorOp) -> torch.Tensor:
        """An empty tensor for the new block scales of a requantized weight, filled block by block."""
        return torch.empty(op.requant.source.entry.shape, dtype=TORCH_DTYPES[op.requant.dtype])

    def _requant_rows(self, op: TensorOp, w_rows: torch.Tensor, factors: Factors | None, row0: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged rows in fp32 (a workspace buffer) and their new stored block scales."""
        rows, cols = w_rows.shape
        if w_rows.dtype == torch.float32 and op.dequant is not None:
            v = w_rows  # the dequantized rows are this run's own buffer: merged in place
        else:
            v = self.workspace.tensor("merged32", "F32", (rows, cols)).copy_(w_rows)
        if factors is not None:
            self._merge(op, v, factors, row0, self.workspace.block(rows, (cols,), "F32", v))
        return v, blockquant.new_scales(v, op.requant.block, TORCH_DTYPES[op.requant.dtype])

    def _scales(self, op: TensorOp) -> Iterator[Block]:
        """The new block scales of a requantized weight, as one block: kept from the weight's own pass when
        it came first (the planner puts scales after their weights where alignment allows), else computed
        by merging the weight's rows again (its scales are needed before its bytes)."""
        weight = op.scales_of
        slot = self.ring.take()
        try:
            data = slot.view(op.source.entry.nbytes)
            out = as_tensor(data, op.dtype, op.shape)
            stashed = self._new_scales.pop(weight.name, None)
            if stashed is not None:
                out.copy_(stashed)
            else:
                self._compute_scales(weight, out)
        except BaseException:
            self.ring.give_back(slot)
            raise
        yield Block(0, data, slot)

    def _compute_scales(self, weight: TensorOp, out: torch.Tensor) -> None:
        reader = self._row_reader(weight)
        factors = self._factors(weight, reader) if weight.pair is not None else None
        rows_total, b0 = weight.matrix[0], weight.requant.block[0]
        for row0 in range(0, rows_total, weight.block_rows):
            rows = min(weight.block_rows, rows_total - row0)
            _, scales = self._requant_rows(weight, reader.rows(row0, rows), factors, row0)
            out[row0 // b0:row0 // b0 + scales.shape[0]] = scales

    def _scales32(self, scale: BlockScale) -> torch.Tensor:
        """A base tensor's block scales (small: one value per block), read whole, in fp32."""
        return self._whole(scale.source.file, scale.source.entry).to(torch.float32)

    def _packed_tables(self, packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        """A 4-bit weight's code values and its absmax in fp32 (small: 16 values, and one per block), read
        whole."""
        def whole(source):
            return self._whole(source.file, source.entry) if source is not None else None

        state = packed.state
        absmax = bnb4dequant.absmax32(whole(packed.absmax), whole(packed.nested_absmax),
                                      whole(packed.nested_quant_map), state.nested_blocksize or 0,
                                      state.nested_offset or 0.0)
        return bnb4dequant.code_table(whole(packed.quant_map)), absmax

    def _whole(self, file: TensorFile, entry: TensorEntry) -> torch.Tensor:
        """A small tensor read whole into a buffer of its own."""
        buffer = bytearray(entry.nbytes)
        read_exact(self.files.fd(file.path), buffer, file.data_offset + entry.start, file.path)
        return as_tensor(buffer, entry.dtype, entry.shape)

    def batch(self, ops: tuple[TensorOp, ...]) -> Iterator[Block]:
        """Adjacent small per-expert tensors (`TensorOp.batchable`, each `follows` the one before) as one
        block: one read of their source bytes, and one batched product for each group of tensors that
        take the same slice of the same fused LoRA (a layer's gate, up or down projections)."""
        first, last = ops[0].source, ops[-1].source
        nbytes = last.entry.end - first.entry.start
        source = self.reader.read(self.files.fd(first.file.path), first.file.data_offset + first.entry.start,
                                  nbytes, first.file.path)
        slot = self.ring.take()
        try:
            data = slot.view(nbytes)
            self._merge_batch(ops, as_tensor(source, ops[0].dtype, (nbytes // _item(ops[0]),)),
                              as_tensor(data, ops[0].dtype, (nbytes // _item(ops[0]),)))
        except BaseException:
            self.ring.give_back(slot)
            raise
        yield Block(0, data, slot)

    def _merge_batch(self, ops: tuple[TensorOp, ...], source: torch.Tensor, out: torch.Tensor) -> None:
        """The whole batch goes to fp32 in one copy and back, rounded once, in another: each group's delta
        is added in place between them (few torch calls per batch: each lets go of the GIL and waits to
        take it back while the writer's threads run)."""
        groups: dict[tuple, list[tuple[TensorOp, int]]] = {}
        origin, item = ops[0].source.entry.start, _item(ops[0])  # a batch has one dtype (`follows`)
        for op in ops:
            pair = op.pair
            key = (pair.a.name, pair.b.name, pair.rows, op.shape)
            members = groups.get(key)
            if members is None:
                members = groups[key] = []
            members.append((op, (op.source.entry.start - origin) // item))
        acc = self.workspace.tensor("batch_acc", "F32", tuple(source.shape)).copy_(source)  # fp32(W), exact
        alone = []
        for members in groups.values():
            op, (rows, cols) = members[0][0], members[0][0].shape
            offsets = [offset for _, offset in members]
            stride = offsets[1] - offsets[0] if len(offsets) > 1 else 0
            even = all(b - a == stride for a, b in zip(offsets, offsets[1:]))
            if len(members) > 1 and even and batched_exact(rows, op.pair.rank, cols):
                self._add_group([m for m, _ in members], acc, offsets[0], stride)
            else:
                alone += members
        out.copy_(acc)  # the one rounding
        for member, offset in alone:  # one by one, exactly as a tensor outside a batch
            rows, cols = member.shape
            view = slice(offset, offset + rows * cols)
            buffers = self.workspace.block(rows, (cols,), member.dtype, out[view].view(rows, cols))
            self._merge(member, source[view].view(rows, cols), self._factors(member, None), 0, buffers)
        if ops[0].check_finite and ops[0].dtype == "F16" and not all_finite(out):
            for op in ops:
                start = (op.source.entry.start - origin) // item
                self._check_output(op, out[start:start + math.prod(op.shape)].view(op.shape), 0, op.shape[0])

    def _add_group(self, ops: list[TensorOp], acc: torch.Tensor, offset: int, stride: int) -> None:
        """The deltas of same-shaped slices of one fused LoRA, at `offset` + k·`stride` elements of the
        batch's fp32 copy `acc`."""
        rows, cols = ops[0].shape
        split = self._split(ops[0])
        every_lhs = expert_rows(split, ops[0].pair.rows)
        experts = [op.pair.expert for op in ops]
        first = experts[0]
        if experts == list(range(first, first + len(experts))):  # stored in expert order: views, no copy
            lhs, rhs = every_lhs[first:first + len(ops)], split.rhs[first:first + len(ops)]
        else:  # e.g. names sorted as text (1, 10, 100, ...): gathered, contiguous as the views are
            index = torch.tensor(experts)
            lhs, rhs = every_lhs[index], split.rhs[index]
        add_experts(acc.as_strided((len(ops), rows, cols), (stride, cols, 1), offset), lhs, rhs, split.scale,
                    ops[0].round_delta, ops[0].dtype, self.workspace)

    def _check_output(self, op: TensorOp, rows_out: torch.Tensor, row0: int, rows: int) -> None:
        if op.check_finite and op.dtype == "F16":  # finite inputs overflow only in fp16 (merged or converted)
            _check_finite(op, rows_out, f"{op.source.file.path}: {op.name} rows {row0}..{row0 + rows - 1} merged")

    def _block(self, op: TensorOp, row0: int, rows: int, fill) -> Block:
        """Compute rows row0.. of one block (`fill(buffers, row0, rows)`) into a buffer of the ring; on
        failure the buffer goes back at once."""
        cols = op.matrix[1]
        row_bytes = cols * DTYPE_BITS[op.dtype] // 8
        slot = self.ring.take()
        try:
            data = slot.view(rows * row_bytes)
            fill(self.workspace.block(rows, (cols,), op.dtype, as_tensor(data, op.dtype, (rows, cols)), op.wide),
                 row0, rows)
        except BaseException:
            self.ring.give_back(slot)
            raise
        return Block(row0 * row_bytes, data, slot)

    def _merge(self, op: TensorOp, w_rows: torch.Tensor, factors: Factors, row0: int, buffers) -> torch.Tensor:
        try:
            return merge_rows(w_rows, factors, row0, buffers)
        except ZeroNormFound as e:
            raise _zero_norm(op, e) from e

    def _factors(self, op: TensorOp, reader: _RowReader | None) -> Factors:
        pair = op.pair
        if isinstance(pair, SumPair):  # several adapters: one concatenated product (`sum_factors`)
            return sum_factors([(self._term_factors(op, t.pair), t.weight) for t in pair.terms], op.wide)
        magnitude = self._load(pair.magnitude, op) if pair.magnitude is not None else None
        factors = self._term_factors(op, pair, magnitude)
        if op.wide:
            factors = widen(factors)
        if magnitude is None or not op.transpose:
            return factors
        sumsq = None  # DoRA per column needs every row first: a first pass over the blocks for the norms
        for row0 in range(0, reader.shape[0], op.block_rows):
            rows = min(op.block_rows, reader.shape[0] - row0)
            sumsq = column_sumsq(reader.rows(row0, rows), factors, row0,
                                 self.workspace.block(rows, reader.shape[1:], op.dtype, wide=op.wide), sumsq)
        try:
            return finish_column_norms(sumsq, factors)
        except ZeroNormFound as e:
            raise _zero_norm(op, e) from e

    def _term_factors(self, op: TensorOp, pair: Pair, magnitude: torch.Tensor | None = None) -> Factors:
        """One adapter's fp32 factors (`op`'s pair, or a term of its sum), its scale applied or left to apply.
        A fused-expert LoRA is split once for every expert of its layer (`_split`)."""
        if pair.kind == Kind.EXPERTS:
            return expert_factors(self._split(op, pair), expert=pair.expert, rows=pair.rows,
                                  transposed=pair.transposed, round_delta=op.round_delta)
        return make_factors(self._load(pair.a, op), self._load(pair.b, op), pair.scale, op.transpose,
                            round_delta=op.round_delta, magnitude=magnitude)

    def _split(self, op: TensorOp, pair: Pair | None = None) -> ExpertFactors:
        """The fused-expert LoRA of `op` (or `pair`, a term of its sum) split per expert, kept while the next
        tensors use it (the experts of a layer are stored together, so a few entries suffice)."""
        pair = pair or op.pair
        key = (str(self._file_of(pair.a).path), pair.a.name, pair.b.name)
        if key not in self._experts:
            if len(self._experts) >= CACHED_FACTORS:
                self._experts.pop(next(iter(self._experts)))
            self._experts[key] = split_experts(self._load(pair.a, op), self._load(pair.b, op), pair.scale,
                                               pair.experts, pair.rank)
        return self._experts[key]

    def _tokens(self, op: TensorOp) -> list[tuple[int, torch.Tensor]]:
        if op.tokens is None:
            return []
        values = self._load(op.tokens.values, op).to(TORCH_DTYPES[op.dtype])  # one rounding of each trained row
        return list(zip(op.tokens.indices, values, strict=True))

    def _load(self, entry: TensorEntry, op: TensorOp, dtype: str | None = None) -> torch.Tensor:
        """A whole (small) adapter tensor for `op`: factors, magnitudes, biases, token rows. The first time a
        run loads it, it is checked for NaN/Inf (unless the op allows them)."""
        file = self._file_of(entry)
        tensor = self._whole(file, entry)
        if op.check_finite and (str(file.path), entry.name) not in self._checked:
            self._checked.add((str(file.path), entry.name))
            _check_finite(op, tensor, f"{file.path}: tensor {entry.name!r} (for {op.name})")
        return tensor.to(TORCH_DTYPES[dtype]) if dtype else tensor

    def _file_of(self, entry: TensorEntry) -> TensorFile:
        """The adapter file holding `entry` (the first adapter's, unless another one's)."""
        return self._owner.get(id(entry), self.adapter)


def _item(op: TensorOp) -> int:
    return DTYPE_BITS[op.dtype] // 8


def _check_finite(op: TensorOp, values: torch.Tensor, what: str) -> None:
    """NaN or Inf in an adapter tensor, or a merge that overflows (fp16), would poison the model silently."""
    if not all_finite(values):
        raise NonFiniteError(f"{what}: holds NaN or Inf; the adapter is broken or the merge overflows {op.dtype} "
                             f"(pass allow_nonfinite=True / --allow-nonfinite to write it anyway)")


def _zero_norm(op: TensorOp, e: ZeroNormFound) -> ZeroNormError:
    return ZeroNormError(f"{op.name}: DoRA norm of {e.axis} {e.index} of W + ΔW is zero; the merged weight "
                         f"would be NaN (PEFT has no epsilon either)")


class _RowReader:
    """Rows of an op's source as stored: an adapter tensor that replaces a base tensor of another dtype is
    rounded to that dtype first (as loading it into the base parameter does in PEFT), and an FP8 source is
    dequantized to fp32 with its block `scales` (fp32). The merge rounds once, to the output dtype."""

    def __init__(self, op: TensorOp, files: Files, reader: ReadAhead, workspace: Workspace,
                 shape: tuple[int, ...], scales: torch.Tensor | None = None) -> None:
        self.op, self.workspace, self.shape, self.reader, self.scales = op, workspace, shape, reader, scales
        self.fd, self.file = files.fd(op.source.file.path), op.source.file
        self.entry = op.source.entry
        self.row_bytes = math.prod(shape[1:]) * DTYPE_BITS[self.entry.dtype] // 8

    def rows(self, row0: int, rows: int) -> torch.Tensor:
        """The rows, valid until the next read (of this op or another)."""
        view = self.reader.read(self.fd, self.file.data_offset + self.entry.start + row0 * self.row_bytes,
                                rows * self.row_bytes, self.file.path)
        w = as_tensor(view, self.entry.dtype, (rows, *self.shape[1:]))
        if self.scales is not None:
            block = self.op.dequant.block
            first = row0 // block[0]
            scales = self.scales[first:first + -(-rows // block[0])]
            return blockquant.dequantize(w, scales, block, self.workspace.tensor("dequant", "F32", w.shape),
                                         self.workspace.tensor("e4m3_index", "I32", w.shape))
        if self.op.source_round is None:
            return w
        return self.workspace.tensor("source", self.op.source_round, w.shape).copy_(w)


class _PackedReader:
    """Rows of a bitsandbytes 4-bit weight (`op.packed`): the bytes of their codes read, dequantized in fp32
    (`bnb4dequant.dequantize`) and rounded to the output dtype, the base tensor's values in this merge."""

    def __init__(self, op: TensorOp, files: Files, reader: ReadAhead, workspace: Workspace, table: torch.Tensor,
                 absmax: torch.Tensor) -> None:
        self.op, self.reader, self.workspace, self.table, self.absmax = op, reader, workspace, table, absmax
        self.fd, self.file, self.entry = files.fd(op.source.file.path), op.source.file, op.source.entry
        self.shape = op.matrix

    def rows(self, row0: int, rows: int) -> torch.Tensor:
        """The rows, valid until the next read (of this op or another)."""
        cols = self.shape[1]
        first, count = row0 * cols, rows * cols  # first: a multiple of the block size (`_block_rows`)
        start, end = first // 2, -(-(first + count) // 2)
        view = self.reader.read(self.fd, self.file.data_offset + self.entry.start + start, end - start,
                                self.file.path)
        values = bnb4dequant.dequantize(as_tensor(view, "U8", (end - start,)), first, count, self.table,
                                        self.absmax, self.op.packed.state.blocksize,
                                        self.workspace.tensor("bnb_values", "F32", (2 * (end - start),)),
                                        self.workspace.tensor("bnb_codes", "I32", (end - start,))).view(rows, cols)
        if self.op.dtype == "F32":
            return values
        return self.workspace.tensor("bnb_rounded", self.op.dtype, (rows, cols)).copy_(values)
