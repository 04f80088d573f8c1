"""Quantized bases: which tensors of a checkpoint are FP8 with block scales, and what cannot be merged.

The one quantized format merged is the "fine-grained" FP8 of Qwen's `-FP8` checkpoints and DeepSeek-V3
(`quantization_config.quant_method == "fp8"` with a 2-D `weight_block_size`): a weight `X.weight` is stored
as F8_E4M3 `(out, in)` beside `X.weight_scale_inv`, one scale per block of `weight_block_size` elements
(`ceil(out/b0) x ceil(in/b1)`, F32 or BF16), and its value is `W[i, j] = f32(Q[i, j]) · S[i // b0, j // b1]`
(ragged edge blocks included). Everything else a quantized checkpoint may hold (other `quant_method`s,
packed integer weights) is copied byte for byte when untouched and refused when an adapter targets it.
Only headers and JSON are read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import FormatError, MismatchError
from ..inputs.tensorfile import TensorEntry
from .recipe import Source

FP8 = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"
SCALE_DTYPES = frozenset({"F32", "BF16", "F16"})
SUPPORTED = ("plain BF16/F16/F32 weights, and FP8 (F8_E4M3) weights with a `weight_scale_inv` block scale "
             "(quantization_config quant_method \"fp8\" with weight_block_size)")


@dataclass(frozen=True, slots=True)
class BlockScale:
    """The block scales of an FP8 tensor: where they are stored, their dtype, and the block size."""

    source: Source
    block: tuple[int, int]

    @property
    def dtype(self) -> str:
        return self.source.entry.dtype

    @property
    def name(self) -> str:
        return self.source.entry.name


@dataclass(frozen=True, slots=True)
class Quantization:
    """What a base's `quantization_config` says: its method, and for FP8 the block size (else None)."""

    method: str | None
    block: tuple[int, int] | None

    @classmethod
    def of(cls, config: dict | None, path: str) -> Quantization:
        q = (config or {}).get("quantization_config")
        if not isinstance(q, dict):
            return cls(None, None)
        method = str(q.get("quant_method"))
        if method != "fp8":
            return cls(method, None)
        block = q.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
            raise FormatError(f"{path}: quantization_config.weight_block_size must be two positive integers "
                              f"(e.g. [128, 128]), found {block!r}; only block-wise FP8 is supported")
        return cls(method, (block[0], block[1]))

    @property
    def fp8(self) -> bool:
        return self.block is not None


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


def fp8_scales(quant: Quantization, where: dict[str, tuple], entries: dict[str, TensorEntry]
               ) -> dict[str, BlockScale]:
    """weight name -> its BlockScale, for every FP8 tensor that has a scale of the right shape.

    Raises:
        FormatError: a scale whose dtype or shape does not fit its weight.
    """
    if not quant.fp8:
        return {}
    scales = {}
    for name, entry in entries.items():
        if entry.dtype != FP8 or scale_name(name) not in entries:
            continue
        scale = entries[scale_name(name)]
        want = grid(entry.shape, quant.block)
        if want is None:
            continue  # not a 2-D weight: copied as it is, refused as a target (`refuse_target`)
        if scale.dtype not in SCALE_DTYPES or scale.shape != want:
            raise FormatError(f"{where[name][0].path}: {scale.name!r} is {scale.dtype} {list(scale.shape)}; the "
                              f"block scale of {name} {list(entry.shape)} with blocks {list(quant.block)} must be "
                              f"F32 or BF16 {list(want)}")
        scales[name] = BlockScale(Source(*where[scale.name], False), quant.block)
    return scales


def grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int] | None:
    """The shape of the scale grid of a 2-D weight: ceil(rows / b0) x ceil(cols / b1)."""
    if len(shape) != 2:
        return None
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def refuse_target(name: str, entry: TensorEntry, quant: Quantization, has_scale: bool) -> MismatchError:
    """The error for an adapter target that is neither a plain float tensor nor FP8 with its scale."""
    if quant.method is not None and not quant.fp8:
        what = f"the base is quantized with quant_method {quant.method!r} and the tensor is {entry.dtype}"
    elif entry.dtype == FP8 and has_scale and len(entry.shape) != 2:
        what = f"it is a {len(entry.shape)}-D {FP8} tensor; block scales are read for 2-D weights only"
    elif entry.dtype == FP8 and has_scale:
        what = f"it is {FP8} but config.json has no quantization_config with quant_method \"fp8\""
    elif entry.dtype == FP8:
        what = f"it is {FP8} without a {scale_name(name).rsplit('.', 1)[-1]} block scale"
    else:
        what = f"its dtype is {entry.dtype}"
    return MismatchError(f"{name} cannot take a LoRA delta: {what}. Supported: {SUPPORTED}; merge into the "
                         f"unquantized model instead")
