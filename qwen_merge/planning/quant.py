"""Quantized bases: which tensors of a checkpoint are FP8 with block scales, and what cannot be merged.

The one quantized format merged is the "fine-grained" FP8 of Qwen's `-FP8` checkpoints and DeepSeek-V3
(`quantization_config.quant_method == "fp8"` with a 2-D `weight_block_size`): a weight `X.weight` is stored
as F8_E4M3 `(out, in)` beside `X.weight_scale_inv`, one scale per block of `weight_block_size` elements
(`ceil(out/b0) x ceil(in/b1)`, F32 or BF16), and its value is `W[i, j] = f32(Q[i, j]) · S[i // b0, j // b1]`
(ragged edge blocks included).

bitsandbytes 4-bit checkpoints (QLoRA bases: `quant_method == "bitsandbytes"` with `load_in_4bit`) are
dequantized: each quantized weight `X.weight` (4-bit codes, two per byte) has beside it `X.weight.absmax`,
`X.weight.quant_map` and its `quant_state` JSON (with double quantization also `X.weight.nested_absmax` and
`X.weight.nested_quant_map`); `PackedWeight` names them all, and the output holds the weight alone, in
`bnb_4bit_compute_dtype` (or the dtype asked for). 8-bit (LLM.int8) checkpoints are refused.

Everything else a quantized checkpoint may hold (other `quant_method`s,
packed integer weights) is copied byte for byte when untouched and refused when an adapter targets it.
Only headers and JSON are read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..dtypes import DTYPE_NAMES, DTYPE_OF_NAME
from ..errors import FormatError, MismatchError
from ..inputs.tensorfile import TensorEntry
from .recipe import Source

if TYPE_CHECKING:  # the planner is handed the quant_states; it does not read them
    from ..inputs.bnb4 import QuantState

FP8 = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"
SCALE_DTYPES = frozenset({"F32", "BF16", "F16"})
SUPPORTED = ("plain BF16/F16/F32 weights, and FP8 (F8_E4M3) weights with a `weight_scale_inv` block scale "
             "(quantization_config quant_method \"fp8\" with weight_block_size), and bitsandbytes 4-bit weights "
             "(quant_method \"bitsandbytes\" with load_in_4bit)")


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
    compute_dtype: str | None = None  # bitsandbytes 4-bit: the dtype its layers compute in, the output's

    @classmethod
    def of(cls, config: dict | None, path: str) -> Quantization:
        """
        Raises:
            FormatError: FP8 without a valid block size, a bitsandbytes 8-bit checkpoint (refused), or a
                bitsandbytes compute dtype that is not a float.
        """
        q = (config or {}).get("quantization_config")
        if not isinstance(q, dict):
            return cls(None, None)
        method = str(q.get("quant_method"))
        if method == BNB:
            return cls(method, None, _bnb_compute_dtype(q, path))
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

    @property
    def bnb4(self) -> bool:
        return self.compute_dtype is not None


BNB = "bitsandbytes"
BNB_COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # X.weight.<companion>


def _bnb_compute_dtype(q: dict, path: str) -> str | None:
    """The output dtype of a bitsandbytes 4-bit base (`bnb_4bit_compute_dtype`, float32 when unset, as
    transformers' default); None for a bitsandbytes config that is neither 4- nor 8-bit."""
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise FormatError(f"{path}: BASE is a bitsandbytes 8-bit (LLM.int8) checkpoint, which cannot be "
                          f"dequantized exactly; merge into the original unquantized model instead")
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        return None
    name = q.get("bnb_4bit_compute_dtype") or "float32"
    dtype = DTYPE_OF_NAME.get(str(name).lower().removeprefix("torch."))
    if dtype is None:
        raise FormatError(f"{path}: quantization_config.bnb_4bit_compute_dtype is {name!r}; expected bfloat16, "
                          f"float16 or float32")
    return dtype


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A bitsandbytes 4-bit weight: its packed codes (`source`, any dtype: read as bytes, two codes per
    byte, high nibble first), its per-block `absmax` (F32, or U8 codes into `nested_quant_map` scaled by
    `nested_absmax` when double-quantized), its 16-value `quant_map`, and its `state` (shape, block sizes).
    Its value is `quant_map[code] · absmax[i // blocksize]` in fp32."""

    source: Source
    absmax: Source
    quant_map: Source
    state: QuantState
    nested_absmax: Source | None = None
    nested_quant_map: Source | None = None

    @property
    def companions(self) -> tuple[Source, ...]:
        """Every tensor read beside the codes."""
        return tuple(s for s in (self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map)
                     if s is not None)


def bnb4_weights(quant: Quantization, where: dict[str, tuple], states: dict[str, QuantState] | None
                 ) -> tuple[dict[str, PackedWeight], list[str]]:
    """(weight name -> its PackedWeight, the companion tensors the output leaves out) of a bitsandbytes
    4-bit base, every quantized weight checked against its quant_state from headers alone.

    Raises:
        FormatError: a companion tensor missing, or of the wrong dtype or shape; codes of another size than
            the quant_state's shape needs; codes with an absmax but no quant_state (file, tensor, expected,
            found).
    """
    if not quant.bnb4:
        return {}, []
    weights, dropped = {}, []
    for name, state in (states or {}).items():
        weights[name] = _packed_weight(name, state, where)
        dropped += [f"{name}.quant_state.bitsandbytes__{state.quant_type}",
                    *(s.entry.name for s in weights[name].companions)]
    for name in where:  # codes whose JSON is missing would be copied as bytes
        weight = name.removesuffix(".absmax")
        if weight != name and weight not in weights and weight in where and where[weight][1].shape[-1:] == (1,):
            raise FormatError(f"{where[weight][0].path}: bitsandbytes 4-bit weight {weight} has an absmax but no "
                              f"{weight}.quant_state.bitsandbytes__nf4 (or __fp4) tensor; expected one, found none")
    return weights, dropped


def _packed_weight(name: str, state: QuantState, where: dict[str, tuple]) -> PackedWeight:
    """Weight `name`'s codes and companion tensors, each checked against what `state` says they hold."""
    kind = f"{name}.quant_state.bitsandbytes__{state.quant_type}"
    file = where[kind][0].path

    def tensor(suffix: str, dtype: str, shape: tuple[int, ...]) -> Source:
        full = f"{name}.{suffix}"
        if full not in where:
            raise FormatError(f"{file}: bitsandbytes 4-bit weight {name} has no {full!r} tensor; expected {dtype} "
                              f"{list(shape)}")
        tensor_file, entry = where[full]
        if entry.dtype != dtype or entry.shape != shape:
            raise FormatError(f"{tensor_file.path}: {full!r} is {entry.dtype} {list(entry.shape)}; expected {dtype} "
                              f"{list(shape)} for a {list(state.shape)} weight")
        return Source(tensor_file, entry, False)

    if name not in where:
        raise FormatError(f"{file}: {kind!r} describes a weight {name!r} the checkpoint does not have; expected "
                          f"its packed 4-bit codes beside it")
    codes = Source(*where[name], False)
    packed = -(-state.numel // 2)
    if codes.entry.nbytes != packed:
        raise FormatError(f"{codes.file.path}: {name!r} holds {codes.entry.nbytes} bytes; expected {packed} "
                          f"(two 4-bit codes per byte) for a {list(state.shape)} weight ({kind})")
    blocks = -(-state.numel // state.blocksize)
    quant_map = tensor("quant_map", "F32", (16,))
    if not state.nested:
        return PackedWeight(codes, tensor("absmax", "F32", (blocks,)), quant_map, state)
    return PackedWeight(codes, tensor("absmax", "U8", (blocks,)), quant_map, state,
                        tensor("nested_absmax", "F32", (-(-blocks // state.nested_blocksize),)),
                        tensor("nested_quant_map", "F32", (256,)))


def bnb4_note(dtype: str, config: dict | None, weights: dict[str, PackedWeight]) -> str:
    """What merging onto a bitsandbytes 4-bit base means, in one line, naming the original model when the
    config records it (`_name_or_path`, when it is not the folder the checkpoint was saved from)."""
    kinds = "/".join(sorted({w.state.quant_type.upper() for w in weights.values()})) or "4-bit"
    original = (config or {}).get("_name_or_path")
    named = (f" ({original})" if isinstance(original, str) and original and "/" in original
             and not original.startswith(("/", ".")) else "")
    return (f"BASE is a bitsandbytes {kinds} checkpoint: merging onto its {len(weights)} dequantized 4-bit weights "
            f"(what a QLoRA adapter was trained against), written in {DTYPE_NAMES[dtype][0]}; the original "
            f"unquantized model{named} would give a different model")


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
