"""The plan as text for people: what happens to each tensor, totals, renames, the tie decision, the
output size and the predicted peak memory. `qwen-merge plan` prints it; `MergePlan.render()` returns it."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .adapter import Kind
from .options import Rounding
from .recipe import Part
from .units import human_bytes

if TYPE_CHECKING:  # for annotations only: the planner calls this module
    from .plan import MergePlan, TensorOp

EXPERT_INDEX = re.compile(r"\.(experts)\.\d+\.")


def render(plan: MergePlan, detail: bool = False) -> str:
    return "\n".join(_lines(plan, detail))


def _lines(plan: MergePlan, detail: bool) -> Iterator[str]:
    base, adapter = plan.base, plan.adapter
    n_tensors = sum(len(s.source.entries) for s in plan.shards)
    yield f"base:    {base.root}  ({len(plan.shards)} shard(s), {n_tensors} tensors, {human_bytes(plan.total_size)})"
    yield f"adapter: {adapter.root}  ({_adapter_summary(adapter)})"
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
    if plan.tie is not None:
        yield f"tied embeddings: {plan.tie}"
    if plan.config is not None:
        changed = {k: v for k, v in plan.config.items() if (base.config or {}).get(k) != v and k != "text_config"}
        yield f"config.json: {', '.join(f'{k}={v}' for k, v in changed.items())}"
    if plan.options.rounding is not Rounding.SINGLE:
        yield (f"rounding: {plan.options.rounding.value} (PEFT's double rounding for embedding LoRA, "
               f"target_parameters and MiCA)")
    files = len(plan.shards) + len(base.side_files) + (1 if base.index_name else 0) + 1  # + the manifest
    sides = ", ".join(p.name for p in base.side_files) or "no side files"
    yield f"output:  {human_bytes(plan.output_bytes)} in {files} files (with {sides}, qwen_merge.json)"
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
    groups: dict[tuple[str, str], list[TensorOp]] = {}
    for op in plan.ops:
        pattern = EXPERT_INDEX.sub(r".\1.*.", op.name)
        groups.setdefault((pattern, describe(op, pattern)), []).append(op)
    for (_, text), ops in groups.items():
        shards = sorted({op.shard for op in ops})
        count = f"  x{len(ops)} experts" if len(ops) > 1 else ""
        yield f"  {text}{count}  [{', '.join(shards)}]"


def describe(op: TensorOp, name: str | None = None) -> str:
    """One line: what is done to the tensor (`name` replaces the op's own, e.g. with the expert index
    replaced by `*`)."""
    parts = []
    if op.source.in_adapter or op.source.entry.name != op.name:
        parts.append(f"from {op.source.entry.name}")
    if op.source.entry.dtype != op.dtype:
        parts.append(f"{op.source.entry.dtype}->{op.dtype}")
    if op.pair is not None:
        parts.append(_delta(op))
        if op.round_delta:
            parts.append(f"delta rounded to {op.dtype} first (as PEFT)")
    if op.tokens is not None:
        parts.append(f"{len(op.tokens.indices)} token rows")
    verb = "merge   " if op.pair is not None else "replace " if op.source.in_adapter else "write   "
    return f"{verb} {name or op.name}  " + ", ".join(parts)


def _delta(op: TensorOp) -> str:
    pair = op.pair
    what = "dora" if pair.magnitude is not None else "bias" if op.part == Part.BIAS else pair.kind.value
    if pair.kind == Kind.EXPERTS and pair.experts == 1:
        what = f"parameter {pair.param}"
    if what == "dora" and pair.kind == Kind.CONV:
        what = "conv dora"
    transposed = " transposed" if op.transpose and pair.kind != Kind.EMBEDDING else ""
    return f"{what} r={op.rank} scale={op.scale:.6g}{transposed}"
