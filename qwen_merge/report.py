"""The plan for people and for scripts: `render(plan)` is the text `qwen-merge plan` prints (what happens
to each tensor, totals, renames, the tie decision, the output size and the predicted peak memory);
`to_dict(plan)` is the JSON document `qwen-merge plan --json` prints (every tensor, the same totals)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .inputs.adapter import Adapter, Kind
from .inputs.checkpoint import HubOrigin
from .options import Rounding
from .planning.fetchplan import fetch_plan
from .planning.manifest import output_files
from .planning.plan import OpKind
from .planning.recipe import Part, SumPair
from .units import human_bytes
from .version import VERSION

if TYPE_CHECKING:  # for annotations only
    from .inputs.tensorfile import TensorEntry
    from .planning.gguflayout import GGUFLayout
    from .planning.plan import MergePlan, ShardPlan, TensorOp

EXPERT_INDEX = re.compile(r"\.(experts)\.\d+\.")


def render(plan: MergePlan, detail: bool = False) -> str:
    """The text `qwen-merge plan` prints: one line per merged or replaced tensor (with `detail`, per tensor
    of the output, copies included), the counts, the output's size and files, and the predicted peak memory."""
    return "\n".join(_lines(plan, detail))


def _where(root: Path, origin: HubOrigin | None) -> str:
    return str(root) if origin is None else f"{origin} (Hub, commit {origin.commit[:12]}; cache {root})"


def _download_lines(plan: MergePlan) -> Iterator[str]:
    fetch = fetch_plan(plan)
    if fetch is None:
        return
    yield (f"download: {len(fetch.order)} shard(s), {human_bytes(fetch.download_bytes)} "
           f"({human_bytes(fetch.cached_bytes)} already in the cache)")
    yield (f"disk:    output {human_bytes(plan.output_bytes)} + downloads {human_bytes(fetch.download_bytes)}; "
           f"with --low-disk output + {human_bytes(fetch.low_disk_bytes)} (each downloaded shard deleted once merged)")


def _lines(plan: MergePlan, detail: bool) -> Iterator[str]:
    base, adapter = plan.base, plan.adapter
    n_tensors = sum(len(s.entries) for s in base.shards)
    size = sum(s.entries[-1].end for s in base.shards if s.entries)
    yield f"base:    {_where(base.root, base.hub)}  ({len(base.shards)} shard(s), {n_tensors} tensors, {human_bytes(size)})"
    if plan.adapters:  # several, weighted: each with its number, which the tensor lines use
        for k, (one, weight) in enumerate(zip(plan.adapters, plan.weights), 1):
            yield f"adapter {k}: {_where(one.root, one.hub)}  ({_adapter_summary(one)}), weight {weight:g}"
        yield "sum:     W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ over the adapters that change a tensor, rounded once"
    else:
        yield f"adapter: {_where(adapter.root, adapter.hub)}  ({_adapter_summary(adapter)})"
    for note in plan.notes:
        yield f"note:    {note}"
    yield from _download_lines(plan)
    for old, new in plan.renames:
        yield f"rename:  adapter names {old}* -> base names {new}*"
    yield from _tensor_lines(plan, detail)
    if plan.adapters:  # several adapters: how many tensors each combination of them changes
        sets = Counter(tuple(t.index + 1 for t in m.pair.terms) for m in plan.merges)
        summary = "; ".join(f"{n} by adapter{'s' * (len(k) > 1)} {', '.join(map(str, k))}"
                            for k, n in sorted(sets.items(), key=lambda item: (-item[1], item[0])))
    else:
        groups = Counter((m.rank, round(m.scale, 9)) for m in plan.merges)
        summary = ", ".join(f"{n} at r={r} scale={s:.6g}" for (r, s), n in sorted(groups.items()))
    yield f"merged:  {len(plan.merges)} tensors ({summary or 'none'})"
    others = sum(1 for op in plan.ops if op.pair is None and not _bulk(op))
    if others:
        yield f"other:   {others} tensors replaced or with token rows set"
    yield from _format_lines(plan)
    yield f"copied:  {plan.copied} tensors byte-for-byte"
    if plan.tie is not None:
        yield f"tied embeddings: {plan.tie}"
    if plan.config is not None:
        changed = {k: v for k, v in plan.config.items() if (base.config or {}).get(k) != v and k != "text_config"}
        removed = [f"{k} removed" for k in (base.config or {}) if k not in plan.config]
        yield f"config.json: {', '.join([*(f'{k}={v}' for k, v in changed.items()), *removed])}"
    if plan.options.rounding is not Rounding.SINGLE:
        yield (f"rounding: {plan.options.rounding.value} (PEFT's double rounding for embedding LoRA, "
               f"target_parameters and MiCA)")
    if plan.tokenizer is not None:
        yield f"tokenizer: {plan.tokenizer}"
    files = output_files(plan)
    sides = ", ".join(p.name for p in plan.side_files) or "no side files"
    yield f"output:  {human_bytes(sum(files.values()))} in {len(files)} files (with {sides}, qwen_merge.json)"
    if base.skipped:
        yield f"not copied: {', '.join(base.skipped)} (other weight formats or folders)"
    if adapter.redundant:
        yield f"ignored: {len(adapter.redundant)} adapter tensors that duplicate modules_to_save copies"
    yield f"predicted peak memory: {plan.predicted_peak_bytes / 2**20:.0f} MiB"


def _adapter_summary(adapter) -> str:
    config = adapter.config
    dora = " DoRA" if config.get("use_dora") else ""
    rslora = " rsLoRA" if config.get("use_rslora") else ""
    params = f", {len(adapter.param_pairs)} target_parameters pairs" if adapter.param_pairs else ""
    return f"LoRA{dora} r={config['r']} alpha={config['lora_alpha']}{rslora}, {len(adapter.pairs)} modules{params}"


def _tensor_lines(plan: MergePlan, detail: bool) -> Iterator[str]:
    """One line per tensor; without `detail`, tensors that differ only in their expert index share a line
    (a 30B-A3B plan is 144 expert lines instead of 18,432) and copies are only counted."""
    if detail:
        for shard in plan.shards:
            for e in shard.entries:
                op = shard.ops.get(e.name)
                yield f"  {describe(op) if op else 'copy     ' + e.name}  [{shard.name}]"
        return
    shard_of = {name: shard.name for shard in plan.shards for name in shard.ops}
    groups: dict[tuple[str, str], list[TensorOp]] = {}
    for op in plan.ops:
        if _bulk(op):
            continue  # counted in the dtype / FP8 lines
        pattern = EXPERT_INDEX.sub(r".\1.*.", op.name)
        groups.setdefault((pattern, describe(op, pattern)), []).append(op)
    for (_, text), ops in groups.items():
        shards = sorted({shard_of[op.name] for op in ops})
        count = f"  x{len(ops)} experts" if len(ops) > 1 else ""
        yield f"  {text}{count}  [{', '.join(shards)}]"


def describe(op: TensorOp, name: str | None = None) -> str:
    """One line: what is done to the tensor (`name` replaces the op's own, e.g. with the expert index
    replaced by `*`)."""
    parts = []
    quantized = op.dequant is not None or op.kind in _FP8_KINDS or op.packed is not None  # steps say it
    if op.source.in_adapter or op.source.entry.name != op.name:
        parts.append(f"from {op.source.entry.name}")
    if op.source.entry.dtype != op.dtype and not quantized:
        parts.append(f"{op.source.entry.dtype}->{op.dtype}")
    if op.pair is not None:
        parts.append(_delta(op))
        if op.round_delta:
            parts.append(f"delta rounded to {op.dtype} first (as PEFT)")
    if op.tokens is not None:
        parts.append(f"{len(op.tokens.indices)} token rows")
    if quantized:
        parts.append(op.steps)
    verb = "merge   " if op.pair is not None else "replace " if op.source.in_adapter else "write   "
    return f"{verb} {name or op.name}  " + ", ".join(parts)


def _delta(op: TensorOp) -> str:
    pair = op.pair
    if isinstance(pair, SumPair):
        what = "bias" if op.part == Part.BIAS else pair.kind.value
        terms = ", ".join(f"{t.index + 1} (r={t.pair.rank} w·s={t.factor:.6g})" for t in pair.terms)
        return f"{what} adapters {terms}{' transposed' if op.transpose and pair.kind != Kind.EMBEDDING else ''}"
    what = "dora" if pair.magnitude is not None else "bias" if op.part == Part.BIAS else pair.kind.value
    if pair.kind == Kind.EXPERTS and pair.experts == 1:
        what = f"parameter {pair.param}"
    if what == "dora" and pair.kind == Kind.CONV:
        what = "conv dora"
    transposed = " transposed" if op.transpose and pair.kind != Kind.EMBEDDING else ""
    return f"{what} r={op.rank} scale={op.scale:.6g}{transposed}"


def _bulk(op: TensorOp) -> bool:
    """A base tensor only converted to the output dtype (or duplicated), or the new scales of a requantized
    weight: there are thousands, so the report counts them instead of listing them."""
    return _action(op) in _COUNTED


def _format_lines(plan: MergePlan) -> Iterator[str]:
    """What the output's dtype and FP8 handling do, with the error bound of each."""
    converted = Counter(op.source.entry.dtype for op in plan.ops
                        if _action(op) in ("convert", "duplicate") and op.dequant is None and op.packed is None)
    dequantized = sum(1 for op in plan.ops if op.dequant is not None)
    requantized = sum(1 for op in plan.ops if op.kind is OpKind.REQUANT)
    if plan.options.dtype:
        moves = ", ".join(f"{n} {dtype}" for dtype, n in sorted(converted.items()))
        yield f"dtype:   output {plan.options.dtype}; converted with one rounding: {moves or 'none'}"
    if dequantized and plan.options.dtype:
        yield (f"fp8:     {dequantized} FP8 tensors dequant → {plan.options.dtype} (f32(Q)·S, plus ΔW where merged, "
               f"one rounding: within 1 ulp of the exact value); {len(plan.dropped)} block scales and "
               f"quantization_config dropped")
    yield from _bnb4_lines(plan)
    if requantized:
        block = next(op.requant.block for op in plan.ops if op.kind is OpKind.REQUANT)
        yield (f"fp8:     {requantized} merged FP8 weights dequant → merge → requant per {block[0]}x{block[1]} block "
               f"with fresh scales (amax/448; a block whose amax is unchanged keeps its scale): each value within "
               f"half an e4m3 step (≤ 1/16 of its magnitude) of the exact merged value; other FP8 tensors and "
               f"their scales copied byte for byte")


def _bnb4_lines(plan: MergePlan) -> Iterator[str]:
    """What happens to a bitsandbytes 4-bit base's weights."""
    packed = [op for op in plan.ops if op.packed is not None]
    if packed:
        merged = sum(1 for op in packed if op.pair is not None)
        yield (f"bnb4:    {len(packed)} 4-bit weights dequant → {plan.options.dtype} (quant_map[code]·absmax in fp32, "
               f"as bitsandbytes' dequantize_4bit), {merged} of them merged onto those values with one rounding; "
               f"{len(plan.dropped)} absmax/quant_map/quant_state tensors and quantization_config dropped")


# -- the plan as a JSON document ------------------------------------------------------------------------

PLAN_FORMAT = 1  # `format` of the document: raised when a key changes meaning or goes away


def to_dict(plan: MergePlan) -> dict:
    """The plan as a JSON-ready document for scripts (`qwen-merge plan --json` prints it): the inputs, the
    options, every output tensor in output order with what is done to it, the totals `render` states, the
    output's files, the predicted peak memory, the disk a merge needs and, for a Hub base, the downloads.
    docs/usage.md lists the keys; they stay as they are within a `format`."""
    fetch = fetch_plan(plan)
    files = output_files(plan)
    output_bytes = sum(files.values())
    tensors = [_tensor_dict(shard, entry) for shard in plan.shards for entry in shard.entries]
    return {
        "format": PLAN_FORMAT,
        "qwen_merge": VERSION,
        "base": _base_dict(plan),
        "adapter": _adapter_dict(plan.adapter),
        **({"adapters": [{**_adapter_dict(one), "weight": weight} for one, weight in zip(plan.adapters, plan.weights)]}
           if plan.adapters else {}),
        "options": {**plan.options.identity(), "allow_pickle": plan.options.allow_pickle},
        "notes": list(plan.notes),
        "tokenizer": None if plan.tokenizer is None else {
            "source": plan.tokenizer.source, "files": [str(p) for p in plan.tokenizer.files],
            "left_out": list(plan.tokenizer.left_out), "reason": plan.tokenizer.reason},
        "renames": [list(rename) for rename in plan.renames],
        "tie": str(plan.tie) if plan.tie is not None else None,
        "config": plan.config,
        "tensors": tensors,
        "totals": {"tensors": len(tensors), "merged": len(plan.merges), "copied": plan.copied,
                   "actions": dict(sorted(Counter(t["action"] for t in tensors).items()))},
        "output": {"bytes": output_bytes, "payload_bytes": plan.total_size, "index": plan.index_name,
                   "files": files, "not_copied": list(plan.base.skipped)},
        "memory": {"predicted_peak_bytes": plan.predicted_peak_bytes},
        "disk": {"needed_bytes": output_bytes + (fetch.download_bytes if fetch else 0),
                 "low_disk_needed_bytes": (output_bytes + fetch.low_disk_bytes) if fetch else None},
        "downloads": None if fetch is None else {
            "shards": list(fetch.order), "bytes": fetch.download_bytes, "cached_bytes": fetch.cached_bytes,
            "low_disk_bytes": fetch.low_disk_bytes},
    }


def _hub_dict(origin: HubOrigin | None) -> dict | None:
    return None if origin is None else {"repo": origin.repo_id, "revision": origin.revision, "commit": origin.commit}


def _base_dict(plan: MergePlan) -> dict:
    base = plan.base
    return {"path": str(base.root), "hub": _hub_dict(base.hub), "shards": [s.path.name for s in base.shards],
            "tensors": sum(len(s.entries) for s in base.shards),
            "payload_bytes": sum(s.entries[-1].end for s in base.shards if s.entries)}


def _adapter_dict(adapter: Adapter) -> dict:
    config = adapter.config
    return {"path": str(adapter.root), "hub": _hub_dict(adapter.hub), "weights": adapter.file.path.name,
            "r": config.get("r"), "lora_alpha": config.get("lora_alpha"), "use_dora": bool(config.get("use_dora")),
            "use_rslora": bool(config.get("use_rslora")), "modules": len(adapter.pairs),
            "target_parameters": len(adapter.param_pairs)}


def _action(op: TensorOp | None) -> str:
    """copy: the base tensor's own bytes; merge: a LoRA delta added; replace: an adapter tensor takes its
    place; tokens: trainable token rows set; convert: another dtype (or FP8 dequantized); scales: the new
    block scales of a requantized FP8 weight; duplicate: a tensor the base lacks, a byte copy of another
    base tensor (the lm_head of untied embeddings)."""
    if op is None:
        return "copy"
    if op.pair is not None:
        return "merge"  # MERGE, BIAS, or a REQUANT weight that takes a delta
    if op.source.in_adapter:
        return "replace"  # copied, converted, with token rows or requantized: the adapter's tensor
    return _ACTIONS[op.kind]


# The action of each kind of op on a base tensor without a delta (`_action`); every kind has one
# (tests/test_opkinds.py). A REQUANT weight without a delta has its values requantized only.
_ACTIONS = {OpKind.COPY: "duplicate", OpKind.CONVERT: "convert", OpKind.TOKENS: "tokens", OpKind.MERGE: "merge",
            OpKind.BIAS: "merge", OpKind.REQUANT: "convert", OpKind.SCALES: "scales"}
_COUNTED = ("convert", "duplicate", "scales")  # the actions `_bulk` counts instead of listing
_FP8_KINDS = (OpKind.REQUANT, OpKind.SCALES)  # with a dequantized source, `describe` names their steps


def _tensor_dict(shard: ShardPlan, entry: TensorEntry) -> dict:
    """One output tensor: where it is written, as what, and from which input tensor."""
    op = shard.ops.get(entry.name)
    source = op.source if op else None
    return {"name": entry.name, "shard": shard.name, "action": _action(op), "dtype": entry.dtype,
            "shape": list(entry.shape),
            "source": {"name": source.entry.name, "dtype": source.entry.dtype, "adapter": source.in_adapter}
            if source else {"name": entry.name, "dtype": entry.dtype, "adapter": False},
            "delta": _delta_dict(op) if op is not None and op.pair is not None else None,
            "token_rows": len(op.tokens.indices) if op is not None and op.tokens is not None else None,
            "dequant": op is not None and (op.dequant is not None or op.packed is not None),
            "requant": op is not None and op.kind is OpKind.REQUANT,
            "scales_of": op.scales_of.name if op is not None and op.scales_of is not None else None}


def _delta_dict(op: TensorOp) -> dict:
    pair = op.pair
    if isinstance(pair, SumPair):  # several adapters: what each adds (adapter numbers count from 1)
        return {"kind": pair.kind.value, "rank": pair.rank, "alpha": pair.alpha, "scale": pair.scale,
                "dora": False, "part": op.part.value, "transposed": op.transpose, "rounded_first": op.round_delta,
                "lora_A": None, "lora_B": None,
                "adapters": [{"adapter": t.index + 1, "weight": t.weight, "rank": t.pair.rank,
                              "alpha": t.pair.alpha, "scale": t.pair.scale, "lora_A": t.pair.a.name,
                              "lora_B": t.pair.b.name} for t in pair.terms]}
    return {"kind": pair.kind.value, "rank": pair.rank, "alpha": pair.alpha, "scale": pair.scale,
            "dora": pair.magnitude is not None, "part": op.part.value, "transposed": op.transpose,
            "rounded_first": op.round_delta, "lora_A": pair.a.name, "lora_B": pair.b.name}


def gguf_lines(layout: GGUFLayout, out: object) -> Iterator[str]:
    """The GGUF file a merge into `out` (a .gguf path) writes: architecture, type, tensors by type, size."""
    counts = ", ".join(f"{n} {t}" for t, n in sorted(layout.type_counts().items()))
    yield (f"gguf:    {out}: {layout.arch}, {layout.outtype}; {len(layout.tensors)} tensors ({counts}); "
           f"{human_bytes(layout.data_bytes)} of tensor data plus the header (metadata and vocabulary)")
    if layout.left_out:
        yield (f"gguf:    leaves out {len(layout.left_out)} tensor(s) llama.cpp does not read: "
               f"{', '.join(layout.left_out)}")


def gguf_dict(layout: GGUFLayout) -> dict:
    """The GGUF file for `qwen-merge plan --json BASE ADAPTER out.gguf`: every tensor with its type and bytes."""
    return {"architecture": layout.arch, "outtype": layout.outtype, "file_type": layout.file_type,
            "data_bytes": layout.data_bytes, "left_out": list(layout.left_out),
            "tensors": [{"name": t.name, "shape": list(t.shape), "type": t.ggml_type, "offset": t.offset,
                         "bytes": t.nbytes} for t in layout.tensors]}
