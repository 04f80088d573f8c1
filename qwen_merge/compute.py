"""The arithmetic of a LoRA merge, one row block at a time. The only module that computes with torch.

For rows i:j of W, PEFT's default merge (fp32 factors, an in-place add into W) computes
    W'[i:j] = round_W( fp32(W[i:j]) + fl32( fl32(B[i:j] @ A) * fl32(s) ) )
fp32 accumulation and one rounding to W's dtype. We keep exactly that order of operations (product, then
scale, then add) so results are bit-identical to PEFT except where the fp32 GEMM sums in another order.
When W is stored transposed (GPT-2 Conv1D, and every embedding), rows of W are columns of B @ A:
W'[i:j] uses Aᵀ[i:j] @ Bᵀ. A convolution's W (out, in, *k) is merged as the matrix (out, in·prod(k)) it
is in memory, with A (r, in, *k) and B (out, r, 1, …) as the matrices (r, in·prod(k)) and (out, r): that
is the same sum PEFT's convolution of the factors computes. DoRA then scales V = W + ΔW by m / ‖V‖ per
output row (per filter for a convolution) or, for transposed layouts, per column;
`rounding="peft"` rounds ΔW to W's dtype before the add where PEFT does (embedding LoRA, MiCA,
target_parameters).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

SUB_BLOCK_BYTES = 1 << 20  # fp32 scratch per sub-block: a few of these fit in L2 together
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True, slots=True)
class Factors:
    """fp32 factors arranged so that rows i:j of the delta are `lhs[i:j] @ rhs`, scaled by `scale`.

    `round_delta`: round ΔW to W's dtype before adding it (PEFT's double rounding). `magnitude`: DoRA's m;
    with `col_norm` set (transposed layouts) it scales columns by m / col_norm, else rows by m / ‖row‖.
    `row_vector`: the delta is a single column, and `lhs` @ `rhs` is B (1, r) @ A (r, in) (see `_product`)."""

    lhs: torch.Tensor
    rhs: torch.Tensor
    scale: float
    round_delta: bool = False
    magnitude: torch.Tensor | None = None
    col_norm: torch.Tensor | None = None
    group_rows: int | None = None  # fused experts: rhs is (E, r, cols) and rows come in groups per expert
    row_vector: bool = False


class ZeroNormFound(ArithmeticError):
    """DoRA's ‖W + ΔW‖ is zero for row (or column) `index`: the merged weight would be NaN."""

    def __init__(self, index: int, axis: str) -> None:
        super().__init__(index, axis)
        self.index, self.axis = index, axis


def as_tensor(buffer: bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over `buffer`'s bytes, without copying (the buffer must be writable and stay alive)."""
    count = 1
    for d in shape:
        count *= d
    if count == 0:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype])
    return torch.frombuffer(buffer, dtype=TORCH_DTYPES[dtype], count=count).view(shape)


def all_finite(values: torch.Tensor) -> bool:
    """No NaN or Inf in `values`. The min and max of a tensor are NaN when any element is NaN and infinite
    when any is: one reduction without a bool temporary, 15-25x faster than `isfinite(values).all()` on CPU
    (measured on 128 Ki to 16 Mi bf16 elements)."""
    if values.numel() == 0:
        return True
    lo, hi = torch.aminmax(values)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def make_factors(a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool, *, round_delta: bool = False,
                 magnitude: torch.Tensor | None = None) -> Factors:
    """Promote A (r, in) and B (out, r) to fp32, as PEFT's default autocast does, and orient them.

    Convolution factors A (r, in, *k), B (out, r, 1, …) and DoRA's magnitude (1, out, 1, …) are used as
    the matrices (r, in·prod(k)), (out, r) and the vector (out,); for 2-D factors that changes nothing.

    A power-of-two scale (alpha/r = 2 is the common case) is folded into the small left factor: scaling
    by 2^k commutes with every rounding, so fl32((2^k·lhs) @ rhs) == fl32(fl32(lhs @ rhs)·2^k) bit for
    bit, and a full pass over the delta is saved. Any other scale is applied after the product, as PEFT does.
    """
    a32 = a.to(torch.float32).reshape(a.shape[0], -1)
    b32 = b.to(torch.float32).reshape(b.shape[0], -1)
    row_vector = transpose and b32.shape[0] == 1
    lhs, rhs = (a32.t(), b32.t()) if transpose and not row_vector else (b32, a32)
    m32 = None if magnitude is None else magnitude.to(torch.float32).reshape(-1)
    if math.frexp(scale)[0] == 0.5:
        lhs, scale = lhs * scale, 1.0
    return Factors(lhs.contiguous(), rhs.contiguous(), scale, round_delta, m32, row_vector=row_vector)


@dataclass(frozen=True, slots=True)
class BlockBuffers:
    """Working memory for one row block: fp32 scratch for a cache-sized sub-block of `w32.shape[0]` rows
    (`delta` holds at least two rows, see `_product`), and the output block.

    Every op in `merge_rows` writes into these buffers. Mixed-dtype ops (`add_` of a bf16 operand,
    `add(out=bf16)`) would allocate hidden fp32 temporaries per call, and those grow the heap (measured:
    +16 MiB per 16 MiB block)."""

    w32: torch.Tensor
    delta: torch.Tensor
    out: torch.Tensor


class Workspace:
    """Scratch buffers reused by every tensor of a run, so their pages are faulted in once, not per tensor.
    The output buffers of the blocks a run hands on are not here: they belong to the `pieces.BlockRing`,
    which knows when their consumers are done with them."""

    def __init__(self) -> None:
        self._buffers: dict[str, bytearray] = {}

    def raw(self, role: str, nbytes: int) -> memoryview:
        buffer = self._buffers.get(role)
        if buffer is None or len(buffer) < nbytes:
            buffer = self._buffers[role] = bytearray(nbytes)  # an old buffer lives on in any tensor viewing it
        return memoryview(buffer)[:nbytes]

    def tensor(self, role: str, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = math.prod(shape) * TORCH_DTYPES[dtype].itemsize
        return as_tensor(self.raw(role, nbytes), dtype, shape)

    def block(self, rows: int, row_shape: tuple[int, ...], dtype: str, out: torch.Tensor | None = None
              ) -> BlockBuffers:
        """Buffers for a block of `rows` rows: fp32 scratch, and `out` (scratch too when not given: a pass
        whose result is not handed on, such as DoRA's column norms)."""
        sub = max(1, min(rows, SUB_BLOCK_BYTES // (4 * math.prod(row_shape) or 1)))
        if out is None:
            out = self.tensor("out", dtype, (rows, *row_shape))
        return BlockBuffers(self.tensor("w32", "F32", (sub, *row_shape)),
                            self.tensor("delta", "F32", (max(2, sub), *row_shape)), out)


def merge_rows(w_rows: torch.Tensor, factors: Factors, row0: int, buffers: BlockBuffers) -> torch.Tensor:
    """Rows `row0 : row0 + len(w_rows)` of the merged tensor in W's dtype, written into `buffers.out`.

    The block is computed in sub-blocks that fit the CPU cache: every fp32 pass then stays in L2, which
    measured twice as fast as whole-block passes (2.4 vs 1.2 GB/s of bf16 on one core).

    Raises:
        ZeroNormFound: DoRA's norm of a row is zero.
    """
    step = buffers.w32.shape[0]
    for i in range(0, w_rows.shape[0], step):
        w, out = w_rows[i:i + step], buffers.out[i:i + step]
        v = _w_plus_delta(w, factors, row0 + i, buffers, out)
        if factors.magnitude is not None:
            v.mul_(_dora_factor(v, factors, row0 + i))
        if v.data_ptr() != out.data_ptr():
            out.copy_(v)                                                   # the one rounding (RNE)
    return buffers.out


def _w_plus_delta(w: torch.Tensor, factors: Factors, row0: int, buffers: BlockBuffers, out: torch.Tensor
                  ) -> torch.Tensor:
    """V = fp32(W) + fl32(fl32(lhs @ rhs) · s) for the rows of `w`, in the fp32 scratch buffer."""
    rows = w.shape[0]
    if _fusable(factors, rows):  # one pass fewer: W + B@A in the GEMM, the same bits (see _fused_add_exact)
        # an fp32 output is its own accumulator; fp32 rows that are the output (FP8's dequantized rows) are
        # merged in place
        acc = out if out.dtype == torch.float32 else buffers.delta[:rows]
        if acc.data_ptr() != w.data_ptr():
            acc.copy_(w)                                                   # fp32(W), exact
        return acc.addmm_(factors.lhs[row0:row0 + rows], factors.rhs)      # fl32(W + fl32(B @ A))
    delta = _product(factors, row0, rows, buffers.delta)                   # fl32(B @ A), fp32 accumulation
    if factors.scale != 1.0:
        delta.mul_(factors.scale)                                          # fl32(· fl32(s))
    if factors.round_delta:
        delta.copy_(out.copy_(delta))                                      # PEFT: W + rnd_W(ΔW)
    if w.dtype == torch.float32:
        return delta.add_(w)
    return delta.add_(buffers.w32[:w.shape[0]].copy_(w))                   # fp32(W) + Δ, W promoted exactly


def _fusable(factors: Factors, rows: int) -> bool:
    return (factors.scale == 1.0 and not factors.round_delta and factors.group_rows is None
            and not factors.row_vector and rows >= 2 and _fused_add_exact(factors.rhs.shape[0]))


@functools.lru_cache(maxsize=None)
def _fused_add_exact(inner: int) -> bool:
    """Whether `W.addmm_(L, R)` gives the bits of `mm(L, R) + W` for this inner dimension, checked once.

    A GEMM that completes each dot product before adding C (one K block) does; where it splits K into
    blocks and adds C first (measured here: inner 1 and ≥ 512), the sum is ordered otherwise, and the
    merge keeps the separate add that PEFT's order needs."""
    g = torch.Generator().manual_seed(inner)
    lhs, rhs = torch.randn(8, inner, generator=g), torch.randn(inner, 67, generator=g)
    w = torch.randn(8, 67, generator=g) * 3
    return torch.equal(torch.mm(lhs, rhs).add_(w), w.clone().addmm_(lhs, rhs))


def _product(factors: Factors, row0: int, rows: int, scratch: torch.Tensor) -> torch.Tensor:
    """Rows row0 : row0 + rows of the delta before scaling, written into `scratch[:rows]` and returned:
    lhs[row0 : row0 + rows] @ rhs, switching rhs at expert boundaries for fused experts.

    The GEMM kernel, and with it the fp32 summation order, follows the shapes of the product. PEFT
    computes B @ A whole; slices of two or more rows sum like it, but one row alone is a vector-matrix
    product that sums otherwise (measured: most fp32 elements differ), so a lone row is computed inside
    a two-row product. For the same reason a single-column delta (B (1, r), transposed) is computed as
    PEFT's B @ A, not as Aᵀ @ Bᵀ; its (1, rows) result has the bytes of the (rows, 1) delta rows."""
    out = scratch[:rows]
    if factors.row_vector:
        torch.mm(factors.lhs, factors.rhs[:, row0:row0 + rows], out=out.view(1, rows))
        return out
    if factors.group_rows is None:
        total = factors.lhs.shape[0]
        if rows == 1 and total > 1:
            start = min(row0, total - 2)  # the pair of rows holding row0
            torch.mm(factors.lhs[start:start + 2], factors.rhs, out=scratch[:2])
            out.copy_(scratch[row0 - start:row0 - start + 1])
            return out
        torch.mm(factors.lhs[row0:row0 + rows], factors.rhs, out=out)
        return out
    start, end, g = row0, row0 + rows, factors.group_rows
    while start < end:
        stop = min(end, (start // g + 1) * g)
        torch.mm(factors.lhs[start:stop], factors.rhs[start // g], out=out[start - row0:stop - row0])
        start = stop
    return out


@dataclass(frozen=True, slots=True)
class ExpertFactors:
    """A fused-expert LoRA rearranged once per layer: `lhs[e]` = s·B_e (out, r), `rhs[e]` = A_e (r, in),
    both contiguous so every expert's factors are views (PEFT's layout: A rows expert-major, e·r + k;
    B columns rank-major, k·E + e). `scale` is what is left to apply after the product (1.0 if folded)."""

    lhs: torch.Tensor
    rhs: torch.Tensor
    scale: float
    row_parts: dict[tuple[int, int], torch.Tensor] = dataclasses.field(default_factory=dict)  # `expert_rows`


def split_experts(a: torch.Tensor, b: torch.Tensor, scale: float, experts: int, rank: int) -> ExpertFactors:
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    a_e = a32.view(experts, rank, a32.shape[1]).contiguous()
    b_e = b32.view(b32.shape[0], rank, experts).permute(2, 0, 1)
    if math.frexp(scale)[0] == 0.5:  # exact, see make_factors
        b_e, scale = b_e * scale, 1.0
    return ExpertFactors(b_e.contiguous(), a_e, scale)


def expert_rows(split: ExpertFactors, rows: tuple[int, int]) -> torch.Tensor:
    """Rows `rows` of every expert's left factor (the gate or the up part of gate_up), contiguous (E, rows,
    r): the layout a batched product of separate experts' tensors takes them in. Made once per split."""
    part = split.row_parts.get(rows)
    if part is None:
        part = split.row_parts[rows] = split.lhs[:, rows[0]:rows[1]].contiguous()
    return part


def expert_factors(split: ExpertFactors, *, expert: int | None, rows: tuple[int, int] | None,
                   transposed: bool, round_delta: bool) -> Factors:
    """Factors for one expert's tensor (rows `rows` of ΔW[e] = s·B_e @ A_e), or for a fused 3-D tensor
    (E, out, in) — (E, in, out) when `transposed` — with every expert, grouped by expert."""
    experts, out, rank = split.lhs.shape
    if expert is not None:
        return Factors(split.lhs[expert, rows[0]:rows[1]], split.rhs[expert], split.scale, round_delta)
    if transposed:
        inp = split.rhs.shape[2]
        lhs = split.rhs.transpose(1, 2).reshape(experts * inp, rank)
        return Factors(lhs.contiguous(), split.lhs.transpose(1, 2).contiguous(), split.scale, round_delta,
                       group_rows=inp)
    return Factors(split.lhs.reshape(experts * out, rank), split.rhs, split.scale, round_delta, group_rows=out)


def add_experts(acc: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, scale: float, round_delta: bool,
                dtype: str, workspace: Workspace) -> None:
    """Many experts' deltas at once: acc[k] += fl32(fl32(lhs[k] @ rhs[k]) · s), the delta rounded to `dtype`
    first when `round_delta` (PEFT's double rounding). The caller rounds `acc` once to the weights' dtype.

    `acc` is an (n, rows, cols) fp32 view of the weights (it may be strided: one expert's tensors sit
    between another's on disk), `lhs` (n, rows, r), `rhs` (n, r, cols). The same operations as
    `merge_rows`; callers use it only where `batched_exact` holds, so every expert gets the bits its own
    product would."""
    n, rows, cols = acc.shape
    if scale == 1.0 and not round_delta and _batched_add_exact(rows, lhs.shape[2], cols):
        acc.baddbmm_(lhs, rhs)  # W + B_e@A_e in the GEMM, the same bits (see _batched_add_exact)
        return
    delta = workspace.tensor("batch_delta", "F32", (n, rows, cols))
    torch.bmm(lhs, rhs, out=delta)                                         # fl32(B_e @ A_e)
    if scale != 1.0:
        delta.mul_(scale)
    if round_delta:                                                        # PEFT: W + rnd_W(ΔW)
        delta.copy_(workspace.tensor("batch_rounded", dtype, (n, rows, cols)).copy_(delta))
    acc.add_(delta)


@functools.lru_cache(maxsize=None)
def batched_exact(rows: int, rank: int, cols: int) -> bool:
    """Whether a batched product of these shapes gives each item the bits of its own `torch.mm`, checked
    once per shape: the GEMM kernel can differ between the two for small or odd shapes (measured here:
    3 x 5 with rank 2), and then experts are merged one by one."""
    g = torch.Generator().manual_seed(rows * 7919 + rank * 31 + cols)
    lhs, rhs = torch.randn(3, rows, rank, generator=g), torch.randn(3, rank, cols, generator=g)
    return all(torch.equal(torch.bmm(lhs, rhs)[k], torch.mm(lhs[k], rhs[k])) for k in range(3))


@functools.lru_cache(maxsize=None)
def _batched_add_exact(rows: int, rank: int, cols: int) -> bool:
    """Whether `W.baddbmm_(L, R)` gives the bits of `bmm(L, R) + W` for these shapes, checked once (as
    `_fused_add_exact` for one matrix)."""
    g = torch.Generator().manual_seed(rows * 7919 + rank * 31 + cols + 1)
    lhs, rhs = torch.randn(3, rows, rank, generator=g), torch.randn(3, rank, cols, generator=g)
    w = torch.randn(3, rows, cols, generator=g) * 3
    return torch.equal(torch.bmm(lhs, rhs).add_(w), w.clone().baddbmm_(lhs, rhs))


def _dora_factor(v: torch.Tensor, factors: Factors, row0: int) -> torch.Tensor:
    """m / ‖V‖, shaped to broadcast over V: per row, or per column when `col_norm` was precomputed."""
    if factors.col_norm is not None:
        return factors.magnitude / factors.col_norm
    norm = torch.linalg.norm(v, dim=1)
    zero = torch.nonzero(norm == 0)
    if len(zero):
        raise ZeroNormFound(row0 + int(zero[0]), "row")
    return (factors.magnitude[row0:row0 + v.shape[0]] / norm).view(-1, 1)


def column_sumsq(w_rows: torch.Tensor, factors: Factors, row0: int, buffers: BlockBuffers,
                 total: torch.Tensor | None) -> torch.Tensor:
    """Add V² of these rows to `total` per column (a new fp32 vector when None): DoRA's first pass for
    column norms. The blocks must come in row order.

    The squares are added in fp32 one row after another, because that is how PEFT's norm over the rows
    of the transposed weight sums (measured on 50000 x 1024: equal but for 3 columns, by 1 ulp); an exact
    fp64 sum differed from PEFT's norm by up to a few hundred fp32 ulp."""
    if total is None:
        total = torch.zeros(w_rows.shape[1], dtype=torch.float32)
    step = buffers.w32.shape[0]
    for i in range(0, w_rows.shape[0], step):
        v = _w_plus_delta(w_rows[i:i + step], factors, row0 + i, buffers, buffers.out[i:i + step])
        for square in v.mul_(v):
            total.add_(square)
    return total


def finish_column_norms(sumsq: torch.Tensor, factors: Factors) -> Factors:
    """Attach ‖V[:, j]‖ (fp32) to the factors for the second pass.

    Raises:
        ZeroNormFound: a column's norm is zero.
    """
    zero = torch.nonzero(sumsq == 0)
    if len(zero):
        raise ZeroNormFound(int(zero[0]), "column")
    return dataclasses.replace(factors, col_norm=sumsq.sqrt())


def add_vector(w_rows: torch.Tensor, vector: torch.Tensor, buffers: BlockBuffers) -> torch.Tensor:
    """rnd_W(fp32(W) + vector) for a 1-row block (a bias and its scaled LoRA bias)."""
    v = buffers.delta[:1].copy_(w_rows).add_(vector)
    return buffers.out.copy_(v)


def cast_rows(w_rows: torch.Tensor, buffers: BlockBuffers) -> torch.Tensor:
    """The rows converted to the output dtype (one rounding), or copied when the dtype is the same."""
    return buffers.out.copy_(w_rows)


@contextmanager
def compute_threads(n: int) -> Iterator[None]:
    """Run torch on `n` threads for the duration. With 2 cores, one computes while the writer thread
    copies into the page cache; letting torch's OpenMP team spin on both cores as well made the merge
    3x slower (its threads wait on each other whenever the writer preempts one). Verification uses the
    same setting so its GEMMs are the same calls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous tensor, without copying."""
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")
