"""FP8 block quantization arithmetic, on row blocks that hold whole rows of scale blocks.

An F8_E4M3 weight Q (out, in) with block scales S (ceil(out/b0), ceil(in/b1)) has the value
    W[i, j] = f32(Q[i, j]) · S[i // b0, j // b1]
including the ragged blocks at the right and bottom edges. Requantizing merged values V per block:
    amax = max |V_block|;  s = stored(amax / 448)  (1 when amax is 0)
    Q' = e4m3(clip(V / f32(s), -448, 448))  (round to nearest even)
where `stored` rounds to the scale's dtype (F32 or BF16) and the division uses that rounded value, because
a loader multiplies by it. The clip comes before the cast because not every e4m3 cast saturates (torch on
CPU does; others give NaN above 448). A block the adapter leaves unchanged comes back with the same Q and
S bytes whenever its largest |Q| is 448, as an amax/448 quantizer writes it: its amax is then fl(448·S),
and fl(fl(448·S)/448) == S for every fp32 and bf16 S (checked exhaustively).

Error of Q' · s against V: at most half an e4m3 step of V/s, times s — 1/16 of |V| for normal e4m3
values (3 mantissa bits), and s · 2⁻¹⁰ for the smallest (subnormal steps are 2⁻⁹).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def tiles(x: torch.Tensor, block: tuple[int, int]) -> list[tuple[slice, slice, torch.Tensor]]:
    """The up to four regions of `x` (rows, cols) whose blocks are whole or ragged in each direction, each
    as (row-block slice, column-block slice, view (row blocks, b0', column blocks, b1'))."""
    rows, cols = x.shape
    b0, b1 = block
    full_r, full_c = rows // b0 * b0, cols // b1 * b1
    regions = []
    for r0, r1, br in ((0, full_r, b0), (full_r, rows, rows - full_r)):
        for c0, c1, bc in ((0, full_c, b1), (full_c, cols, cols - full_c)):
            if r1 > r0 and c1 > c0:
                view = x[r0:r1, c0:c1].view((r1 - r0) // br, br, (c1 - c0) // bc, bc)
                regions.append((slice(r0 // b0, -(-r1 // b0)), slice(c0 // b1, -(-c1 // b1)), view))
    return regions


def scale_rows(x: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], divide: bool = False) -> None:
    """x *= S per block (or x /= S), in place; `scales` holds the scale rows of x's row blocks, in fp32."""
    for rs, cs, view in tiles(x, block):
        s = scales[rs, cs].view(view.shape[0], 1, view.shape[2], 1)
        view.div_(s) if divide else view.mul_(s)


# The 256 e4m3 values in fp32, indexed by byte: a table lookup is 5x faster than torch's CPU cast from
# float8_e4m3fn (0.7 against 3.8 ns per element, measured).
_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def dequantize(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], out: torch.Tensor,
               index: torch.Tensor) -> torch.Tensor:
    """f32(Q) · S into `out` (fp32, Q's shape): the product of a 4-bit e4m3 significand and the scale,
    rounded once to fp32. `index` is int32 scratch of Q's size."""
    index.copy_(q.view(torch.uint8))
    torch.index_select(_E4M3, 0, index.view(-1), out=out.view(-1))
    scale_rows(out, scales, block)
    return out


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |x| per block, (ceil(rows/b0), ceil(cols/b1)) in fp32."""
    rows, cols = x.shape
    amax = torch.empty(-(-rows // block[0]), -(-cols // block[1]), dtype=torch.float32)
    for rs, cs, view in tiles(x, block):  # max and -min: two reductions without an |x| temporary
        amax[rs, cs] = torch.maximum(view.amax(dim=(1, 3)), view.amin(dim=(1, 3)).neg_())
    return amax


def new_scales(v: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype) -> torch.Tensor:
    """The stored scales (in `scale_dtype`) for merged values `v`: amax/448 rounded to the scale dtype, and
    1 for an all-zero block."""
    amax = block_amax(v, block)
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).to(scale_dtype)


def quantize(v: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """Q' = e4m3(clip(v / f32(s), ±448)) per block into `out` (float8_e4m3fn); `v` is overwritten."""
    scale_rows(v, scales.to(torch.float32), block, divide=True)
    v.clamp_(-E4M3_MAX, E4M3_MAX)
    out.copy_(v)
    return out


def rounding_bound(v: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per element, how far a correct requantization of merged values `v` with the fp32 block `scales` may
    be from `v`: half an e4m3 step of v/s, times s. For |v/s| in [2^e, 2^(e+1)) the step is 2^(e-3); below
    2^-6 (subnormals) it is 2^-9. Beyond 448 nothing is correct (the value was clipped)."""
    y = v.clone()
    scale_rows(y, scales, block, divide=True)
    half = torch.exp2(torch.floor(torch.log2(y.abs_())).clamp_(min=-6.0).sub_(4.0))
    scale_rows(half, scales, block)
    return half
