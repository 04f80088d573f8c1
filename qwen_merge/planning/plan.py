"""Decide everything before the first byte is written: which tensor merges with which factors, how,
into which output file, with which header — from headers and JSON only, never tensor data (the one
value comparison the tied-embedding decision needs is passed in).

Every adapter module must land on exactly one base tensor with fitting shapes, or planning fails.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import CONFIG_DTYPE_KEYS, FLOATS, MERGEABLE_FLOATS, NARROW_FLOATS, dtype_name
from ..errors import AdapterError, MismatchError, OptionError
from ..files import MODEL_CONFIG
from ..inputs.adapter import Adapter, Kind, TokenRows, settle_parameters
from ..inputs.checkpoint import Checkpoint
from ..inputs.tensorfile import TensorEntry, TensorFile
from ..options import MergeOptions, Rounding
from ..planning.manifest import output_files
from . import experts, layout, memory, targets, ties
from .layout import PendingEntry, index_json
from .names import NameMap, resolve_names
from .quant import (FP8, BlockScale, PackedWeight, Quantization, bnb4_note, bnb4_weights, fp8_scales, refuse_target,
                    scale_name)
from .recipe import Pair, Part, Recipe, Source, SumPair, combine

if TYPE_CHECKING:  # the planner is handed the tokenizer decision and the quant_states; it reads neither
    from ..inputs.bnb4 import QuantState
    from .tokenizer import TokenizerChoice

SameBytes = Callable[[TensorFile, TensorEntry, TensorFile, TensorEntry], bool]
BATCH_TENSOR_BYTES = 1 << 20  # larger tensors amortise their own overhead and are merged one by one

# Architectures whose adapted layers are GPT-2 style Conv1D, storing W as (in, out); PEFT forces
# fan_in_fan_out per module for them, whatever the saved config says.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})


class OpKind(Enum):
    """What an op does to make its tensor, set once by the planner (`TensorOp.kind`); the run (`pieces`,
    `stream`), `verify` and the report each dispatch on it:

    * COPY: the source's bytes as they are (an adapter tensor that replaces the base tensor in its dtype,
      or another base tensor: the embedding, as an untied lm_head);
    * CONVERT: the source's values in another dtype (an FP8 or bitsandbytes 4-bit source dequantized);
    * TOKENS: the source's values, in the output dtype, with trainable-token rows set;
    * MERGE: W + ΔW of a LoRA pair (Linear, Embedding, convolution, DoRA, one expert's slice of a fused
      LoRA), then the token rows a tied lm_head with its own LoRA takes from the embedding;
    * BIAS: a bias + s·lora_B.bias (`lora_bias`);
    * REQUANT: an FP8 weight, dequantized, + ΔW (or replaced by an adapter tensor), requantized per block;
    * SCALES: the new block scales of a REQUANT weight.

    Where the op starts (the base tensor, another one, or an adapter tensor that replaces it:
    `Source.in_adapter`) is not part of the kind: a replacement is copied, converted, merged or
    requantized as a base tensor is. A tensor the base does not have (an untied lm_head) is no kind
    either: it is made as any other, and only laid out differently."""

    COPY = "copy"
    CONVERT = "convert"
    TOKENS = "tokens"
    MERGE = "merge"
    BIAS = "bias"
    REQUANT = "requant"
    SCALES = "scales"


@dataclass(frozen=True, slots=True)
class TensorOp:
    """How one output tensor is made when it is not a byte copy of the base tensor of the same name:
    its `kind` (`OpKind`), and what that kind reads.

    Every kind starts from `source` (the base tensor, another base tensor for a new untied lm_head, or an
    adapter tensor that replaces it), read as the (rows, columns) `matrix` in blocks of `block_rows`, and
    makes `dtype`. The source's rows are read as stored, except that FP8 ones are dequantized with their
    block scale `dequant` (f32(Q) · S), and an adapter tensor stored in another dtype than the base tensor
    is first rounded to the base tensor's (`source_round`), as loading it into the base parameter does in
    PEFT; the op then computes in fp32 and rounds once to `dtype`. `check_finite`: stop on NaN/Inf in the
    factors or the result.

    MERGE and BIAS (and a REQUANT weight that takes a delta) add the LoRA delta of `pair` to the weight,
    or to the bias when `part` is BIAS, with DoRA when the pair has a magnitude. `transpose`: W is stored
    (in, out) (embeddings, GPT-2 Conv1D). `round_delta`: the delta is rounded to `dtype` before it is
    added, as PEFT's merge does for this kind of layer (only with Rounding.PEFT). `batchable`: one
    expert's small tensor that takes a slice of a fused-expert LoRA, merged in one batched product with
    its neighbours (`follows`) instead of paying a tensor's overhead alone.

    TOKENS (and MERGE, for a tied lm_head) overwrite the `tokens` rows last.

    `packed`: the source is a bitsandbytes 4-bit weight (`source` its codes), read as its values
    `quant_map[code] · absmax[block]` (fp32) rounded to `dtype`, which then stand for the base tensor.

    REQUANT: `requant` is the base block scale of the F8_E4M3 output, requantized per block (a block whose
    largest magnitude is unchanged keeps the base's scale); the SCALES op with `scales_of` set to it writes
    its new block scales."""

    name: str
    shard: str
    kind: OpKind
    dtype: str
    shape: tuple[int, ...]
    source: Source
    block_rows: int
    matrix: tuple[int, int] = (0, 0)  # the (rows, columns) view streamed in row blocks (`matrix_view`)
    check_finite: bool = True
    # how the source's rows are read
    dequant: BlockScale | None = None
    source_round: str | None = None  # an adapter tensor is rounded to the base tensor's dtype first
    # the delta: MERGE, BIAS, and a REQUANT weight that takes one
    pair: Pair | None = None
    part: Part = Part.WEIGHT
    transpose: bool = False
    round_delta: bool = False
    batchable: bool = False
    # TOKENS, and a MERGE of a tied lm_head
    tokens: TokenRows | None = None
    # REQUANT, SCALES
    requant: BlockScale | None = None
    scales_of: TensorOp | None = None
    packed: PackedWeight | None = None

    @property
    def rank(self) -> int | None:
        return self.pair.rank if self.pair else None

    @property
    def scale(self) -> float | None:
        return self.pair.scale if self.pair else None

    @property
    def is_raw_copy(self) -> bool:
        """Bytes can be copied as they are from the source (`OpKind.COPY`)."""
        return self.kind is OpKind.COPY

    @property
    def steps(self) -> str:
        """What happens to the tensor, in words: `dequant → merge → requant`, `merge`, `→ BF16`, ..."""
        if self.kind is OpKind.SCALES:
            return f"new block scales of {self.scales_of.name}"
        steps = ["dequant"] if self.dequant or self.packed else []
        if self.pair is not None or self.tokens is not None:
            steps.append("merge")
        elif self.source.in_adapter:
            steps.append("replace")
        if self.kind is OpKind.REQUANT:
            steps.append("requant")
        elif self.dtype != self.source.entry.dtype:
            steps.append(self.dtype)
        return " → ".join(steps) if steps[:1] != [self.dtype] else f"→ {self.dtype}"

    @property
    def wide(self) -> bool:
        """Merged in float64 from an exact product (`compute.widen`): an fp32 output, where no narrower
        rounding hides the order in which a GEMM sums, so fp32 arithmetic would make the bits depend on the
        host. FP8 outputs are rounded to e4m3 and merge in fp32."""
        return self.dtype == "F32" and self.kind in _WIDE_KINDS

    def follows(self, other: TensorOp) -> bool:
        """Whether this op's source bytes come right after `other`'s, in the same file, with the same
        dtype and options: two batchable ops that can be read, merged and written as one span."""
        return (self.source.file is other.source.file and self.source.entry.start == other.source.entry.end
                and (self.dtype, self.check_finite, self.round_delta)
                == (other.dtype, other.check_finite, other.round_delta))


_WIDE_KINDS = (OpKind.MERGE, OpKind.BIAS)  # the kinds `TensorOp.wide` applies to, in an fp32 output


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One output file: its name, the base shard it is made from (the first one, when re-sharded), its
    entries (with output offsets) and header, the ops of the tensors that are not byte copies of the
    base, and where in the base each copied tensor is (`where`, shared by every shard of a plan)."""

    name: str
    source: TensorFile
    entries: tuple[TensorEntry, ...]
    header: bytes
    ops: dict[str, TensorOp]
    where: dict[str, tuple[TensorFile, TensorEntry]]

    def copy_source(self, name: str) -> tuple[TensorFile, TensorEntry]:
        """The base shard and entry of a tensor that is copied unchanged."""
        return self.where[name]

    @property
    def size(self) -> int:
        return len(self.header) + (self.entries[-1].end if self.entries else 0)


@dataclass(frozen=True, slots=True)
class MergePlan:
    """The complete, validated plan of a merge. Produced by `plan_merge`, executed by `merge_shards`.

    `merges` are the tensors that receive a LoRA delta; `ops` every tensor that is not a byte copy;
    `config` the output config.json when it must differ from the base's (vocab size, tying), else None;
    `renames` the prefix renames applied to adapter names; `tie` what was decided for tied embeddings;
    `index_name` the output's index file (None when the output is a single file without one);
    `dropped` base tensors the output leaves out (the block scales of a dequantized FP8 checkpoint);
    `tokenizer` the tokenizer files the output gets (`qwen_merge.tokenizer`); `notes` facts about the inputs
    worth a line of their own (the adapter names another base model, BASE was taken from the adapter).
    `adapters` and `weights`: set when several adapters (or one with a weight) are merged as a weighted sum
    of their deltas; empty for one adapter merged as it is."""

    base: Checkpoint
    adapter: Adapter
    options: MergeOptions
    shards: tuple[ShardPlan, ...]
    ops: tuple[TensorOp, ...]
    copied: int
    config: dict | None
    renames: tuple[tuple[str, str], ...]
    tie: ties.TieDecision | None
    predicted_peak_bytes: int = 0
    index_json: bytes = b""  # the output's index file, as written (empty without an index)
    index_name: str | None = None
    dropped: tuple[str, ...] = ()
    tokenizer: TokenizerChoice | None = None
    notes: tuple[str, ...] = ()
    adapters: tuple[Adapter, ...] = ()  # several adapters, weighted (`weights`): `adapter` is the first
    weights: tuple[float, ...] = ()

    @property
    def side_files(self) -> tuple[Path, ...]:
        """The files copied beside the shards: the base's side files, but with the tokenizer files of the
        chosen tokenizer when it is not the base's (whole: none of the base's tokenizer files stay)."""
        if self.tokenizer is None or self.tokenizer.source == "base":
            return self.base.side_files
        kept = [p for p in self.base.side_files if p.name not in self.tokenizer.left_out]
        return tuple(sorted([*kept, *self.tokenizer.files], key=lambda p: p.name))

    def side_file_size(self, path: Path) -> int:
        """The size of a side file of the output (a Hub base's from its listing: it may not be cached yet)."""
        return self.base.file_size(path) if path in self.base.side_files else path.stat().st_size

    @property
    def merges(self) -> tuple[TensorOp, ...]:
        return tuple(op for op in self.ops if op.pair is not None)

    @property
    def conversions(self) -> tuple[TensorOp, ...]:
        """The tensors written in another dtype and otherwise unchanged (`--dtype`, a dequantized base)."""
        return tuple(op for op in self.ops if op.kind is OpKind.CONVERT)

    @property
    def total_size(self) -> int:
        """Tensor payload bytes, as the HF index's `metadata.total_size` counts them."""
        return _total_size(self.shards)

    @property
    def output_bytes(self) -> int:
        """The bytes `merge_shards` writes: every file of the output folder, manifest included
        (`manifest.output_files`); its report's `bytes_written` is the same number."""
        return sum(output_files(self).values())

    def index_document(self) -> dict:
        """The HF index of the output: the base's metadata with `total_size`, and the full weight map."""
        return _index_document(self.base, self.shards, self.dropped)


def make_plan(base: Checkpoint, adapter: Adapter, options: MergeOptions, same_values: ties.SameValues,
              tokenizer: TokenizerChoice | None = None, quant_states: dict[str, QuantState] | None = None, *,
              others: tuple[Adapter, ...] = (), weights: tuple[float, ...] | None = None,
              same_bytes: SameBytes | None = None) -> MergePlan:
    """Map every adapter tensor to the output tensor it changes, check shapes and dtypes, decide tied
    embeddings and vocabulary size, and lay out the output — from headers and JSON only.

    `same_values(x, y, transposed)` says whether two adapter tensors hold the same values (y transposed),
    which the tied-embedding decision needs. `tokenizer`: the tokenizer files the output gets (None: the
    base's side files as they are). `quant_states`: the quant_state JSON of a bitsandbytes 4-bit base's
    weights (`inputs.bnb4.read_quant_states`); such a base is written dequantized, in its compute dtype
    unless `options.dtype` says another. `others` and `weights`: several adapters (`adapter` first, then
    `others`), weighted, their LoRA deltas summed (`recipe.combine`); None: `adapter` alone, as it is.
    `same_bytes(file, entry, file, entry)`: whether two tensors hold the same bytes, for an adapter's saved
    copy of a base tensor that another adapter changes too.

    Raises:
        MismatchError: an adapter tensor lands nowhere, or shapes/dtypes do not fit.
        AdapterError: the config asks for something the file cannot provide.
        OptionError: the output dtype cannot be made from this base.
    """
    entries = base.entries()
    tie_info = ties.TieInfo.of(base.config, entries)
    holds = experts.HeldParameters(entries)
    where = base.locations()
    settled, per_adapter, renames = [], [], []
    for one in (adapter, *others):
        one, recipes, names = _adapter_recipes(base, one, options, entries, holds, where, tie_info)
        settled.append(one)
        per_adapter.append(recipes)
        renames += [r for r in names.renames if r not in renames]
    adapter, recipes = settled[0], per_adapter[0]
    if weights is not None:
        recipes = combine(per_adapter, settled, weights, lambda name, source: _base_source(where, name) if (
            same_bytes is not None and name in where and same_bytes(source.file, source.entry, *where[name])) else None)
    recipes, added, tie = ties.decide(tie_info, recipes, adapter.config, lambda n: _base_source(where, n),
                                      same_values)
    quant = Quantization.of(base.config, str(base.root / MODEL_CONFIG))
    packed, companions = bnb4_weights(quant, where, quant_states)
    if quant.bnb4 and options.dtype is None:  # a 4-bit base is always dequantized: one dtype out
        options = dataclasses.replace(options, dtype=quant.compute_dtype)
    builder = _OpBuilder(base, adapter, entries, where, options, quant, fp8_scales(quant, where, entries), packed,
                         tuple(companions))
    try:
        ops = {name: builder.op(name, recipe) for name, recipe in recipes.items()}
    except MismatchError as e:  # the checks speak of tensors; name the adapter they come from too
        if weights is not None:
            raise
        raise MismatchError(f"{adapter.file.path}: {e}") from e
    ops.update(builder.conversions(ops))
    ops.update(builder.scale_ops(ops))
    dropped = builder.dropped()
    untied = tie is not None and tie.tie is ties.Tie.UNTIED
    config = _output_config(base, ops, entries, tie_info, untied=untied, dtype=options.dtype,
                            dequantized=quant.method is not None and options.dtype is not None)
    shards, index_name = _layout(base, ops, added, dropped, where, options.max_shard_size)
    in_order = tuple(op for s in shards for op in _ops_in_order(s))
    tensors = sum(len(s.entries) for s in shards)
    return MergePlan(base, adapter, options, shards, in_order, copied=tensors - len(in_order), config=config,
                     renames=tuple(renames), tie=tie, predicted_peak_bytes=memory.predict_peak(in_order, tensors),
                     index_json=index_json(_index_document(base, shards, tuple(dropped))) if index_name else b"",
                     index_name=index_name, dropped=tuple(dropped), tokenizer=tokenizer,
                     adapters=tuple(settled) if weights is not None else (), weights=weights or (),
                     notes=(bnb4_note(options.dtype, base.config, packed),) if quant.bnb4 else ())


def _adapter_recipes(base: Checkpoint, adapter: Adapter, options: MergeOptions, entries: dict[str, TensorEntry],
                     holds: experts.HeldParameters, where: dict[str, tuple[TensorFile, TensorEntry]],
                     tie_info: ties.TieInfo) -> tuple[Adapter, dict[str, Recipe], NameMap]:
    """One adapter's recipes by on-disk tensor name, before the tied-embedding decision; with the adapter
    as its target_parameters settle on this base, and its name map."""
    targets.refuse_multihead_attention(adapter, entries)
    wanted = targets.wanted(adapter)
    names = resolve_names(wanted, lambda name: name in entries or name in holds.modules(), dict(options.key_map),
                          base.config, optional=tie_info.may_create, base_names=entries,
                          describe=lambda target: f"{adapter.file.path}: {wanted[target]}")
    adapter = settle_parameters(adapter, lambda module: holds(names(module)))
    recipes = _recipes(adapter, names, where)
    for name, pair in experts.expert_intents(adapter, names, entries, holds).items():
        if name in recipes:
            raise AdapterError(f"{adapter.file.path}: {name!r} gets both a per-module LoRA and a target_parameters "
                               f"LoRA; PEFT applies one adapter kind per module")
        recipes[name] = Recipe(_base_source(where, name), pair)
    targets.check_untrained_targets(adapter, names, names.inverse, entries, holds, base.config)
    return adapter, recipes, names


def _total_size(shards: tuple[ShardPlan, ...]) -> int:
    return sum(s.entries[-1].end for s in shards if s.entries)


def _index_document(base: Checkpoint, shards: tuple[ShardPlan, ...], dropped: tuple[str, ...]) -> dict:
    metadata = {**base.index_metadata, "total_size": _total_size(shards)}
    if "total_parameters" in metadata and any(op.packed for s in shards for op in s.ops.values()):
        metadata["total_parameters"] = sum(math.prod(e.shape) for s in shards for e in s.entries)  # 4-bit: all new
    elif "total_parameters" in metadata and dropped:
        entries = base.entries()
        metadata["total_parameters"] -= sum(math.prod(entries[n].shape) for n in dropped)
    return {"metadata": metadata, "weight_map": {e.name: s.name for s in shards for e in s.entries}}


def _recipes(adapter: Adapter, names: NameMap, where: dict[str, tuple[TensorFile, TensorEntry]]
             ) -> dict[str, Recipe]:
    """On-disk tensor name -> how the adapter's replacements, LoRA pairs and token rows make it."""
    recipes: dict[str, Recipe] = {}

    def add(target: str, key: str, **fields) -> None:
        name = names(target)
        current = recipes.get(name) or Recipe(_base_source(where, name))
        for field in fields.keys() - {"part"}:
            value = getattr(current, field)  # a base source is only the default: a replacement may take it
            if value is not None and (field != "source" or value.in_adapter):
                raise AdapterError(f"{adapter.file.path}: {key!r} and another tensor both set the {field} of {name!r}")
        recipes[name] = dataclasses.replace(current, **fields)

    for target, entry in adapter.replacements.items():
        add(target, entry.name, source=Source(adapter.file, entry, True))
    for pair in adapter.pairs:
        add(f"{pair.module}.weight", pair.a.name, pair=pair)
        if pair.bias is not None:
            add(f"{pair.module}.bias", pair.bias.name, pair=pair, part=Part.BIAS)
    for rows in adapter.tokens:
        add(f"{rows.module}.weight", rows.values.name, tokens=rows)
    for name, recipe in recipes.items():
        if recipe.pair is not None and recipe.tokens is not None:
            raise AdapterError(f"{adapter.file.path}: {name!r} has both a LoRA delta and trainable tokens; "
                               f"PEFT does not combine them on one module")
    return recipes


def _base_source(where: dict[str, tuple[TensorFile, TensorEntry]], name: str) -> Source | None:
    return Source(*where[name], False) if name in where else None


@dataclass(frozen=True, slots=True)
class _OpBuilder:
    base: Checkpoint
    adapter: Adapter
    entries: dict[str, TensorEntry]
    where: dict[str, tuple[TensorFile, TensorEntry]]
    options: MergeOptions
    quant: Quantization
    scales: dict[str, BlockScale]  # FP8 weight -> its block scale
    packed: dict[str, PackedWeight] = dataclasses.field(default_factory=dict)  # bitsandbytes 4-bit weights
    companions: tuple[str, ...] = ()  # their absmax, quant_map, ... tensors: not in the output

    def op(self, name: str, recipe: Recipe) -> TensorOp:
        source = recipe.source
        existing = self.entries.get(name)
        packed = self.packed.get(name)
        if packed is not None:  # its values stand for an fp32 tensor of its logical shape
            existing = dataclasses.replace(existing, dtype="F32", shape=packed.state.shape)
            packed = packed if not source.in_adapter else None
        # a tensor the base does not have (an untied lm_head) takes the dtype of the one it is made from
        dtype = (existing or self.entries.get(recipe.shard_of) or source.entry).dtype
        fp8 = self.scales.get(name)
        dequant = fp8 if fp8 is not None and not source.in_adapter else None
        requant = fp8 if fp8 is not None and self.options.dtype is None else None
        if requant is not None:
            out_dtype = FP8
        elif self.options.dtype is not None and (dtype in FLOATS or fp8 is not None):
            out_dtype = self.options.dtype
        else:
            out_dtype = dtype
        _check_replacement(name, existing, source, dtype if fp8 is None else "F32")
        shape = source.entry.shape if packed is None else packed.state.shape
        rows, cols = matrix_view(shape, recipe.pair, recipe.part)
        shard = self.base.weight_map.get(name) or self.base.weight_map[recipe.shard_of]
        round_delta = (self.options.rounding is Rounding.PEFT and recipe.pair is not None
                       and recipe.part == Part.WEIGHT and _peft_rounds_delta(recipe.pair, self.adapter.config))
        transpose = False
        if recipe.pair is not None:
            if dtype not in FLOATS and dequant is None:
                raise refuse_target(name, existing or source.entry, self.quant, scale_name(name) in self.entries)
            transpose = _check_pairs(name, "F32" if dequant else dtype, shape, recipe.pair, recipe.part,
                                     (self.base.config or {}).get("model_type"))
        if recipe.tokens is not None:
            if requant is not None:
                raise MismatchError(f"{name}: trainable tokens on an FP8 tensor cannot be merged; merge with "
                                    f"dtype='bfloat16' to write it unquantized")
            _check_tokens(name, shape, recipe.tokens)
        source_round = (dtype if source.in_adapter and source.entry.dtype != dtype and dtype in FLOATS
                        else None)
        kind = _kind(recipe, source.entry.dtype != out_dtype or dequant is not None or packed is not None, requant)
        return TensorOp(name, shard, kind, out_dtype, shape, source,
                        self._block_rows(rows, cols, dequant or requant, packed), (rows, cols),
                        not self.options.allow_nonfinite, dequant, source_round, recipe.pair, recipe.part, transpose,
                        round_delta, _batchable(kind, recipe, source, out_dtype) and packed is None, recipe.tokens,
                        requant, packed=packed)

    def conversions(self, ops: dict[str, TensorOp]) -> dict[str, TensorOp]:
        """With an output dtype: an op for every other tensor that changes, a float tensor stored in another
        dtype or an FP8 tensor to dequantize. Integer tensors stay as they are.

        Raises:
            OptionError: a quantized tensor that cannot be converted.
        """
        dtype = self.options.dtype
        if dtype is None:
            return {}
        if self.quant.method is not None and not self.quant.fp8 and not self.quant.bnb4:
            raise OptionError(f"{dtype_name(dtype)} cannot convert {self.base.root}, a checkpoint quantized "
                              f"with quant_method {self.quant.method!r}; only block-wise FP8 (\"fp8\") and "
                              f"bitsandbytes 4-bit bases can be dequantized", option="dtype")
        dropped, converted = set(self.dropped()), {}
        for name, entry in self.entries.items():
            if name in ops or name in dropped:
                continue
            if name in self.packed:
                converted[name] = self._dequantized(name, self.packed[name], dtype)
                continue
            if entry.dtype == dtype:
                continue
            dequant = self.scales.get(name)
            if dequant is None and entry.dtype not in FLOATS:
                if entry.dtype in NARROW_FLOATS:
                    raise OptionError(f"{self.where[name][0].path}: {name} is {entry.dtype} without a block scale; "
                                      f"{dtype_name(dtype)} can only be made from FP8 weights that have a "
                                      f"{scale_name(name).rsplit('.', 1)[-1]} (quant_method \"fp8\")",
                                      option="dtype")
                continue  # integers (position ids, masks) are not floats to convert
            rows, cols = as_matrix(entry.shape)
            converted[name] = TensorOp(name, self.base.weight_map[name], OpKind.CONVERT, dtype, entry.shape,
                                       Source(*self.where[name], False), self._block_rows(rows, cols, dequant),
                                       check_finite=not self.options.allow_nonfinite, matrix=(rows, cols),
                                       dequant=dequant)
        return converted

    def scale_ops(self, ops: dict[str, TensorOp]) -> dict[str, TensorOp]:
        """For every requantized FP8 weight, the op that writes its new block scales."""
        made = {}
        for op in ops.values():
            if op.kind is not OpKind.REQUANT:
                continue
            scale = op.requant.source
            shape = scale.entry.shape
            made[scale.entry.name] = TensorOp(scale.entry.name, self.base.weight_map[scale.entry.name], OpKind.SCALES,
                                              scale.entry.dtype, shape, scale, shape[0], matrix=(shape[0], shape[1]),
                                              check_finite=op.check_finite, scales_of=op)
        return made

    def dropped(self) -> list[str]:
        """The block scales a dequantized output no longer needs, and a 4-bit base's absmax, quant_map, ..."""
        if self.options.dtype is None:
            return []
        return [scale.name for scale in self.scales.values()] + list(self.companions)

    def _dequantized(self, name: str, packed: PackedWeight, dtype: str) -> TensorOp:
        """A bitsandbytes 4-bit weight no adapter touches: its values, in `dtype`."""
        shape = packed.state.shape
        rows, cols = as_matrix(shape)
        return TensorOp(name, self.base.weight_map[name], OpKind.CONVERT, dtype, shape, packed.source,
                        self._block_rows(rows, cols, None, packed), matrix=(rows, cols),
                        check_finite=not self.options.allow_nonfinite, packed=packed)

    def _block_rows(self, rows: int, cols: int, scale: BlockScale | None, packed: PackedWeight | None = None
                    ) -> int:
        """Rows per block: `block_bytes` of fp32; for FP8, whole rows of scale blocks; for a 4-bit weight, a
        multiple of the rows that hold whole absmax blocks (each block then starts on a block and a byte)."""
        block_rows = max(1, min(rows, self.options.block_bytes // max(4 * cols, 1)))
        if packed is not None:
            step = packed.state.blocksize // math.gcd(cols, packed.state.blocksize)
            return min(max(step, block_rows // step * step), -(-rows // step) * step)
        if scale is None:
            return block_rows
        step = scale.block[0]
        return min(max(step, block_rows // step * step), -(-rows // step) * step)


def _kind(recipe: Recipe, converts: bool, requant: BlockScale | None) -> OpKind:
    """What the op made from `recipe` does. `converts`: the source's values change dtype (or are
    dequantized); `requant`: the output is FP8, requantized with this block scale."""
    if requant is not None:
        return OpKind.REQUANT
    if recipe.pair is not None:
        return OpKind.BIAS if recipe.part == Part.BIAS else OpKind.MERGE
    if recipe.tokens is not None:
        return OpKind.TOKENS
    return OpKind.CONVERT if converts else OpKind.COPY


def _batchable(kind: OpKind, recipe: Recipe, source: Source, dtype: str) -> bool:
    """A small tensor of one expert that takes a slice of a fused-expert LoRA, kept in its dtype and not
    merged in float64 (`TensorOp.wide`, fp32 outputs): it can be merged in one batched product with the
    experts stored after it (`pieces.shard_runs`)."""
    return (kind is OpKind.MERGE and recipe.pair.kind == Kind.EXPERTS and recipe.pair.expert is not None
            and not isinstance(recipe.pair, SumPair)
            and recipe.tokens is None and source.entry.dtype == dtype != "F32"
            and source.entry.nbytes <= BATCH_TENSOR_BYTES)


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view every op streams: rows of the last dimension (a 3-D expert stack is E·d1 rows)."""
    if len(shape) < 2:
        return 1, max(math.prod(shape), 1)
    return math.prod(shape[:-1]), shape[-1]


def matrix_view(shape: tuple[int, ...], pair: Pair | None, part: Part) -> tuple[int, int]:
    """`as_matrix`, except for a convolution weight (out, in, *kernel) that takes a LoRA delta: it is
    streamed as the matrix (out, in·prod(kernel)) it is in memory, whose product B @ A is the delta and
    whose rows are the filters DoRA normalises, so a row block holds whole filters."""
    if pair is not None and pair.kind == Kind.CONV and part == Part.WEIGHT:
        return shape[0], math.prod(shape[1:])
    return as_matrix(shape)


def _peft_rounds_delta(pair: Pair, config: dict) -> bool:
    """Whether PEFT rounds ΔW to W's dtype before adding it: for embedding LoRA, target_parameters and
    MiCA (init_lora_weights="mica"); Linear and convolution LoRA add the fp32 delta, rounding once, and
    DoRA rounds its product once."""
    if isinstance(pair, SumPair):
        return any(_peft_rounds_delta(term.pair, term.adapter.config) for term in pair.terms)
    if pair.magnitude is not None:
        return False
    return pair.kind in (Kind.EMBEDDING, Kind.EXPERTS) or config.get("init_lora_weights") == "mica"


def _check_replacement(name: str, existing: TensorEntry | None, source: Source, dtype: str) -> None:
    if not source.in_adapter or existing is None:
        return
    entry = source.entry
    if entry.dtype != dtype and not (entry.dtype in MERGEABLE_FLOATS and dtype in MERGEABLE_FLOATS):
        raise MismatchError(f"{name}: adapter tensor {entry.name!r} is {entry.dtype} but the base tensor is "
                            f"{dtype}; only float tensors can be converted")
    if len(entry.shape) != len(existing.shape) or entry.shape[1:] != existing.shape[1:]:
        raise MismatchError(f"{name}: adapter tensor {entry.name!r} has shape {list(entry.shape)}, the base has "
                            f"{list(existing.shape)}; only the row count (vocabulary) may change")


def _check_pairs(name: str, dtype: str, shape: tuple[int, ...], pair: Pair, part: Part, model_type: str | None
                 ) -> bool:
    """`_check_pair` for a pair, or for each term of a sum, the error naming that term's adapter."""
    if not isinstance(pair, SumPair):
        return _check_pair(name, dtype, shape, pair, part, model_type)
    for term in pair.terms:
        try:
            transpose = _check_pair(name, dtype, shape, term.pair, part, model_type)
        except MismatchError as e:
            raise MismatchError(f"{term.adapter.file.path}: {e}") from e
    return transpose


def _check_pair(name: str, dtype: str, shape: tuple[int, ...], pair: Pair, part: Part, model_type: str | None
                ) -> bool:
    """Check the factors fit tensor `name`; return whether the delta is transposed."""
    if dtype not in MERGEABLE_FLOATS:
        raise MismatchError(f"{name}: base dtype {dtype} cannot take a LoRA delta; expected BF16, F16 or F32")
    if pair.kind == Kind.EXPERTS:
        return pair.transposed  # shapes were matched when the expert LoRA was assigned
    if part == Part.BIAS:
        if shape != (pair.b.shape[0],) or pair.bias.shape != (pair.b.shape[0],):
            raise MismatchError(f"{name}: bias shape {list(shape)} does not fit {pair.bias.name!r} "
                                f"{list(pair.bias.shape)}")
        return False
    if pair.kind == Kind.CONV:
        _check_conv(name, shape, pair)
        return False
    out, inp = pair.b.shape[0], pair.a.shape[1]
    straight, transposed = shape == (out, inp), shape == (inp, out)
    if pair.kind == Kind.EMBEDDING:
        straight = False
    elif straight and transposed:  # square: shapes cannot tell, the architecture does (PEFT forces it per module)
        straight = model_type not in CONV1D_MODEL_TYPES
    if not (straight or transposed):
        want = [inp, out] if pair.kind == Kind.EMBEDDING else [out, inp]
        raise MismatchError(f"{name}: shape {list(shape)} does not fit lora_B {list(pair.b.shape)} @ lora_A "
                            f"{list(pair.a.shape)} (expected {want}); is the adapter for another model?")
    if pair.magnitude is not None:
        size = shape[1] if not straight else shape[0]
        if pair.magnitude.shape != (size,):
            raise MismatchError(f"{name}: DoRA magnitude {pair.magnitude.name!r} has shape "
                                f"{list(pair.magnitude.shape)}, expected [{size}]")
    return not straight


def _check_conv(name: str, shape: tuple[int, ...], pair: Pair) -> None:
    """A convolution weight is (out, in, *kernel), lora_A (r, in, *kernel), lora_B (out, r, 1, ...), and
    DoRA's magnitude (1, out, 1, ...)."""
    want = (pair.b.shape[0], *pair.a.shape[1:])
    if shape != want:
        raise MismatchError(f"{name}: shape {list(shape)} does not fit the convolution LoRA lora_B "
                            f"{list(pair.b.shape)}, lora_A {list(pair.a.shape)} (expected {list(want)}); is the "
                            f"adapter for another model?")
    if pair.magnitude is not None and pair.magnitude.shape != (1, shape[0], *[1] * (len(shape) - 2)):
        raise MismatchError(f"{name}: DoRA magnitude {pair.magnitude.name!r} has shape "
                            f"{list(pair.magnitude.shape)}, expected {[1, shape[0], *[1] * (len(shape) - 2)]}")


def _check_tokens(name: str, shape: tuple[int, ...], rows: TokenRows) -> None:
    bad = next((i for i in rows.indices if not 0 <= i < shape[0]), None)
    if bad is not None:
        raise MismatchError(f"{name}: trainable token id {bad} is outside the {shape[0]} rows of the tensor")
    if len(shape) != 2 or rows.values.shape[1:] != shape[1:]:
        raise MismatchError(f"{name}: {rows.values.name!r} has shape {list(rows.values.shape)}, rows of "
                            f"{list(shape[1:])} expected")


def _output_config(base: Checkpoint, ops: dict[str, TensorOp], entries: dict[str, TensorEntry],
                   tie_info: ties.TieInfo, *, untied: bool, dtype: str | None, dequantized: bool) -> dict | None:
    config = base.config
    if config is None:
        return None
    updates: dict[str, object] = {}
    embed = ops.get(tie_info.embed) if tie_info.embed else None
    head = ops.get(tie_info.head) if tie_info.head else None
    if embed is not None and head is not None and embed.shape[0] != head.shape[0]:
        raise MismatchError(f"the merged {tie_info.embed} has {embed.shape[0]} rows but {tie_info.head} has "
                            f"{head.shape[0]}; the adapter resized one and not the other")
    if embed is not None and head is None and tie_info.head in entries and not tie_info.tied \
            and entries[tie_info.head].shape[0] != embed.shape[0]:
        raise MismatchError(f"the adapter resizes {tie_info.embed} to {embed.shape[0]} rows but carries no "
                            f"{tie_info.head} (it has {entries[tie_info.head].shape[0]}); PEFT does not save a "
                            f"resized lm_head with embedding LoRA — add it with modules_to_save")
    if embed is not None and config.get("vocab_size") not in (None, embed.shape[0]):
        updates["vocab_size"] = embed.shape[0]
    if untied:
        updates["tie_word_embeddings"] = False
    if dtype is not None:
        name = dtype_name(dtype)
        keys = [k for k in CONFIG_DTYPE_KEYS if k in config] or [CONFIG_DTYPE_KEYS[0]]
        updates.update({k: name for k in keys if config.get(k) != name})
    if not updates and not dequantized:
        return None
    new = _apply_config(config, updates)
    if dequantized:
        new.pop("quantization_config", None)
    return new


def _apply_config(config: dict, updates: dict) -> dict:
    new = {**config, **updates}
    if isinstance(config.get("text_config"), dict):
        new["text_config"] = {**config["text_config"], **updates}
    return new


def _layout(base: Checkpoint, ops: dict[str, TensorOp], added: dict[str, str], dropped: list[str],
            where: dict[str, tuple[TensorFile, TensorEntry]], max_shard_size: int | None
            ) -> tuple[tuple[ShardPlan, ...], str | None]:
    """The output shards and the index file name: each base shard's tensors (new ones after
    `added[name]`, `dropped` ones left out) in the base's layout, or re-sharded by `max_shard_size`."""
    gone = set(dropped)
    late = frozenset(name for name, op in ops.items() if op.kind is OpKind.SCALES)
    slots: list[tuple[TensorFile, list[PendingEntry] | None]] = []
    for source in base.shards:
        names = [e.name for e in source.entries]
        for new, after in added.items():
            if after in names:
                names.insert(names.index(after) + 1, new)
        changed = [n for n in names if n in ops or n in gone]
        if max_shard_size is None and len(names) == len(source.entries) and all(
                n not in gone and n not in late and _keeps_layout(ops[n], where[n][1]) for n in changed):
            slots.append((source, None))  # every tensor keeps its dtype and shape: the base's entries and header
            continue
        slots.append((source, [PendingEntry(n, ops[n].dtype, ops[n].shape, source) if n in ops
                               else PendingEntry(n, where[n][1].dtype, where[n][1].shape, source)
                               for n in names if n not in gone]))
    if max_shard_size is None:
        files = layout.base_layout(slots, late)
    else:
        files = layout.resharded_layout([s for _, group in slots for s in group], max_shard_size, late)
    shards = tuple(ShardPlan(f.name, f.origin, f.entries, f.header,
                             {e.name: ops[e.name] for e in f.entries if e.name in ops}, where) for f in files)
    return shards, layout.index_name(base.index_name, files, max_shard_size is not None)


def _keeps_layout(op: TensorOp, entry: TensorEntry) -> bool:
    return op.dtype == entry.dtype and op.shape == entry.shape


def _ops_in_order(shard: ShardPlan) -> list[TensorOp]:
    return [shard.ops[e.name] for e in shard.entries if e.name in shard.ops]
