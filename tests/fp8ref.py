"""Reference for Qwen3 "fine-grained" FP8 checkpoints (spec format-io.md §4.1), independent of qwen_merge.

Layout: every Linear projection weight ``...{q,k,v,o,gate,up,down}_proj.weight`` (experts and shared
experts included) is stored F8_E4M3 ``[out, in]`` next to ``<name>_scale_inv`` of shape
``[ceil(out/128), ceil(in/128)]`` (F32 or BF16); ``W[i, j] = float(Q[i, j]) * S[i // 128, j // 128]``.
Embeddings, lm_head, norms and the MoE router ``mlp.gate.weight`` stay BF16.

Everything here computes in float64, where the dequantized product ``Q * S`` is exact (4 + 24 significant
bits), so each result has exactly one rounding, at the documented place:

* :data:`E4M3_VALUES`, :func:`round_e4m3` (nearest, ties to even, from the value table; not torch's cast);
* :func:`quantize_blocks` / :func:`dequantize_f64` for one tensor, ragged edge blocks handled by index
  (``i // 128``), never by deriving the block size from the scale grid;
* :func:`e4m3_half_step` / :func:`requant_bound`: the requantization error bound;
* :func:`quantize_checkpoint` / :func:`dequantized_checkpoint`: whole folders;
* :func:`build_fp8_qwen3` / :func:`build_fp8_qwen3_moe`: tiny FP8 models from the bf16 ones of builders.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from builders import (
    INDEX,
    build_moe_base,
    build_tiny_base,
    shard_files,
    tiny_qwen3_config,
)
from safetensors import safe_open
from safetensors.torch import save_file

FP8_MAX = 448.0
BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

# The 256 float8_e4m3fn values by code (sign bit 0x80, 4 exponent bits, 3 mantissa bits, bias 7); the codes
# 0x7f and 0xff are NaN, there is no infinity. Read from torch's dtype view: the bit layout, not its casts.
E4M3_VALUES: torch.Tensor = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64)

# The 127 finite non-negative values (codes 0x00..0x7e) in increasing order, for rounding.
_POSITIVE = E4M3_VALUES[:0x7F]

# Linear projection weights that the FP8 format quantizes (the router ``mlp.gate.weight`` does not match).
_PROJ = re.compile(r"(^|\.)(q|k|v|o|gate|up|down)_proj\.weight$")


# --------------------------------------------------------------------------------------------------
# One tensor


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The e4m3fn codes (uint8) nearest to float64 `x`, ties to the even code; |x| must be <= 448.

    Built from :data:`E4M3_VALUES` so the reference does not depend on how a torch build casts (torch
    converts float64 through float32 first; that double rounding is harmless for one division, but this
    function does not rely on it). The code's lowest bit is the mantissa's, so "even code" is "even
    mantissa", also across the subnormal/normal boundary. The sign comes from the sign bit (-0.0 -> 0x80)."""
    x = x.to(torch.float64)
    mag = x.abs()
    assert not bool((mag > FP8_MAX).any() or mag.isnan().any()), "clip before rounding"
    hi = torch.searchsorted(_POSITIVE, mag).clamp(max=0x7E)  # first value >= mag
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - _POSITIVE[lo], _POSITIVE[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = torch.where(pick_hi, hi, lo)
    return (code | (torch.signbit(x).to(torch.int64) << 7)).to(torch.uint8)


def block_index(rows: int, cols: int, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(i // block_rows, j // block_cols) as index vectors: the scale cell of every row and column."""
    return torch.arange(rows) // block[0], torch.arange(cols) // block[1]


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """The float64 scale of every element (a ragged edge block keeps its 128-grid cell, e.g. 192 = 128 + 64)."""
    rows, cols = shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    assert tuple(scale.shape) == grid, f"scale {tuple(scale.shape)} for weight {shape}: want {grid}"
    ri, ci = block_index(rows, cols, block)
    return scale.to(torch.float64)[ri][:, ci]


def block_amax(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """max |W| of each block, float64 (exact). The padding zeros of a ragged edge cannot raise a max."""
    rows, cols = w.shape
    br, bc = block
    gr, gc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(gr * br, gc * bc, dtype=torch.float64)
    padded[:rows, :cols] = w.to(torch.float64).abs()
    return padded.reshape(gr, br, gc, bc).amax(dim=(1, 3))


def quantize_blocks(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32,
                    block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q as float8_e4m3fn, S as scale_dtype) for a 2-D float tensor: the requantization of spec §4.1.

    Exactly: ``amax`` = max |W| per block (float64, exact); ``s = amax / 448`` in float64, or 1 where
    ``amax == 0``; ``S = s.to(scale_dtype)`` (one rounding); then ``Q = round_e4m3(clip(W / float64(S),
    -448, 448))``: the division uses the STORED scale (bf16-rounded when the scale is BF16, because the
    loader multiplies by that value), is done in float64 (one rounding, then the e4m3 rounding, ties to
    even), and is always clipped first (a bf16 scale rounded down gives |W / S| up to 448 * (1 + 2^-8))."""
    assert w.ndim == 2 and w.dtype.is_floating_point, (w.shape, w.dtype)
    amax = block_amax(w, block)
    s = torch.where(amax == 0, torch.ones_like(amax), amax / FP8_MAX)
    stored = s.to(scale_dtype)
    x = (w.to(torch.float64) / expand_scale(stored, tuple(w.shape), block)).clamp(-FP8_MAX, FP8_MAX)
    return round_e4m3(x).view(torch.float8_e4m3fn), stored


def dequantize_f64(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """``W[i, j] = float(Q[i, j]) * S[i // 128, j // 128]`` in float64 (exact: no rounding at all).

    `q` is float8_e4m3fn or its uint8 codes; the block size is the argument, never scale-grid derived."""
    codes = q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q
    assert codes.dtype == torch.uint8 and codes.ndim == 2, (q.dtype, q.shape)
    return E4M3_VALUES[codes.long()] * expand_scale(scale, tuple(codes.shape), block)


def e4m3_half_step(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of the e4m3fn values around float64 `x` (x in units of the scale, i.e. W / S).

    Normal values (exponent >= -6) carry 3 mantissa bits: spacing 2^(e-3) for 2^e <= |x| < 2^(e+1);
    subnormals (|x| < 2^-6) have the fixed spacing 2^-9. |x| is clipped to 448 first (the largest value,
    exponent 8). Rounding |x| to nearest moves it by at most this much (also when it rounds up to 2^(e+1))."""
    mag = x.to(torch.float64).abs().clamp(max=FP8_MAX)
    e = torch.floor(torch.log2(mag)).clamp(min=-6)  # log2(0) = -inf -> -6
    return torch.exp2(e - 4)


def requant_bound(w_exact: torch.Tensor, scale_stored: torch.Tensor, block: tuple[int, int] = BLOCK,
                  slack: float = 2.0 ** -23) -> torch.Tensor:
    """Per-element bound on |dequant(requant(W)) - W|: ``S * e4m3_half_step(W / S) + slack * |W|``.

    `scale_stored` is the scale the quantizer divided by. The first term bounds the e4m3 rounding of W / S
    (|W / S| exceeds 448 only by the scale's own rounding, and clipping such a value to 448 moves it less
    than rounding would); the slack term covers a float32 rounding of the dequantized product or of the
    division (2^-24 each); the float64 reference itself needs none (test with slack=0)."""
    w = w_exact.to(torch.float64)
    s = expand_scale(scale_stored, tuple(w.shape), block)
    return s * e4m3_half_step(w / s) + slack * w.abs()


# --------------------------------------------------------------------------------------------------
# Whole checkpoints


def is_fp8_target(name: str, tensor: torch.Tensor, not_convert: tuple[str, ...] = ()) -> bool:
    """A 2-D Linear projection weight (q,k,v,o,gate,up,down; experts and shared experts too) that no
    `not_convert` substring names."""
    return tensor.ndim == 2 and bool(_PROJ.search(name)) and not any(s in name for s in not_convert)


def read_shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """shard file name -> {tensor name -> tensor} for every ``*.safetensors`` in `folder` (F8_E4M3 too)."""
    out = {}
    for shard in shard_files(folder):
        with safe_open(Path(folder) / shard, framework="pt") as f:
            out[shard] = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    return out


def write_shards(src: Path, dst: Path, shards: dict[str, dict[str, torch.Tensor]], config: dict) -> Path:
    """Each shard with ``save_file`` (metadata format pt; it orders the data by dtype, then name, so the
    scales precede the F8 weights, as in real checkpoints), the index if `src` has one (its metadata kept,
    total_size / total_parameters recomputed), config.json, and copies of `src`'s other files."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for shard, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, dst / shard, metadata={"format": "pt"})
    if (Path(src) / INDEX).exists():
        index = json.loads((Path(src) / INDEX).read_text())
        every = [t for tensors in shards.values() for t in tensors.values()]
        index["metadata"]["total_size"] = sum(t.numel() * t.element_size() for t in every)
        if "total_parameters" in index["metadata"]:
            index["metadata"]["total_parameters"] = sum(t.numel() for t in every)
        index["weight_map"] = dict(sorted((n, s) for s, tensors in shards.items() for n in tensors))
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for p in Path(src).iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (INDEX, "config.json"):
            shutil.copy2(p, dst / p.name)
    return dst


def quantize_checkpoint(src: Path, dst: Path, *, scale_dtype: torch.dtype = torch.float32,
                        block: tuple[int, int] = BLOCK, not_convert: tuple[str, ...] = ()) -> Path:
    """The FP8 version of the float folder `src` in `dst`: every :func:`is_fp8_target` tensor replaced by
    :func:`quantize_blocks`'s (Q, ``<name>_scale_inv``), both in the weight's shard; the other tensors with
    unchanged bytes; shard names as in `src`; config.json with ``quantization_config`` (and
    ``modules_to_not_convert`` = `not_convert` when given)."""
    shards = {}
    for shard, tensors in read_shards(src).items():
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if is_fp8_target(name, t, not_convert):
                out[name], out[name + SCALE_SUFFIX] = quantize_blocks(t, scale_dtype, block)
            else:
                out[name] = t
        shards[shard] = out
    config = json.loads((Path(src) / "config.json").read_text())
    config["quantization_config"] = dict(QUANT_CONFIG, weight_block_size=list(block))
    if not_convert:
        config["quantization_config"]["modules_to_not_convert"] = list(not_convert)
    return write_shards(src, dst, shards, config)


def dequantized_state(src: Path, dtype: torch.dtype = torch.bfloat16,
                      block: tuple[int, int] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """shard -> {name -> tensor} of an FP8 folder as plain `dtype` tensors: each quantized weight is
    :func:`dequantize_f64` rounded once to `dtype`, its scale dropped; other floating tensors cast to
    `dtype` (exact for bf16 -> bf16/f32). `block` defaults to the config's weight_block_size.

    Q * S has up to 4 + 8 significant bits with BF16 scales and 4 + 24 with F32 ones, so bfloat16 is a
    rounding of the FP8 model (the one transformers' CPU load makes too), float32 is exact for BF16 scales
    only, float64 always."""
    if block is None:
        block = tuple(json.loads((Path(src) / "config.json").read_text())["quantization_config"]["weight_block_size"])
    shards = {}
    for shard, tensors in read_shards(src).items():
        out = {}
        for name, t in tensors.items():
            if name.endswith(SCALE_SUFFIX):
                continue
            if t.dtype == torch.float8_e4m3fn:
                out[name] = dequantize_f64(t, tensors[name + SCALE_SUFFIX], block).to(dtype)
            else:
                out[name] = t.to(dtype) if t.dtype.is_floating_point else t
        shards[shard] = out
    return shards


def dequantized_checkpoint(src: Path, dst: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A plain float folder from the FP8 folder `src` (see :func:`dequantized_state`): same shards, no
    ``*_scale_inv``, no ``quantization_config``, config ``dtype`` (and ``torch_dtype`` if present) set to
    `dtype`. The reference base for PEFT: load it with transformers and build the un-merged PeftModel on it."""
    config = json.loads((Path(src) / "config.json").read_text())
    config.pop("quantization_config", None)
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    return write_shards(src, dst, dequantized_state(src, dtype), config)


def fp8_pairs(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """weight name -> (Q, S) for every quantized weight of an FP8 folder."""
    every = {n: t for tensors in read_shards(folder).values() for n, t in tensors.items()}
    return {n: (t, every[n + SCALE_SUFFIX]) for n, t in every.items() if t.dtype == torch.float8_e4m3fn}


# --------------------------------------------------------------------------------------------------
# Tiny FP8 models


def bf16_source(out: Path) -> Path:
    """Where the FP8 builders keep the bf16 model they quantized: a sibling ``<out>-bf16``."""
    return Path(out).with_name(Path(out).name + "-bf16")


def build_fp8_qwen3(out: Path, *, hidden: int = 256, intermediate: int = 384, layers: int = 2,
                    scale_dtype: torch.dtype = torch.float32, seed: int = 0, max_shard_size: str = "600KB",
                    not_convert: tuple[str, ...] = ()) -> Path:
    """A tiny Qwen3 (4 heads of hidden/4, 2 KV heads, vocab 256) built by builders.build_tiny_base in bf16
    (kept at :func:`bf16_source`) in several shards, then quantized into `out`.

    hidden 256 / intermediate 384: every dim a multiple of 128 (k/v_proj 128 x 256). hidden 192: ragged
    blocks (q_proj 192 x 192 = 128 + 64 both ways, k/v_proj 96 x 192, gate 384 x 192, down 192 x 384)."""
    config = tiny_qwen3_config(hidden=hidden, layers=layers, head_dim=hidden // 4)
    config.intermediate_size = intermediate
    base = build_tiny_base(config, bf16_source(out), seed=seed, max_shard_size=max_shard_size, extra_files=True)
    return quantize_checkpoint(base, out, scale_dtype=scale_dtype, not_convert=not_convert)


def build_fp8_qwen3_moe(out: Path, *, hidden: int = 256, moe_intermediate: int = 128, experts: int = 4,
                        layers: int = 2, scale_dtype: torch.dtype = torch.float32, seed: int = 0,
                        max_shard_size: str = "600KB", not_convert: tuple[str, ...] = ()) -> Path:
    """A tiny Qwen3-MoE (per-expert tensors, builders.build_moe_base, bf16 kept at :func:`bf16_source`)
    quantized into `out`; the routers ``mlp.gate.weight`` stay bf16. hidden 192 or moe_intermediate 64
    give ragged blocks."""
    base = build_moe_base(bf16_source(out), seed=seed, max_shard_size=max_shard_size, hidden=hidden,
                          moe_intermediate=moe_intermediate, experts=experts, layers=layers,
                          head_dim=hidden // 4, vocab=256)
    return quantize_checkpoint(base, out, scale_dtype=scale_dtype, not_convert=not_convert)
