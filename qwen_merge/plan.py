"""Decide everything before the first byte is written: which tensor merges with which factors, how,
into which output file, with which header — from headers and JSON only, no tensor data.

Every adapter module must land on exactly one base tensor with fitting shapes, or planning fails.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy
from collections import Counter
from dataclasses import dataclass

from . import experts, ties
from .adapter import PREFIX, Adapter, LoraPair, TokenRows, settle_parameters, targeted_parameters, targets_module
from .architectures import is_module_in_memory
from .checkpoint import Checkpoint
from .errors import AdapterError, MismatchError
from .names import NameMap, resolve_names
from .tensorfile import DTYPE_BITS, FLOAT_DTYPES, TensorEntry, TensorFile, encode_header
from .units import human_bytes

# Architectures whose adapted layers are GPT-2 style Conv1D, storing W as (in, out); PEFT forces
# fan_in_fan_out per module for them, whatever the saved config says.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
DEFAULT_BLOCK_BYTES = 8 << 20  # fp32 bytes of W per row block
# Resident size of the interpreter with torch, numpy and tqdm imported, measured on Linux x86-64.
RUNTIME_BYTES = 256 << 20
THREADS_BYTES = 16 << 20  # the writer and finisher threads: stacks, heap arenas, the hashing buffer
RING_SIZE = 2  # merged row blocks alive at once: one being written while the next is computed
ROUNDINGS = ("single", "peft")


@dataclass(frozen=True, slots=True)
class Operand:
    """An input tensor: which file (a base shard or the adapter) and where in it."""

    file: TensorFile
    entry: TensorEntry
    in_adapter: bool


@dataclass(frozen=True, slots=True)
class TensorOp:
    """How one output tensor is made when it is not a byte copy of the base tensor of the same name.

    Start from `source` (the base tensor, another base tensor for a new untied lm_head, or an adapter
    tensor that replaces it), round it to `dtype` if it is stored in another one, add the LoRA delta of
    `pair` (to the weight, or to the bias when `part == "bias"`; with DoRA when the pair has a
    magnitude), then overwrite the `tokens` rows. `round_delta`: the delta is rounded to `dtype` before it
    is added, as PEFT's merge does for this kind of layer (only with rounding="peft")."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    source: Operand
    block_rows: int
    pair: LoraPair | None = None
    part: str = "weight"
    transpose: bool = False
    tokens: TokenRows | None = None
    rounding: str = "single"
    check_finite: bool = True
    round_delta: bool = False

    @property
    def matrix(self) -> tuple[int, int]:
        """The (rows, columns) view of the tensor that is streamed in row blocks."""
        return matrix_view(self.shape, self.pair, self.part)

    @property
    def rank(self) -> int | None:
        return self.pair.rank if self.pair else None

    @property
    def scale(self) -> float | None:
        return self.pair.scale if self.pair else None

    @property
    def is_raw_copy(self) -> bool:
        """Bytes can be copied as they are from the source (a same-dtype replacement)."""
        return self.pair is None and self.tokens is None and self.source.entry.dtype == self.dtype


PlannedMerge = TensorOp  # the name the first release exported


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One output file: its name, the base shard it is made from, its entries (with output offsets) and
    header, and the ops of the tensors that are not byte copies of the base."""

    name: str
    source: TensorFile
    entries: tuple[TensorEntry, ...]
    header: bytes
    ops: dict[str, TensorOp]

    @property
    def size(self) -> int:
        return len(self.header) + (self.entries[-1].end if self.entries else 0)


@dataclass(frozen=True, slots=True)
class MergePlan:
    """The complete, validated plan of a merge. Produced by `plan_merge`, executed by `merge_shards`.

    `merges` are the tensors that receive a LoRA delta; `ops` every tensor that is not a byte copy;
    `config` the output config.json when it must differ from the base's (vocab size, tying), else None;
    `renames` the prefix renames applied to adapter names; `tie` what was decided for tied embeddings."""

    base: Checkpoint
    adapter: Adapter
    shards: tuple[ShardPlan, ...]
    ops: tuple[TensorOp, ...]
    copied: int
    config: dict | None
    renames: tuple[tuple[str, str], ...]
    tie: str | None
    rounding: str
    output_bytes: int = 0
    predicted_peak_bytes: int = 0

    @property
    def merges(self) -> tuple[TensorOp, ...]:
        return tuple(op for op in self.ops if op.pair is not None)

    @property
    def total_size(self) -> int:
        """Tensor payload bytes, as the HF index's `metadata.total_size` counts them."""
        return sum(s.entries[-1].end for s in self.shards if s.entries)

    def index_document(self) -> dict:
        """The HF index of the output: the base's metadata with `total_size`, and the full weight map."""
        metadata = {**self.base.index_metadata, "total_size": self.total_size}
        return {"metadata": metadata, "weight_map": {e.name: s.name for s in self.shards for e in s.entries}}

    def render(self, detail: bool = False) -> str:
        """A human-readable report: what happens to each tensor, totals, and predicted peak memory."""
        return "\n".join(_render_lines(self, detail))


@dataclass(frozen=True, slots=True)
class _Intent:
    """What the adapter asks of one on-disk tensor."""

    replacement: TensorEntry | None = None
    pair: LoraPair | None = None
    part: str = "weight"
    tokens: TokenRows | None = None


def make_plan(base: Checkpoint, adapter: Adapter, *, block_bytes: int = DEFAULT_BLOCK_BYTES,
              rounding: str = "single", key_map: dict[str, str] | None = None,
              allow_nonfinite: bool = False) -> MergePlan:
    """Map every adapter tensor to the output tensor it changes, check shapes and dtypes, decide tied
    embeddings and vocabulary size, and lay out the output — from headers and JSON only.

    Raises:
        MismatchError: an adapter tensor lands nowhere, or shapes/dtypes do not fit.
        AdapterError: the config asks for something the file cannot provide.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    entries = base.entries()
    tie_info = ties.TieInfo.of(base.config, entries)
    holds = experts.HeldParameters(entries)
    modules = holds.modules()
    _refuse_multihead_attention(adapter, entries)
    wanted = _wanted(adapter)
    names = resolve_names(wanted, lambda name: name in entries or name in modules, key_map, base.config,
                          optional=tie_info.may_create, base_names=entries,
                          describe=lambda target: f"{adapter.file.path}: {wanted[target]}")
    adapter = settle_parameters(adapter, lambda module: holds(names(module)))
    intents = _intents(adapter, names)
    for name, intent in experts.expert_intents(adapter, names, entries, holds).items():
        if name in intents:
            raise AdapterError(f"{adapter.file.path}: {name!r} gets both a per-module LoRA and a target_parameters "
                               f"LoRA; PEFT applies one adapter kind per module")
        intents[name] = _Intent(pair=intent)
    _check_untrained_targets(adapter, names, entries, holds, base.config)
    where = base.locations()
    recipes = {n: ties.Recipe(_source(where, adapter, n, i), i.pair, i.part, i.tokens) for n, i in intents.items()}
    recipes, added, tie = ties.decide(tie_info, recipes, adapter.config,
                                      lambda name: _source(where, adapter, name, _Intent()),
                                      lambda x, y, transposed: _same_values(adapter.file, x, y, transposed))
    ctx = _Context(base, adapter, entries, block_bytes, rounding, not allow_nonfinite)
    try:
        ops = {name: ctx.op(name, recipe) for name, recipe in recipes.items()}
    except MismatchError as e:  # the checks speak of tensors; name the adapter they come from too
        raise MismatchError(f"{adapter.file.path}: {e}") from None
    config = _output_config(base, ops, entries, tie_info, untied=bool(tie and "untied" in tie))
    shards = _layout(base, ops, added)
    plan = MergePlan(base, adapter, shards, tuple(op for s in shards for op in _ops_in_order(s)),
                     copied=sum(len(s.entries) - len(s.ops) for s in shards), config=config,
                     renames=names.renames, tie=tie, rounding=rounding)
    return dataclasses.replace(plan, output_bytes=_output_bytes(plan),
                               predicted_peak_bytes=_predict_peak(plan.ops))


def _refuse_multihead_attention(adapter: Adapter, entries: dict[str, TensorEntry]) -> None:
    """LoRA on an nn.MultiheadAttention lands on its `in_proj_weight` (and on `out_proj`, which the adapter
    check refuses); a renamed Linear merge of it would be wrong, so no rename may be suggested for it."""
    for pair in adapter.pairs:
        if f"{pair.module}.weight" not in entries and f"{pair.module}.in_proj_weight" in entries:
            raise AdapterError(f"{adapter.file.path}: {pair.a.name!r}: module {pair.module!r} is an "
                               f"nn.MultiheadAttention (the base has {pair.module}.in_proj_weight); LoRA on it is "
                               f"not supported, serve it as an adapter")


def _wanted(adapter: Adapter) -> dict[str, str]:
    """In-model target name -> the adapter key behind it (for messages)."""
    wanted = {t: PREFIX + e.name[len(PREFIX):] for t, e in adapter.replacements.items()}
    for pair in adapter.pairs:
        wanted[f"{pair.module}.weight"] = pair.a.name
        if pair.bias is not None:
            wanted[f"{pair.module}.bias"] = pair.bias.name
    for rows in adapter.tokens:
        wanted[f"{rows.module}.weight"] = rows.values.name
    # Modules owning targeted parameters (or that might): the module must exist, whatever it holds.
    for pp in adapter.param_pairs:
        wanted[pp.module] = pp.a.name
    for module, parts in adapter.undecided.items():
        wanted[module] = next(iter(parts.values())).name
    return wanted


def _intents(adapter: Adapter, names: NameMap) -> dict[str, _Intent]:
    intents: dict[str, _Intent] = {}

    def add(target: str, key: str, **fields) -> None:
        name = names(target)
        current = intents.get(name, _Intent())
        for field in fields.keys() - {"part"}:
            if getattr(current, field) is not None:
                raise AdapterError(f"{adapter.file.path}: {key!r} and another tensor both set the {field} of {name!r}")
        intents[name] = dataclasses.replace(current, **fields)

    for target, entry in adapter.replacements.items():
        add(target, entry.name, replacement=entry)
    for pair in adapter.pairs:
        add(f"{pair.module}.weight", pair.a.name, pair=pair)
        if pair.bias is not None:
            add(f"{pair.module}.bias", pair.bias.name, pair=pair, part="bias")
    for rows in adapter.tokens:
        add(f"{rows.module}.weight", rows.values.name, tokens=rows)
    for name, intent in intents.items():
        if intent.pair is not None and intent.tokens is not None:
            raise AdapterError(f"{adapter.file.path}: {name!r} has both a LoRA delta and trainable tokens; "
                               f"PEFT does not combine them on one module")
    return intents


def _source(where: dict[str, tuple[TensorFile, TensorEntry]], adapter: Adapter, name: str, intent: _Intent
            ) -> Operand | None:
    if intent.replacement is not None:
        return Operand(adapter.file, intent.replacement, True)
    if name not in where:
        return None
    return Operand(*where[name], False)


@dataclass(frozen=True, slots=True)
class _Context:
    base: Checkpoint
    adapter: Adapter
    entries: dict[str, TensorEntry]
    block_bytes: int
    rounding: str
    check_finite: bool

    def op(self, name: str, recipe: ties.Recipe) -> TensorOp:
        source = recipe.source
        existing = self.entries.get(name)
        dtype = (existing or source.entry).dtype
        _check_replacement(name, existing, source, dtype)
        shape = source.entry.shape
        rows, cols = matrix_view(shape, recipe.pair, recipe.part)
        block_rows = max(1, min(rows, self.block_bytes // max(4 * cols, 1)))
        shard = self.base.weight_map.get(name) or self.base.weight_map[recipe.shard_of]
        round_delta = (self.rounding == "peft" and recipe.pair is not None and recipe.part == "weight"
                       and _peft_rounds_delta(recipe.pair, self.adapter.config))
        op = TensorOp(name, shard, dtype, shape, source, block_rows, recipe.pair, recipe.part, False,
                      recipe.tokens, self.rounding, self.check_finite, round_delta)
        if recipe.pair is not None:
            op = dataclasses.replace(op, transpose=_check_pair(op, (self.base.config or {}).get("model_type")))
        if recipe.tokens is not None:
            _check_tokens(op)
        return op


def _same_values(file: TensorFile, x: TensorEntry, y: TensorEntry, transposed: bool) -> bool:
    """Whether two adapter tensors hold the same values (bit for bit), `y` read transposed. Reads their
    bytes: the one place planning looks at tensor data, for the tied-embedding signature."""
    if x.dtype != y.dtype or x.shape != (y.shape[::-1] if transposed else y.shape):
        return False
    if not transposed:
        return all(a == b for a, b in zip(_chunks(file, x), _chunks(file, y), strict=True))
    bits = {1: numpy.uint8, 2: numpy.uint16, 4: numpy.uint32, 8: numpy.uint64}[DTYPE_BITS[x.dtype] // 8]
    with open(file.path, "rb") as f:
        def read(e: TensorEntry) -> numpy.ndarray:
            f.seek(file.data_offset + e.start)
            return numpy.frombuffer(f.read(e.nbytes), dtype=bits).reshape(e.shape)
        return bool(numpy.array_equal(read(x), read(y).T))


def _chunks(file: TensorFile, e: TensorEntry, size: int = 16 << 20):
    with open(file.path, "rb") as f:
        for start in range(e.start, e.end, size):
            f.seek(file.data_offset + start)
            yield f.read(min(size, e.end - start))


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view every op streams: rows of the last dimension (a 3-D expert stack is E·d1 rows)."""
    if len(shape) < 2:
        return 1, max(math.prod(shape), 1)
    return math.prod(shape[:-1]), shape[-1]


def matrix_view(shape: tuple[int, ...], pair: LoraPair | None, part: str) -> tuple[int, int]:
    """`as_matrix`, except for a convolution weight (out, in, *kernel) that takes a LoRA delta: it is
    streamed as the matrix (out, in·prod(kernel)) it is in memory, whose product B @ A is the delta and
    whose rows are the filters DoRA normalises, so a row block holds whole filters."""
    if pair is not None and pair.kind == "conv" and part == "weight":
        return shape[0], math.prod(shape[1:])
    return as_matrix(shape)


def _peft_rounds_delta(pair: LoraPair, config: dict) -> bool:
    """Whether PEFT rounds ΔW to W's dtype before adding it: for embedding LoRA, target_parameters and
    MiCA (init_lora_weights="mica"); Linear and convolution LoRA add the fp32 delta, rounding once, and
    DoRA rounds its product once."""
    if pair.magnitude is not None:
        return False
    return pair.kind in ("embedding", "experts") or config.get("init_lora_weights") == "mica"


def _check_replacement(name: str, existing: TensorEntry | None, source: Operand, dtype: str) -> None:
    if not source.in_adapter or existing is None:
        return
    entry = source.entry
    if entry.dtype != dtype and not (entry.dtype in FLOAT_DTYPES and dtype in FLOAT_DTYPES):
        raise MismatchError(f"{name}: adapter tensor {entry.name!r} is {entry.dtype} but the base tensor is "
                            f"{dtype}; only float tensors can be converted")
    if len(entry.shape) != len(existing.shape) or entry.shape[1:] != existing.shape[1:]:
        raise MismatchError(f"{name}: adapter tensor {entry.name!r} has shape {list(entry.shape)}, the base has "
                            f"{list(existing.shape)}; only the row count (vocabulary) may change")


def _check_pair(op: TensorOp, model_type: str | None) -> bool:
    """Check the factors fit the tensor; return whether the delta is transposed."""
    pair, shape = op.pair, op.shape
    if op.dtype not in FLOAT_DTYPES:
        raise MismatchError(f"{op.name}: base dtype {op.dtype} cannot take a LoRA delta; expected BF16, F16 or F32")
    if pair.kind == "experts":
        return pair.transposed  # shapes were matched when the expert LoRA was assigned
    if op.part == "bias":
        if shape != (pair.b.shape[0],) or pair.bias.shape != (pair.b.shape[0],):
            raise MismatchError(f"{op.name}: bias shape {list(shape)} does not fit {pair.bias.name!r} "
                                f"{list(pair.bias.shape)}")
        return False
    if pair.kind == "conv":
        _check_conv(op)
        return False
    out, inp = pair.b.shape[0], pair.a.shape[1]
    straight, transposed = shape == (out, inp), shape == (inp, out)
    if pair.kind == "embedding":
        straight = False
    elif straight and transposed:  # square: shapes cannot tell, the architecture does (PEFT forces it per module)
        straight = model_type not in CONV1D_MODEL_TYPES
    if not (straight or transposed):
        want = [inp, out] if pair.kind == "embedding" else [out, inp]
        raise MismatchError(f"{op.name}: shape {list(shape)} does not fit lora_B {list(pair.b.shape)} @ lora_A "
                            f"{list(pair.a.shape)} (expected {want}); is the adapter for another model?")
    if pair.magnitude is not None:
        size = shape[1] if not straight else shape[0]
        if pair.magnitude.shape != (size,):
            raise MismatchError(f"{op.name}: DoRA magnitude {pair.magnitude.name!r} has shape "
                                f"{list(pair.magnitude.shape)}, expected [{size}]")
    return not straight


def _check_conv(op: TensorOp) -> None:
    """A convolution weight is (out, in, *kernel), lora_A (r, in, *kernel), lora_B (out, r, 1, ...), and
    DoRA's magnitude (1, out, 1, ...)."""
    pair, shape = op.pair, op.shape
    want = (pair.b.shape[0], *pair.a.shape[1:])
    if shape != want:
        raise MismatchError(f"{op.name}: shape {list(shape)} does not fit the convolution LoRA lora_B "
                            f"{list(pair.b.shape)}, lora_A {list(pair.a.shape)} (expected {list(want)}); is the "
                            f"adapter for another model?")
    if pair.magnitude is not None and pair.magnitude.shape != (1, shape[0], *[1] * (len(shape) - 2)):
        raise MismatchError(f"{op.name}: DoRA magnitude {pair.magnitude.name!r} has shape "
                            f"{list(pair.magnitude.shape)}, expected {[1, shape[0], *[1] * (len(shape) - 2)]}")


def _check_tokens(op: TensorOp) -> None:
    rows, shape = op.tokens, op.shape
    bad = next((i for i in rows.indices if not 0 <= i < shape[0]), None)
    if bad is not None:
        raise MismatchError(f"{op.name}: trainable token id {bad} is outside the {shape[0]} rows of the tensor")
    if len(shape) != 2 or rows.values.shape[1:] != shape[1:]:
        raise MismatchError(f"{op.name}: {rows.values.name!r} has shape {list(rows.values.shape)}, rows of "
                            f"{list(shape[1:])} expected")


def _check_untrained_targets(adapter: Adapter, names: NameMap, entries: dict[str, TensorEntry],
                             holds: experts.HeldParameters, base_config: dict | None) -> None:
    """PEFT injects by config: a targeted module without tensors in the file keeps its initialisation,
    which is a non-zero delta with init_lora_weights=false or DoRA. Refuse those.

    Which modules PEFT targets is decided the way PEFT decides it: on the model transformers builds in
    memory, so on-disk names are mapped back to in-model names, and tensors of modules that do not exist
    in memory (the per-expert layers of models whose experts transformers fuses) are not candidates."""
    config = adapter.config
    if config.get("init_lora_weights", True) is not False and not config.get("use_dora"):
        return
    trained = {names(p.module) for p in (*adapter.pairs, *adapter.param_pairs)}
    missing = sorted(m for m in holds.modules()
                     if m not in trained and _peft_targets(config, m, names.inverse(m), entries, holds, base_config))
    if missing:
        why = "init_lora_weights=false" if config.get("init_lora_weights", True) is False else "use_dora=true"
        raise AdapterError(f"{adapter.root / 'adapter_config.json'}: the config targets {missing[0]!r} "
                           f"({len(missing)} such modules) but the file has no factors for it; with {why} PEFT "
                           f"would add a random or non-zero delta there")


def _peft_targets(config: dict, disk: str, module: str, entries: dict[str, TensorEntry],
                  holds: experts.HeldParameters, base_config: dict | None) -> bool:
    """Whether PEFT wraps in-model `module` (stored as `disk`): a layer matched by target_modules, or a
    module owning a parameter matched by target_parameters."""
    weight = entries.get(f"{disk}.weight")
    if weight is not None and _is_layer(weight, config, base_config) and targets_module(config, module):
        return True
    return bool(set(targeted_parameters(config, module)) & holds(disk))


def _is_layer(weight: TensorEntry, config: dict, base_config: dict | None) -> bool:
    """A weight of a layer PEFT could wrap: at least 2-D (exactly 2-D for a literal "all-linear", which
    means Linear layers only), and of a module that exists in memory."""
    dims = len(weight.shape)
    wanted = dims == 2 if config.get("target_modules") == "all-linear" else dims >= 2
    return wanted and is_module_in_memory(weight.name, base_config)


def _output_config(base: Checkpoint, ops: dict[str, TensorOp], entries: dict[str, TensorEntry],
                   tie_info: ties.TieInfo, untied: bool) -> dict | None:
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
    if not updates:
        return None
    return _apply_config(config, updates)


def _apply_config(config: dict, updates: dict) -> dict:
    new = {**config, **updates}
    if isinstance(config.get("text_config"), dict):
        new["text_config"] = {**config["text_config"], **updates}
    return new


def _layout(base: Checkpoint, ops: dict[str, TensorOp], added: dict[str, str]) -> tuple[ShardPlan, ...]:
    """Output shards: the base's names and tensor assignment, new tensors placed after `added[name]`."""
    shards = []
    for source in base.shards:
        names = [e.name for e in source.entries]
        for new, after in added.items():
            if after in names:
                names.insert(names.index(after) + 1, new)
        shard_ops = {n: ops[n] for n in names if n in ops}
        own = source.entry_map()
        unchanged = len(names) == len(source.entries) and all(
            (op.shape, op.dtype) == (own[n].shape, own[n].dtype) for n, op in shard_ops.items())
        entries = source.entries if unchanged else _pack(names, shard_ops, own)
        metadata = {**(source.metadata or {}), "format": "pt"}
        header = encode_header(entries, metadata, pad_to=source.data_offset - 8 if unchanged else 0)
        shards.append(ShardPlan(source.path.name, source, tuple(entries), header, shard_ops))
    return tuple(shards)


def _pack(names: list[str], ops: dict[str, TensorOp], base: dict[str, TensorEntry]) -> list[TensorEntry]:
    """New offsets, in the reference writer's order (largest element first, then name) so every tensor
    stays aligned to its element size."""
    specs = [(n, ops[n].dtype, ops[n].shape) if n in ops else (n, base[n].dtype, base[n].shape) for n in names]
    specs.sort(key=lambda s: (-DTYPE_BITS[s[1]], s[0]))
    entries, offset = [], 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * DTYPE_BITS[dtype] // 8
        entries.append(TensorEntry(name, dtype, tuple(shape), offset, offset + size))
        offset += size
    return entries


def _ops_in_order(shard: ShardPlan) -> list[TensorOp]:
    return [shard.ops[e.name] for e in shard.entries if e.name in shard.ops]


def _output_bytes(plan: MergePlan) -> int:
    index = len(json.dumps(plan.index_document(), indent=2)) + 1 if plan.base.index_name else 0
    side = sum(p.stat().st_size for p in plan.base.side_files)
    return sum(s.size for s in plan.shards) + side + index


def _predict_peak(ops: tuple[TensorOp, ...]) -> int:
    """Runtime + the largest op's working set (compute.Workspace): the factors, raw and in fp32; a read
    buffer and RING_SIZE output buffers per row block; fp32 sub-block scratch (1 MiB each, unless a row is
    larger: the delta scratch holds at least two rows); token rows, and DoRA's norms."""
    worst = 0
    for op in ops:
        row_elems = op.matrix[1]
        row_bytes = row_elems * DTYPE_BITS[op.dtype] // 8
        extra = 3 * 4 * (math.prod(op.pair.a.shape) + math.prod(op.pair.b.shape)) if op.pair else 0
        extra += 2 * 4 * math.prod(op.tokens.values.shape) if op.tokens else 0
        extra += 16 * max(op.shape) if op.pair and op.pair.magnitude is not None else 0
        scratch = 3 * max(1 << 20, 8 * row_elems) + op.block_rows * row_elems  # + the finiteness mask
        worst = max(worst, extra + (1 + RING_SIZE) * op.block_rows * max(row_bytes, 1) + scratch)
    return RUNTIME_BYTES + THREADS_BYTES + worst


def _render_lines(plan: MergePlan, detail: bool):
    base, adapter = plan.base, plan.adapter
    n_tensors = sum(len(s.source.entries) for s in plan.shards)
    yield f"base:    {base.root}  ({len(plan.shards)} shard(s), {n_tensors} tensors, {human_bytes(plan.total_size)})"
    dora = " DoRA" if adapter.config.get("use_dora") else ""
    yield (f"adapter: {adapter.root}  (LoRA{dora} r={adapter.config['r']} alpha={adapter.config['lora_alpha']}"
           f"{' rsLoRA' if adapter.config.get('use_rslora') else ''}, {len(adapter.pairs)} modules"
           f"{f', {len(adapter.param_pairs)} target_parameters pairs' if adapter.param_pairs else ''})")
    for old, new in plan.renames:
        yield f"rename:  adapter names {old}* -> base names {new}*"
    yield from _tensor_lines(plan, detail)
    groups = Counter((m.rank, round(m.scale, 9)) for m in plan.merges)
    summary = ", ".join(f"{n} at r={r} scale={s:.6g}" for (r, s), n in sorted(groups.items()))
    yield f"merged:  {len(plan.merges)} tensors ({summary or 'none'})"
    others = len(plan.ops) - len(plan.merges)
    if others:
        yield f"other:   {others} tensors replaced, converted or with token rows set"
    yield f"copied:  {plan.copied} tensors byte-for-byte"
    if plan.tie:
        yield f"tied embeddings: {plan.tie}"
    if plan.config is not None:
        changed = {k: v for k, v in plan.config.items() if (base.config or {}).get(k) != v and k != "text_config"}
        yield f"config.json: {', '.join(f'{k}={v}' for k, v in changed.items())}"
    if plan.rounding != "single":
        yield f"rounding: {plan.rounding} (PEFT's double rounding for embedding LoRA, target_parameters and MiCA)"
    files = len(plan.shards) + len(base.side_files) + (1 if base.index_name else 0) + 1  # + the manifest
    sides = ", ".join(p.name for p in base.side_files) or "no side files"
    yield f"output:  {human_bytes(plan.output_bytes)} in {files} files (with {sides}, qwen_merge.json)"
    if base.skipped:
        yield f"not copied: {', '.join(base.skipped)} (other weight formats or folders)"
    if adapter.redundant:
        yield f"ignored: {len(adapter.redundant)} adapter tensors that duplicate modules_to_save copies"
    yield f"predicted peak memory: {plan.predicted_peak_bytes / 2**20:.0f} MiB"


EXPERT_INDEX = re.compile(r"\.(experts)\.\d+\.")


def _tensor_lines(plan: MergePlan, detail: bool):
    """One line per tensor; without `detail`, tensors that differ only in their expert index share a line
    (a 30B-A3B plan is 144 expert lines instead of 18,432) and copies are only counted."""
    if detail:
        for shard in plan.shards:
            for e in shard.entries:
                op = shard.ops.get(e.name)
                yield f"  {_describe(op) if op else 'copy     ' + e.name}  [{shard.name}]"
        return
    groups: dict[tuple[str, str], list[TensorOp]] = {}
    for op in plan.ops:
        pattern = EXPERT_INDEX.sub(r".\1.*.", op.name)
        groups.setdefault((pattern, _describe(op, pattern)), []).append(op)
    for (_, text), ops in groups.items():
        shards = sorted({op.shard for op in ops})
        count = f"  x{len(ops)} experts" if len(ops) > 1 else ""
        yield f"  {text}{count}  [{', '.join(shards)}]"


def _describe(op: TensorOp, name: str | None = None) -> str:
    parts = []
    if op.source.in_adapter or op.source.entry.name != op.name:
        parts.append(f"from {op.source.entry.name}")
    if op.source.entry.dtype != op.dtype:
        parts.append(f"{op.source.entry.dtype}->{op.dtype}")
    if op.pair is not None:
        what = "dora" if op.pair.magnitude is not None else "bias" if op.part == "bias" else op.pair.kind
        if what == "experts" and op.pair.experts == 1:
            what = f"parameter {op.pair.param}"
        if what == "dora" and op.pair.kind == "conv":
            what = "conv dora"
        t = " transposed" if op.transpose and op.pair.kind != "embedding" else ""
        parts.append(f"{what} r={op.rank} scale={op.scale:.6g}{t}")
        if op.round_delta:
            parts.append(f"delta rounded to {op.dtype} first (as PEFT)")
    if op.tokens is not None:
        parts.append(f"{len(op.tokens.indices)} token rows")
    verb = "merge   " if op.pair is not None else "replace " if op.source.in_adapter else "write   "
    return f"{verb} {name or op.name}  " + ", ".join(parts)
