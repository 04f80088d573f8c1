"""Decide everything before the first byte is written: which tensor merges with which factors, how,
into which output file, with which header — from headers and JSON only, no tensor data.

Every adapter module must land on exactly one base tensor with fitting shapes, or planning fails.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .adapter import PREFIX, Adapter, LoraPair
from .checkpoint import Checkpoint
from .errors import MismatchError
from .tensorfile import DTYPE_BITS, FLOAT_DTYPES, TensorEntry, TensorFile, encode_header

# Architectures whose adapted layers are GPT-2 style Conv1D, storing W as (in, out) (spec §3.2).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
DEFAULT_BLOCK_BYTES = 8 << 20  # fp32 bytes of W per row block
# Resident size of the interpreter with torch, numpy and tqdm imported, measured on Linux x86-64.
RUNTIME_BYTES = 256 << 20
RING_SIZE = 2  # merged row blocks alive at once: one being written while the next is computed


@dataclass(frozen=True, slots=True)
class PlannedMerge:
    """One base tensor `name` that receives `scale * B @ A` (transposed when `transpose`)."""

    name: str
    shard: str
    pair: LoraPair
    transpose: bool
    block_rows: int

    @property
    def rank(self) -> int:
        return self.pair.rank

    @property
    def scale(self) -> float:
        return self.pair.scale


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One output file: the source shard, its output name and header, and the merges inside it."""

    source: TensorFile
    name: str
    header: bytes
    merges: dict[str, PlannedMerge]

    @property
    def size(self) -> int:
        return len(self.header) + (self.source.size - self.source.data_offset)


@dataclass(frozen=True, slots=True)
class MergePlan:
    """The complete, validated plan of a merge. Produced by `plan_merge`, executed by `merge_shards`."""

    base: Checkpoint
    adapter: Adapter
    shards: tuple[ShardPlan, ...]
    merges: tuple[PlannedMerge, ...]
    copied: int
    output_bytes: int
    predicted_peak_bytes: int

    @property
    def total_size(self) -> int:
        """Tensor payload bytes, as the HF index's `metadata.total_size` counts them."""
        return sum(s.source.size - s.source.data_offset for s in self.shards)

    def index_document(self) -> dict:
        """The HF index of the output: the base's metadata with `total_size`, and the full weight map."""
        metadata = {**self.base.index_metadata, "total_size": self.total_size}
        return {"metadata": metadata, "weight_map": dict(self.base.weight_map)}

    def render(self, detail: bool = False) -> str:
        """A human-readable report: what happens to each tensor, totals, and predicted peak memory."""
        return "\n".join(_render_lines(self, detail))


def make_plan(base: Checkpoint, adapter: Adapter, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> MergePlan:
    """Map every adapter pair to its base tensor, check shapes and dtypes, and lay out the output.

    Raises:
        MismatchError: a module lands on no base tensor, or shapes/dtypes do not fit.
    """
    entries = base.entries()
    model_type = (base.config or {}).get("model_type")
    merges = [_plan_merge(pair, entries, base.weight_map, model_type, adapter.file.path, block_bytes)
              for pair in adapter.pairs]
    by_shard: dict[str, dict[str, PlannedMerge]] = {s.path.name: {} for s in base.shards}
    for m in merges:
        by_shard[m.shard][m.name] = m
    shards = tuple(_shard_plan(s, by_shard[s.path.name]) for s in base.shards)
    merges_in_order = tuple(m for s in shards for m in _in_data_order(s))
    plan = MergePlan(base=base, adapter=adapter, shards=shards, merges=merges_in_order,
                     copied=len(entries) - len(merges), output_bytes=0,
                     predicted_peak_bytes=_predict_peak(merges_in_order, entries))
    index = len(json.dumps(plan.index_document(), indent=2)) + 1 if base.index_name else 0
    side = sum(p.stat().st_size for p in base.side_files)
    return dataclasses.replace(plan, output_bytes=sum(s.size for s in shards) + side + index)


def _plan_merge(pair: LoraPair, entries: dict[str, TensorEntry], weight_map: dict[str, str],
                model_type: str | None, adapter_path: Path, block_bytes: int) -> PlannedMerge:
    target = f"{pair.module}.weight"
    w = entries.get(target)
    if w is None:
        near = difflib.get_close_matches(target, entries, n=3, cutoff=0.5)
        hint = f"nearest base tensors: {', '.join(near)}" if near else "no base tensor has a similar name"
        raise MismatchError(f"{adapter_path}: {PREFIX}{pair.module}.lora_A.weight targets {target!r}, which is "
                            f"not in the base model ({hint})")
    if w.dtype not in FLOAT_DTYPES:
        raise MismatchError(f"{target}: base dtype {w.dtype} cannot take a LoRA delta; expected BF16, F16 or F32")
    transpose = _orientation(pair, w, model_type)
    rows = w.shape[0] if w.shape else 1
    row_f32 = 4 * math.prod(w.shape[1:])
    return PlannedMerge(target, weight_map[target], pair, transpose, max(1, min(rows, block_bytes // max(row_f32, 1))))


def _orientation(pair: LoraPair, w: TensorEntry, model_type: str | None) -> bool:
    """True when the delta must be transposed: W is stored (in, out), as GPT-2's Conv1D does."""
    out, inp = pair.b.shape[0], pair.a.shape[1]
    straight, transposed = w.shape == (out, inp), w.shape == (inp, out)
    if straight and transposed:  # square: shapes cannot tell, the architecture does (PEFT forces it per module)
        return model_type in CONV1D_MODEL_TYPES
    if straight or transposed:
        return transposed
    raise MismatchError(f"{w.name}: base shape {list(w.shape)} does not fit lora_B {list(pair.b.shape)} @ "
                        f"lora_A {list(pair.a.shape)} (expected [{out}, {inp}]); is the adapter for another model?")


def _shard_plan(source: TensorFile, merges: dict[str, PlannedMerge]) -> ShardPlan:
    metadata = dict(source.metadata or {})
    metadata["format"] = "pt"
    header = encode_header(source.entries, metadata, pad_to=source.data_offset - 8)
    return ShardPlan(source, source.path.name, header, merges)


def _in_data_order(shard: ShardPlan) -> list[PlannedMerge]:
    return [shard.merges[e.name] for e in shard.source.entries if e.name in shard.merges]


def _predict_peak(merges: tuple[PlannedMerge, ...], entries: dict[str, TensorEntry]) -> int:
    """Runtime + the largest merge's working set (compute.Workspace): the factors, raw and in fp32; a read
    buffer and RING_SIZE output buffers per row block; two fp32 sub-block scratch buffers (<= 2 x 1 MiB
    unless one row is larger)."""
    worst = 0
    for m in merges:
        w = entries[m.name]
        row_elems = math.prod(w.shape[1:])
        factors = 3 * 4 * (math.prod(m.pair.a.shape) + math.prod(m.pair.b.shape))
        scratch = 2 * max(1 << 20, 4 * row_elems)
        worst = max(worst, factors + (1 + RING_SIZE) * m.block_rows * w.row_bytes + scratch)
    return RUNTIME_BYTES + worst


def _render_lines(plan: MergePlan, detail: bool):
    base, adapter = plan.base, plan.adapter
    n_tensors = sum(len(s.source.entries) for s in plan.shards)
    yield f"base:    {base.root}  ({len(plan.shards)} shard(s), {n_tensors} tensors, {_gb(plan.total_size)})"
    yield (f"adapter: {adapter.root}  (LoRA r={adapter.config['r']} alpha={adapter.config['lora_alpha']}"
           f"{' rsLoRA' if adapter.config.get('use_rslora') else ''}, {len(adapter.pairs)} modules)")
    for shard in plan.shards:
        for e in shard.source.entries:
            m = shard.merges.get(e.name)
            if m is not None:
                t = " transposed" if m.transpose else ""
                yield f"  merge  {e.name}  r={m.rank} scale={m.scale:.6g}{t}  [{shard.name}]"
            elif detail:
                yield f"  copy   {e.name}  [{shard.name}]"
    groups = Counter((m.rank, round(m.scale, 9)) for m in plan.merges)
    summary = ", ".join(f"{n} at r={r} scale={s:.6g}" for (r, s), n in sorted(groups.items()))
    yield f"merged:  {len(plan.merges)} tensors ({summary or 'none'})"
    yield f"copied:  {plan.copied} tensors byte-for-byte"
    files = len(plan.shards) + len(base.side_files) + (1 if base.index_name else 0)
    yield f"output:  {_gb(plan.output_bytes)} in {files} files ({', '.join(p.name for p in base.side_files) or 'no side files'})"
    if base.skipped:
        yield f"not copied: {', '.join(base.skipped)} (other weight formats or folders)"
    yield f"predicted peak memory: {plan.predicted_peak_bytes / 2**20:.0f} MiB"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"
