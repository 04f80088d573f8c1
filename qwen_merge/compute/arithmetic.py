"""The arithmetic of a LoRA merge, one row block at a time. `blockquant` (FP8 blocks) and `stream` (each op's
blocks, batches of experts) compute with torch too.

For rows i:j of W, PEFT's default merge (fp32 factors, an in-place add into W) computes
    W'[i:j] = round_W( fp32(W[i:j]) + fl32( fl32(B[i:j] @ A) * fl32(s) ) )
fp32 accumulation and one rounding to W's dtype. For a bf16/fp16 output we keep exactly that order of
operations (product, then scale, then add), so results are bit-identical to PEFT except where the fp32 GEMM
sums in another order and the sum lies that close to a rounding boundary of the output dtype.

An fp32 output has no narrower rounding to hide the GEMM's summation order, which changes with the host's
kernel, the thread count and the block shape. There the product is made exact instead (`widen`): each factor
is split into two float64 parts whose products a float64 GEMM sums without any rounding, whatever its order;
W + s·(B @ A) is then formed in float64 and rounded once to fp32. The result is the same on every host.

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

SUB_BLOCK_BYTES = 1 << 20  # fp32 scratch per sub-block (twice that in float64): a few fit in L2 together
# The torch dtype of each safetensors code that has one (the codes of `dtypes.DTYPE_BITS`)
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
    `row_vector`: the delta is a single column, and `lhs` @ `rhs` is B (1, r) @ A (r, in) (see `_product`).
    `wide`: the factors are float64 halves made by `widen` (lhs = [hi | lo], rhs = [lo ; hi] along the rank)
    and everything is computed in float64, exactly as far as the product goes."""

    lhs: torch.Tensor
    rhs: torch.Tensor
    scale: float
    round_delta: bool = False
    magnitude: torch.Tensor | None = None
    col_norm: torch.Tensor | None = None
    group_rows: int | None = None  # fused experts: rhs is (E, r, cols) and rows come in groups per expert
    row_vector: bool = False
    wide: bool = False


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


def widen(factors: Factors) -> Factors:
    """The same factors for an exact product in float64 (fp32 outputs; see the module's docstring).

    Every vector of fp32 values along the rank index (a row of lhs, a column of rhs) is split as x = hi + lo,
    hi a multiple of q = 2^(e - ρ) and lo of q·2^-ρ, where 2^e bounds the vector's largest magnitude. Then
    the terms of hi_lhs @ hi_rhs are integer multiples of one quantum per output element, at most 2^(2ρ)
    of them each, and a sum of r of them stays below 2^53: a float64 GEMM adds them without rounding, in
    whatever order its kernel takes. The same holds for the cross terms hi @ lo + lo @ hi, which one GEMM
    over the concatenated rank computes (lhs = [hi | lo], rhs = [lo ; hi]). What the split leaves out, lo @ lo
    and the bits of an fp32 value more than 2ρ bits below its vector's largest, is below 2^-2ρ (2^-46 for
    r ≤ 128) of the largest products: far below fp32's resolution, and the same on every host."""
    rank = factors.lhs.shape[-1]
    rho = (53 - max(rank - 1, 1).bit_length()) // 2  # 2ρ + log2(r) ≤ 53
    lhs_hi, lhs_lo = _split_exact(factors.lhs, -1, rho)
    rhs_hi, rhs_lo = _split_exact(factors.rhs, -2, rho)
    magnitude = None if factors.magnitude is None else factors.magnitude.to(torch.float64)
    return dataclasses.replace(factors, lhs=torch.cat([lhs_hi, lhs_lo], dim=-1).contiguous(),
                               rhs=torch.cat([rhs_lo, rhs_hi], dim=-2).contiguous(), magnitude=magnitude,
                               wide=True)


def _split_exact(x: torch.Tensor, dim: int, rho: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = hi + lo (+ what lies more than 2ρ bits below each vector's largest), in float64, per vector
    along `dim`; every step is exact: scaling by powers of two, rounding to integers, subtracting."""
    x64 = x.to(torch.float64)
    _, exponent = torch.frexp(x64.abs().amax(dim=dim, keepdim=True))  # largest < 2^e (e = 0 for a zero vector)
    inv_q = _power_of_two(rho - exponent)  # 1/q, q = 2^(e - ρ)
    hi = torch.round(x64 * inv_q).div_(inv_q)
    inv_q.mul_(2.0 ** rho)
    lo = torch.round((x64 - hi).mul_(inv_q)).div_(inv_q)
    return hi, lo


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent in float64, exactly: the exponent field of the IEEE bits (torch.ldexp computes a pow in the
    default dtype, which underflows). Factors of fp32 values keep exponents well inside float64's range."""
    return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)


@dataclass(frozen=True, slots=True)
class BlockBuffers:
    """Working memory for one row block: scratch for a cache-sized sub-block of `work.shape[0]` rows in the
    working precision (fp32, or float64 for wide factors): W promoted, and the delta (at least two rows, see
    `_product`); `cross`, float64 for the cross terms of a wide product; and the output block.

    Every op in `merge_rows` writes into these buffers. Mixed-dtype ops (`add_` of a bf16 operand,
    `add(out=bf16)`) would allocate hidden temporaries per call, and those grow the heap (measured:
    +16 MiB per 16 MiB block)."""

    work: torch.Tensor
    delta: torch.Tensor
    out: torch.Tensor
    cross: torch.Tensor | None = None


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

    def block(self, rows: int, row_shape: tuple[int, ...], dtype: str, out: torch.Tensor | None = None,
              wide: bool = False) -> BlockBuffers:
        """Buffers for a block of `rows` rows: scratch (float64 when `wide`), and `out` (scratch too when not
        given: a pass whose result is not handed on, such as DoRA's column norms)."""
        work = "F64" if wide else "F32"
        # as many rows as 1 MiB of fp32 holds, in float64 too: a float64 GEMM of fewer rows runs far below
        # its speed (measured: the cross-term GEMM of r = 64 on 13-row sub-blocks took 3x as long as on 53)
        sub = max(1, min(rows, SUB_BLOCK_BYTES // (4 * math.prod(row_shape) or 1)))
        if out is None:
            out = self.tensor("out", dtype, (rows, *row_shape))
        return BlockBuffers(self.tensor("work", work, (sub, *row_shape)),
                            self.tensor("delta", work, (max(2, sub), *row_shape)), out,
                            self.tensor("cross", work, (max(2, sub), *row_shape)) if wide else None)


def merge_rows(w_rows: torch.Tensor, factors: Factors, row0: int, buffers: BlockBuffers) -> torch.Tensor:
    """Rows `row0 : row0 + len(w_rows)` of the merged tensor in W's dtype, written into `buffers.out`.

    The block is computed in sub-blocks that fit the CPU cache: every fp32 pass then stays in L2, which
    measured twice as fast as whole-block passes (2.4 vs 1.2 GB/s of bf16 on one core).

    Raises:
        ZeroNormFound: DoRA's norm of a row is zero.
    """
    step = buffers.work.shape[0]
    for i in range(0, w_rows.shape[0], step):
        w, out = w_rows[i:i + step], buffers.out[i:i + step]
        v = _w_plus_delta(w, factors, row0 + i, buffers, out)
        if factors.magnitude is not None:
            v.mul_(_dora_factor(v, factors, row0 + i, buffers))
        if v.data_ptr() != out.data_ptr():
            out.copy_(v)                                                   # the one rounding (RNE)
    return buffers.out


def _w_plus_delta(w: torch.Tensor, factors: Factors, row0: int, buffers: BlockBuffers, out: torch.Tensor
                  ) -> torch.Tensor:
    """V = W + s·(lhs @ rhs) for the rows of `w`, in the working precision's scratch: for fp32,
    fp32(W) + fl32(fl32(lhs @ rhs) · s), PEFT's order; for wide factors the same in float64 from an exact
    product."""
    rows = w.shape[0]
    if _fusable(factors, rows, w.shape[1]):  # one pass fewer: W + B@A in the GEMM, the same bits
        # an fp32 output is its own accumulator; fp32 rows that are the output (FP8's dequantized rows) are
        # merged in place
        acc = out if out.dtype == torch.float32 else buffers.delta[:rows]
        if acc.data_ptr() != w.data_ptr():
            acc.copy_(w)                                                   # fp32(W), exact
        return acc.addmm_(factors.lhs[row0:row0 + rows], factors.rhs)      # fl32(W + fl32(B @ A))
    delta = _product(factors, row0, rows, buffers)                         # fl32(B @ A), or exact in float64
    if factors.scale != 1.0:
        delta.mul_(factors.scale)                                          # · fl32(s), or · s in float64
    if factors.round_delta:
        delta.copy_(out.copy_(delta))                                      # PEFT: W + rnd_W(ΔW)
    if w.dtype == delta.dtype:
        return delta.add_(w)
    return delta.add_(buffers.work[:rows].copy_(w))                        # W promoted exactly, + Δ


def _fusable(factors: Factors, rows: int, cols: int) -> bool:
    return (factors.scale == 1.0 and not factors.round_delta and factors.group_rows is None
            and not factors.row_vector and not factors.wide and rows >= 2
            and _fused_add_exact(rows, factors.rhs.shape[0], cols))


@functools.lru_cache(maxsize=None)
def _fused_add_exact(rows: int, inner: int, cols: int) -> bool:
    """Whether `W.addmm_(L, R)` gives the bits of `mm(L, R) + W` for this shape, checked once per shape.

    A GEMM that completes each dot product before adding C (one K block) does; where it splits K into
    blocks and adds C first, or takes another kernel for this shape, the sum is ordered otherwise, and the
    merge keeps the separate add that PEFT's order needs. Checked at the shape of the call itself, since
    the kernel a library picks depends on all three dimensions."""
    g = torch.Generator().manual_seed(rows * 7919 + inner * 31 + cols)
    lhs, rhs = torch.randn(rows, inner, generator=g), torch.randn(inner, cols, generator=g)
    w = torch.randn(rows, cols, generator=g) * 3
    return torch.equal(torch.mm(lhs, rhs).add_(w), w.clone().addmm_(lhs, rhs))


def _product(factors: Factors, row0: int, rows: int, buffers: BlockBuffers) -> torch.Tensor:
    """Rows row0 : row0 + rows of the delta before scaling, written into `buffers.delta[:rows]` and returned:
    lhs[row0 : row0 + rows] @ rhs, switching rhs at expert boundaries for fused experts.

    For fp32 factors the GEMM kernel, and with it the fp32 summation order, follows the shapes of the
    product. PEFT computes B @ A whole; slices of two or more rows sum like it, but one row alone is a
    vector-matrix product that sums otherwise (measured: most fp32 elements differ), so a lone row is
    computed inside a two-row product. For the same reason a single-column delta (B (1, r), transposed) is
    computed as PEFT's B @ A, not as Aᵀ @ Bᵀ; its (1, rows) result has the bytes of the (rows, 1) delta
    rows. Wide products are exact, so these shapes change nothing there."""
    scratch = buffers.delta
    out = scratch[:rows]
    mm = functools.partial(_exact_mm, cross=buffers.cross) if factors.wide else _mm
    if factors.row_vector:
        mm(factors.lhs, factors.rhs[:, row0:row0 + rows], out.view(1, rows))
        return out
    if factors.group_rows is None:
        total = factors.lhs.shape[0]
        if rows == 1 and total > 1:
            start = min(row0, total - 2)  # the pair of rows holding row0
            mm(factors.lhs[start:start + 2], factors.rhs, scratch[:2])
            out.copy_(scratch[row0 - start:row0 - start + 1])
            return out
        mm(factors.lhs[row0:row0 + rows], factors.rhs, out)
        return out
    start, end, g = row0, row0 + rows, factors.group_rows
    while start < end:
        stop = min(end, (start // g + 1) * g)
        mm(factors.lhs[start:stop], factors.rhs[start // g], out[start - row0:stop - row0])
        start = stop
    return out


def _mm(lhs: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor) -> None:
    torch.mm(lhs, rhs, out=out)


def _exact_mm(lhs: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor, cross: torch.Tensor) -> None:
    """out = lhs @ rhs for wide factors (`widen`): hi @ hi, plus hi @ lo + lo @ hi from one GEMM over the
    concatenated rank. Both GEMMs are exact; their sum is rounded once, here, the same on every host."""
    rank = lhs.shape[1] // 2
    torch.mm(lhs[:, :rank], rhs[rank:], out=out)
    terms = cross.view(-1)[:out.numel()].view(out.shape)
    torch.mm(lhs, rhs, out=terms)
    out.add_(terms)


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


def _dora_factor(v: torch.Tensor, factors: Factors, row0: int, buffers: BlockBuffers) -> torch.Tensor:
    """m / ‖V‖, shaped to broadcast over V: per row, or per column when `col_norm` was precomputed."""
    if factors.col_norm is not None:
        return factors.magnitude / factors.col_norm
    norm = _row_norms_fixed(v, buffers.cross) if factors.wide else torch.linalg.norm(v, dim=1)
    zero = torch.nonzero(norm == 0)
    if len(zero):
        raise ZeroNormFound(row0 + int(zero[0]), "row")
    return (factors.magnitude[row0:row0 + v.shape[0]] / norm).view(-1, 1)


def _row_norms_fixed(v: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """‖V[i]‖ per row, its squares summed in one fixed order (a reduction's order otherwise follows the
    host's vector width): the last columns are added onto the first ones, halving the width each time."""
    squares = torch.mul(v, v, out=scratch[:v.shape[0]])
    width = squares.shape[1]
    while width > 1:
        half = width // 2
        squares[:, :half].add_(squares[:, width - half:width])
        width -= half
    return squares[:, 0].sqrt()


def column_sumsq(w_rows: torch.Tensor, factors: Factors, row0: int, buffers: BlockBuffers,
                 total: torch.Tensor | None) -> torch.Tensor:
    """Add V² of these rows to `total` per column (a new vector in the working precision when None): DoRA's
    first pass for column norms. The blocks must come in row order.

    The squares are added one row after another, whatever the blocks: in fp32 that is how PEFT's norm over
    the rows of the transposed weight sums (measured on 50000 x 1024: equal but for 3 columns, by 1 ulp;
    an exact sum differed from PEFT's fp32 norm by up to a few hundred fp32 ulp); in float64 it is one
    fixed order."""
    if total is None:
        total = torch.zeros(w_rows.shape[1], dtype=buffers.work.dtype)
    step = buffers.work.shape[0]
    for i in range(0, w_rows.shape[0], step):
        v = _w_plus_delta(w_rows[i:i + step], factors, row0 + i, buffers, buffers.out[i:i + step])
        for square in v.mul_(v):
            total.add_(square)
    return total


def finish_column_norms(sumsq: torch.Tensor, factors: Factors) -> Factors:
    """Attach ‖V[:, j]‖ (in the working precision) to the factors for the second pass.

    Raises:
        ZeroNormFound: a column's norm is zero.
    """
    zero = torch.nonzero(sumsq == 0)
    if len(zero):
        raise ZeroNormFound(int(zero[0]), "column")
    return dataclasses.replace(factors, col_norm=sumsq.sqrt())


def add_vector(w_rows: torch.Tensor, vector: torch.Tensor, buffers: BlockBuffers) -> torch.Tensor:
    """rnd_W(W + vector) for a 1-row block (a bias and its scaled LoRA bias), in the buffers' working
    precision (the vector's)."""
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


def sum_factors(parts: list[tuple[Factors, float]], wide: bool) -> Factors:
    """One set of factors for Σ wᵢ·(sᵢ·Bᵢ@Aᵢ), from each adapter's factors (`make_factors`, `expert_factors`:
    sᵢ applied or still to apply) and its weight wᵢ: the factors concatenated along the rank, with
    cᵢ = wᵢ·sᵢ folded into each left factor. PEFT's `add_weighted_adapter(combination_type="cat")` builds the
    same concatenation (with cᵢ folded into Bᵢ, in two fp32 roundings).

    Why one concatenated product and not a sum of per-adapter products: it is one GEMM and one add per
    block, so the merge costs what one adapter of the summed rank costs, and the result is rounded once
    wherever the products are exact. For an fp32 output (`wide`) cᵢ·lhsᵢ is formed in float64 (rounded at
    2^-53, far below what `widen` keeps: its split drops what lies 2ρ bits below a vector's largest value)
    and the concatenated product is exact, so the bytes are W + Σ cᵢ·Bᵢ@Aᵢ in float64, rounded once, on
    every host, up to the split's bound. For a bf16/f16 output, fl32(cᵢ·lhsᵢ) (one rounding from the
    float64 product) and an fp32 GEMM over the summed rank, then W added in fp32 and rounded once to the
    output: the fp32 errors (about (R + 2)·2^-24 of the summed magnitudes) move the result across a
    rounding boundary of the output only where the exact sum lies that close to one, as in a single
    adapter's merge."""
    first = parts[0][0]
    lhs, rhs = [], []
    for factors, weight in parts:
        scaled = factors.lhs.to(torch.float64) * (factors.scale * weight)
        lhs.append(scaled if wide else scaled.to(torch.float32))
        rhs.append(factors.rhs.to(torch.float64) if wide else factors.rhs)
    summed = Factors(torch.cat(lhs, dim=-1).contiguous(), torch.cat(rhs, dim=-2).contiguous(), 1.0,
                     first.round_delta, group_rows=first.group_rows, row_vector=first.row_vector)
    return widen(summed) if wide else summed
