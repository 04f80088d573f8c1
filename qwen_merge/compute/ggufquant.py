"""Rows of a checkpoint tensor in a GGUF tensor type, bit for bit as the `gguf` package converts them
(`gguf.quants.quantize`, which llama.cpp's converter uses), but in torch, which does it several times
faster than numpy and on every thread.

The converter first widens every tensor to fp32 (exact from bf16 and f16), then:
* F32: the fp32 values; F16: rounded to nearest even (as numpy's and torch's casts do);
* BF16: the top 16 bits rounded to nearest even, a NaN kept with its sign and top bits and made quiet;
* Q8_0: per block of 32 values, d = max|x| / 127 in fp32, q = x * (1/d) rounded half away from zero
  (0 where d is 0), stored as fp16(d) then 32 int8.
Each step below is the same IEEE operation on the same fp32 values, so the bytes are the same on any host
(no summation, so no order to differ).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..dtypes import DTYPE_BITS
from ..errors import NonFiniteError
from ..planning.gguflayout import Q8_BLOCK, Q8_BLOCK_BYTES
from .arithmetic import TORCH_DTYPES

CHUNK_VALUES = 1 << 18  # values converted at once: 1 MiB of fp32, a few MiB with Q8_0's temporaries (cache-sized)
_BF16_QUIET = 0x0040  # the quiet bit of a bf16 NaN
_JUST_BELOW_HALF = 0.4999999701976776  # the largest fp32 below 0.5


def one_thread() -> None:
    """Torch on one thread for the calling thread (OpenMP's thread count is per thread, and a new thread starts
    with one per core): the converter thread runs beside the merging thread, and an OpenMP team of its own
    spinning on both cores doubled the CPU time of a Q8_0 merge."""
    torch.set_num_threads(1)


def encode(data: memoryview, dtype: str, cols: int, ggml_type: str, *, finite: bool = False) -> Iterator[memoryview]:
    """Whole rows of `cols` values of safetensors dtype `dtype`, as `ggml_type` bytes (flat byte views, so
    that `len` is their size in bytes), in consecutive parts of at most about CHUNK_VALUES values (the fp32 temporaries of a conversion are a few times its size).
    `finite`: raise NonFiniteError where a finite value would become Inf (beyond float16's 65504 in F16, or
    a Q8_0 block scale beyond it), as a merge into a float16 folder does."""
    size = DTYPE_BITS[dtype] // 8
    step = max(1, CHUNK_VALUES // max(1, cols)) * cols * size
    for start in range(0, len(data), step):
        yield _encode(data[start:start + step], dtype, ggml_type, finite).cast("B")


def _encode(data: memoryview, dtype: str, ggml_type: str, finite: bool) -> memoryview:
    if dtype == "BF16" and ggml_type == "BF16":
        return _quiet_bf16(torch.frombuffer(data, dtype=torch.int16)).numpy().data
    x = torch.frombuffer(data, dtype=TORCH_DTYPES[dtype]).to(torch.float32)
    if ggml_type == "F32":
        return x.numpy().data
    if ggml_type == "F16":
        half = x.to(torch.float16)
        if finite:
            _check_range(x, half)
        return half.view(torch.int16).numpy().data
    if ggml_type == "BF16":
        return _bf16(x).numpy().data
    return _q8_0(x.view(-1, Q8_BLOCK), finite).numpy().data


def _check_range(wide: torch.Tensor, half: torch.Tensor) -> None:
    if bool(torch.isinf(half).any()) and bool((torch.isinf(half) & torch.isfinite(wide)).any()):
        raise NonFiniteError(f"holds a value beyond float16's range (largest {float(wide.abs().max()):.6g}; float16 "
                             f"ends at 65504), which becomes Inf")


def _quiet_bf16(bits: torch.Tensor) -> torch.Tensor:
    """bf16 bits as the converter writes them: unchanged, but a NaN's quiet bit set (bf16 -> fp32 -> bf16).
    Almost always there is no NaN, which one reduction finds (max propagates NaN) without a temporary."""
    if not bool(torch.isnan(bits.view(torch.bfloat16).amax())):
        return bits
    nan = (bits & 0x7FFF) > 0x7F80
    return torch.where(nan, bits | _BF16_QUIET, bits)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 to bf16 bits, rounded to nearest even; a NaN keeps its top bits, made quiet."""
    rounded = x.to(torch.bfloat16).view(torch.int16)
    nan = torch.isnan(x)
    if not bool(nan.any()):
        return rounded
    top = (x.view(torch.int32) >> 16).to(torch.int16)  # arithmetic shift: the sign bit comes along
    return torch.where(nan, top | _BF16_QUIET, rounded)


def _q8_0(blocks: torch.Tensor, finite: bool) -> torch.Tensor:
    """fp32 blocks of 32 values as Q8_0 bytes, 34 per block."""
    d = torch.maximum(blocks.amax(dim=1, keepdim=True), blocks.amin(dim=1, keepdim=True).neg_()).abs_() / 127
    if finite:
        _check_range(d, d.to(torch.float16))
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    y = blocks * inverse
    # half away from zero: floor(|y| + 0.49999997) equals the converter's floor(a) + floor(2 (a - floor(a)))
    # for every fp32 a in [0, 128] (checked exhaustively), and |y| <= 127 here
    q = y.abs_().add_(_JUST_BELOW_HALF).floor_().copysign_(blocks)
    out = torch.empty((blocks.shape[0], Q8_BLOCK_BYTES), dtype=torch.uint8)
    out[:, :2].view(torch.float16).copy_(d)
    out[:, 2:].view(torch.int8).copy_(q)
    return out
