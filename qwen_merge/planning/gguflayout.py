"""Where each tensor of a merged checkpoint goes in a GGUF file: the GGUF tensors (names, shapes, types,
offsets), in the order llama.cpp's converter (`convert_hf_to_gguf.py`) writes them for the same
checkpoint, and for each checkpoint tensor the rows of which GGUF tensor its rows become.

The converter reads the checkpoint's shards in name order and each shard's tensors in name order; it
renames every tensor with the `gguf` package's name map (`model.layers.3.self_attn.q_proj.weight` ->
`blk.3.attn_q.weight`), and stores the experts of a MoE layer stacked (`blk.3.ffn_gate_exps.weight`, one
tensor of shape [experts, rows, cols]), written when the layer's last expert tensor is read: down, gate,
then up. A fused `mlp.experts.gate_up_proj` [experts, 2F, H] is split into gate (its first F rows of
each expert) and up (the last F). Types: norms, 1-D tensors, biases and the MoE routers stay F32; the rest
takes the output type, except that Q8_0 needs rows of a multiple of 32 values (else F16).

Rows are the unit everywhere: a tensor of shape [..., cols] has prod(shape[:-1]) rows; a stacked
tensor's bytes are its experts' bytes back to back, so an expert's rows land at `expert * rows` and each
piece of a checkpoint tensor can be written where it belongs as soon as it is computed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..dtypes import FLOATS
from ..errors import FormatError, MismatchError, OptionError
from .ggufmeta import GGUF_ARCHITECTURES

if TYPE_CHECKING:  # for annotations only
    from .plan import MergePlan

OUTTYPES = ("auto", "bf16", "f16", "f32", "q8_0")
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # general.file_type (llama.cpp's LlamaFileType)
GGML_TYPES = {"F32": 0, "F16": 1, "Q8_0": 8, "BF16": 30}  # the tensor types this output writes, by ggml id
ALIGNMENT = 32  # GGUF's default: each tensor's data starts at a multiple of it
Q8_BLOCK, Q8_BLOCK_BYTES = 32, 34  # Q8_0: 32 values in an fp16 scale and 32 int8
SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")  # the converter drops them
EXPERT_WEIGHTS = ("down_proj", "gate_proj", "up_proj")  # the order the converter writes a layer's stacks in
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<weight>gate_proj|up_proj|down_proj)"
                         r"\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<weight>gate_up_proj|down_proj)(?:\.weight)?$")


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor of the GGUF file: `shape` in checkpoint (torch) order, `ggml_type` a `GGML_TYPES` key,
    `offset` from the start of the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    offset: int
    nbytes: int

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.shape[-1], self.ggml_type)


@dataclass(frozen=True, slots=True)
class Placement:
    """`rows` rows of a checkpoint tensor, from `source_row`, become the rows of GGUF tensor `tensor` (an
    index into `GGUFLayout.tensors`) from `dest_row`."""

    source_row: int
    rows: int
    tensor: int
    dest_row: int


@dataclass(frozen=True, slots=True)
class GGUFLayout:
    """The tensors of the GGUF file, in file order, and where each checkpoint tensor's rows go
    (`placements`, by checkpoint name). `left_out`: checkpoint tensors the file does not hold;
    `shard_bytes`: the GGUF bytes each checkpoint shard's tensors become (for progress and resume)."""

    arch: str
    outtype: str
    tensors: tuple[GGUFTensor, ...]
    placements: Mapping[str, tuple[Placement, ...]]
    left_out: tuple[str, ...]
    shard_bytes: Mapping[str, int]

    @property
    def file_type(self) -> int:
        return FILE_TYPES[self.outtype]

    @property
    def data_bytes(self) -> int:
        """The bytes of the data section: every tensor, each padded to the alignment."""
        return self.tensors[-1].offset + _padded(self.tensors[-1].nbytes) if self.tensors else 0

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
        return counts


def row_bytes(cols: int, ggml_type: str) -> int:
    if ggml_type == "Q8_0":
        return cols // Q8_BLOCK * Q8_BLOCK_BYTES
    return cols * (4 if ggml_type == "F32" else 2)


def check_outtype(outtype: str | None) -> str:
    """`outtype` as given, lower-cased, or "auto" for None; refused when not one of `OUTTYPES`."""
    value = (outtype or "auto").lower()
    if value not in OUTTYPES:
        raise OptionError(f"must be one of {', '.join(OUTTYPES)}, got {outtype!r}", option="outtype")
    return value


def gguf_architecture(config: Mapping | None, where: object) -> str:
    """The GGUF architecture of a checkpoint's config.json; one line naming it and the supported ones if the
    GGUF output does not support it."""
    names = (config or {}).get("architectures") or []
    arch = names[0] if names else (config or {}).get("model_type", "unknown")
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(f"{a} ({g})" for a, g in GGUF_ARCHITECTURES.items())
        raise FormatError(f"{where}: architecture {arch} cannot be written as GGUF by qwen-merge; supported: "
                          f"{supported}; merge into a folder instead (OUT not ending in .gguf)")
    return GGUF_ARCHITECTURES[arch]


def gguf_layout(plan: MergePlan, outtype: str | None = None) -> GGUFLayout:
    """The GGUF file for the checkpoint `plan` writes. Raises `FormatError` (one line) for an architecture the
    output does not support, a tensor the converter's name map has no place for, or a non-float tensor."""
    import gguf  # the optional extra: `pip install "qwen-merge[gguf]"`, checked by the caller

    config = plan.config or plan.base.config or {}
    arch = gguf_architecture(config, plan.base.root / "config.json")
    tensors = [(e.name, e.dtype, e.shape) for shard in sorted(plan.shards, key=lambda s: s.name)
               for e in sorted(shard.entries, key=lambda e: e.name)]
    outtype = _resolve(check_outtype(outtype), tensors)
    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    name_map = gguf.get_tensor_name_map(gguf_arch, int(config.get("num_hidden_layers", 0)))
    builder = _Builder(outtype, _expert_count(config))
    for name, dtype, shape in tensors:
        if name.endswith(SKIPPED_SUFFIXES):
            builder.left_out.append(name)
            continue
        if dtype not in FLOATS:  # the checkpoint dtypes the converter reads as floats
            raise FormatError(f"{plan.base.root}: tensor {name} is {dtype}; a GGUF file is written from float "
                              f"tensors: pass --dtype bfloat16 (dtype='bfloat16') to dequantize the base first")
        builder.add(name, shape, lambda hf: _mapped(name_map, hf, name, plan))
    builder.finish(plan)
    gguf_tensors, placements = tuple(builder.tensors), builder.placements
    shard_bytes = {shard.name: sum(p.rows * gguf_tensors[p.tensor].row_bytes for e in shard.entries
                                   for p in placements.get(e.name, ())) for shard in plan.shards}
    return GGUFLayout(arch, outtype, gguf_tensors, placements, tuple(builder.left_out), shard_bytes)


def _resolve(outtype: str, tensors: list[tuple[str, str, tuple[int, ...]]]) -> str:
    """"auto" as the converter decides it: the dtype of the first tensor of two or more dimensions, bf16 or
    f16, else f16."""
    if outtype != "auto":
        return outtype
    first = next((dtype for _, dtype, shape in tensors if len(shape) >= 2), None)
    return "bf16" if first == "BF16" else "f16"


def _mapped(name_map, hf_name: str, source: str, plan: MergePlan) -> str:
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise FormatError(f"{plan.base.root}: tensor {source} has no place in a GGUF file of this architecture "
                          f"(llama.cpp's name map does not know it); merge into a folder instead")
    return gguf_name


def _expert_count(config: Mapping) -> int:
    return int(config.get("num_experts") or config.get("num_local_experts") or 0)


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class _Builder:
    """The GGUF tensors in the order the converter emits them, with their placements."""

    def __init__(self, outtype: str, n_experts: int) -> None:
        self.outtype, self.n_experts = outtype, n_experts
        self.tensors: list[GGUFTensor] = []
        self.placements: dict[str, list[Placement]] = {}
        self.left_out: list[str] = []
        self._offset = 0
        self._experts: dict[str, dict[tuple[str, int], tuple[str, tuple[int, ...]]]] = {}  # layer -> pending

    def add(self, name: str, shape: tuple[int, ...], mapped) -> None:
        if (m := _PER_EXPERT.match(name)) is not None:
            return self._add_expert(m["prefix"], m["weight"], int(m["expert"]), name, shape, mapped)
        if (m := _FUSED.match(name)) is not None:
            return self._add_fused(m["prefix"], m["weight"], name, shape, mapped)
        index = self._tensor(mapped(name), shape)
        self._place(name, Placement(0, _rows(shape), index, 0))

    def _add_expert(self, prefix: str, weight: str, expert: int, name: str, shape, mapped) -> None:
        pending = self._experts.setdefault(prefix, {})
        pending[(weight, expert)] = (name, shape)
        if len(pending) < 3 * self.n_experts:
            return
        for w in EXPERT_WEIGHTS:  # the converter stacks a layer once all its 3 x experts tensors were read
            members = [pending.get((w, e)) for e in range(self.n_experts)]
            if any(m is None for m in members) or len({m[1] for m in members}) != 1:
                raise MismatchError(f"{prefix}: the {w} experts are missing or differ in shape; a GGUF file "
                                    f"stacks {self.n_experts} experts of one shape")
            rows = _rows(members[0][1])
            index = self._tensor(mapped(f"{prefix}.{w}.weight"), (self.n_experts, *members[0][1]))
            for e, (member, _) in enumerate(members):
                self._place(member, Placement(0, rows, index, e * rows))
        del self._experts[prefix]

    def _add_fused(self, prefix: str, weight: str, name: str, shape: tuple[int, ...], mapped) -> None:
        if weight == "down_proj":
            index = self._tensor(mapped(f"{prefix}.down_proj.weight"), shape)
            return self._place(name, Placement(0, _rows(shape), index, 0))
        if len(shape) != 3 or shape[1] % 2:
            raise FormatError(f"tensor {name} has shape {list(shape)}; a fused gate_up_proj is [experts, 2 x F, H]")
        experts, half = shape[0], shape[1] // 2
        for part, w in enumerate(("gate_proj", "up_proj")):  # gate: each expert's first F rows; up: the last F
            index = self._tensor(mapped(f"{prefix}.{w}.weight"), (experts, half, shape[2]))
            for e in range(experts):
                self._place(name, Placement(e * 2 * half + part * half, half, index, e * half))

    def _tensor(self, gguf_name: str, shape: tuple[int, ...]) -> int:
        ggml_type = _ggml_type(gguf_name, shape, self.outtype)
        nbytes = _rows(shape) * row_bytes(shape[-1], ggml_type)
        self.tensors.append(GGUFTensor(gguf_name, tuple(shape), ggml_type, self._offset, nbytes))
        self._offset += _padded(nbytes)
        return len(self.tensors) - 1

    def _place(self, name: str, placement: Placement) -> None:
        self.placements.setdefault(name, []).append(placement)

    def finish(self, plan: MergePlan) -> None:
        if self._experts:
            prefix, pending = next(iter(self._experts.items()))
            raise MismatchError(f"{plan.base.root}: {prefix} has {len(pending)} expert tensors, expected "
                                f"{3 * self.n_experts} (3 for each of {self.n_experts} experts, as config.json says)")
        self.placements = {name: tuple(ps) for name, ps in self.placements.items()}


def _rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) if shape else 1


def _ggml_type(gguf_name: str, shape: tuple[int, ...], outtype: str) -> str:
    """The converter's choice: F32 for 1-D tensors, norms, routers and anything not a `.weight`; the output
    type for the rest, F16 where Q8_0's 32-value blocks do not divide a row."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight") \
            or gguf_name.endswith((".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")):
        return "F32"
    if outtype == "q8_0" and shape[-1] % Q8_BLOCK:
        return "F16"
    return outtype.upper()  # f32, f16, bf16, q8_0: the GGML type's name

