"""bitsandbytes 4-bit dequantization, on spans of packed codes that start on an absmax block.

A 4-bit weight of n values is stored as ceil(n/2) bytes, two codes per byte (the high nibble first), with
one absmax per `blocksize` consecutive values of the flattened weight (a block may span rows). Its value is
    W[i] = quant_map[code[i]] · absmax[i // blocksize]
multiplied in fp32 (one rounding), then rounded to the output dtype: what bitsandbytes' `dequantize_4bit`
computes. With double quantization the absmax are themselves 8-bit codes:
    absmax[b] = nested_quant_map[q[b]] · nested_absmax[b // nested_blocksize] + nested_offset
each step rounded to fp32, as bitsandbytes' `dequantize_blockwise` and its `+= offset` do.

The values of the codes are the checkpoint's own `quant_map`, as bitsandbytes' reference backend reads them
(FP4's code 8, sign bit and zero magnitude, is +0.0 there; bitsandbytes' CPU kernel writes -0.0 for it on
some shapes: a sign of zero, no value, differs).
"""

from __future__ import annotations

import torch

def code_table(quant_map: torch.Tensor) -> torch.Tensor:
    """The values of the two codes of every byte, (high, low) in fp32, as 256 8-byte items: one gather per
    byte makes both values (0.25 against 1.1 ns per value for splitting the nibbles and gathering each,
    measured on one core)."""
    values, byte = quant_map.to(torch.float32), torch.arange(256)
    return torch.stack([values[byte >> 4], values[byte & 0xF]], 1).contiguous().view(torch.float64).view(256)


def absmax32(absmax: torch.Tensor, nested_absmax: torch.Tensor | None = None,
             nested_quant_map: torch.Tensor | None = None, nested_blocksize: int = 256,
             nested_offset: float = 0.0) -> torch.Tensor:
    """Every block's absmax in fp32: as stored (F32), or decoded from double quantization (U8 codes)."""
    if nested_absmax is None:
        return absmax.to(torch.float32)
    values = nested_quant_map.to(torch.float32)[absmax.to(torch.int64)]
    scales = nested_absmax.to(torch.float32).repeat_interleave(nested_blocksize)[:len(values)]
    return values.mul_(scales).add_(torch.tensor(nested_offset, dtype=torch.float32))


def dequantize(packed: torch.Tensor, first: int, count: int, table: torch.Tensor, absmax: torch.Tensor,
               blocksize: int, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Values first .. first + count of the weight, from `packed`, the bytes that hold them (uint8, starting
    with the byte of value `first`), written into `out` (fp32, room for 2·len(packed) values) and returned
    as its first `count`. `first` is a multiple of `blocksize` (the planner's row blocks hold whole blocks),
    so every block of the span starts at a block of `out`; the last may be cut short by the end of the
    weight. `table`: `code_table`; `index`: int32 scratch of len(packed)."""
    index = index[:len(packed)]
    index.copy_(packed)
    torch.index_select(table, 0, index, out=out[:2 * len(packed)].view(torch.float64))
    out = out[:count]
    block0, whole = first // blocksize, count // blocksize
    if whole:
        out[:whole * blocksize].view(whole, blocksize).mul_(absmax[block0:block0 + whole].view(whole, 1))
    if count > whole * blocksize:
        out[whole * blocksize:].mul_(absmax[block0 + whole])
    return out
