"""Fused-expert LoRA (`target_parameters`, PEFT >= 0.17 on transformers 5) onto the checkpoint on disk.

In memory transformers 5 holds a Qwen3-MoE layer's experts fused: `experts.gate_up_proj` (E, 2I, H) and
`experts.down_proj` (E, H, I). Checkpoints on disk usually keep one tensor per expert
(`experts.{e}.{gate,up,down}_proj.weight`; Mixtral: `w1`, `w3`, `w2`), sometimes fused 3-D tensors, some
stored transposed (E, in, out). The layout is read from the shard's names and shapes, never assumed.

PEFT nests one wrapper per targeted parameter in the order the model class registers them, which the
file does not record, so each saved (A, B) pair is assigned to the parameter its shapes fit: A's width is
the parameter's input size, B's height its output size. None or several fitting is an error.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MismatchError
from ..inputs.adapter import Adapter, ExpertPair, ParamPair, module_scale, targeted_parameters
from ..inputs.tensorfile import TensorEntry

# A fused parameter name -> the per-expert tensors it is split into, in row order (one name = no split).
PER_EXPERT = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}


@dataclass(frozen=True, slots=True)
class _Index:
    """The on-disk names by module: each module's own tensors, the per-expert tensors by (module,
    projection), the modules that hold experts, and every module that owns a parameter."""

    leaves: dict[str, set[str]]
    experts: dict[tuple[str, str], list[int]]
    expert_modules: set[str]
    modules: set[str]


class HeldParameters:
    """Which parameters each module owns in memory, read from the on-disk names: its own tensors
    (`<module>.<name>`), plus the fused expert parameters that its per-expert tensors make up."""

    def __init__(self, entries: dict[str, TensorEntry]) -> None:
        self._entries = entries

    @functools.cached_property
    def _index(self) -> _Index:
        """Built on first use: many plans (LoRA on Linear layers only) never ask."""
        leaves: dict[str, set[str]] = {}
        for name in self._entries:
            module, _, leaf = name.rpartition(".")
            leaves.setdefault(module, set()).add(leaf)
        experts = _expert_index(self._entries)
        expert_modules = {module for module, _ in experts}
        return _Index(leaves, experts, expert_modules, set(leaves) | expert_modules)

    @property
    def experts(self) -> dict[tuple[str, str], list[int]]:
        """(module, projection) -> the expert indices stored per expert."""
        return self._index.experts

    def __call__(self, module: str) -> frozenset[str]:
        """The parameters of on-disk module path `module`."""
        index = self._index
        held = set(index.leaves.get(module, ()))
        if module in index.expert_modules:
            held.update(p for p, alternatives in PER_EXPERT.items()
                        if any(_count_experts(module, parts, index.experts) for parts in alternatives))
        return frozenset(held)

    def modules(self) -> set[str]:
        """Every on-disk module path that owns a parameter."""
        return self._index.modules

    def owners(self, param: str) -> set[str]:
        """The on-disk modules that own a parameter named `param`."""
        index = self._index
        found = {m for m, leaves in index.leaves.items() if param in leaves}
        if param in PER_EXPERT:
            found |= {m for m in index.expert_modules if param in self(m)}
        return found


def expert_intents(adapter: Adapter, names: Callable[[str], str], entries: dict[str, TensorEntry],
                   holds: HeldParameters) -> dict[str, ExpertPair]:
    """On-disk tensor name -> the ExpertPair that lands on it, for every target_parameters pair."""
    by_module: dict[str, list[ParamPair]] = {}
    for pp in adapter.param_pairs:
        by_module.setdefault(pp.module, []).append(pp)
    found: dict[str, ExpertPair] = {}
    for module, pairs in by_module.items():
        disk = names(module)
        held = holds(disk)
        targeted = targeted_parameters(adapter.config, module)
        layouts = {param: _layout(disk, param, entries, holds.experts) for param in targeted if param in held}
        if not layouts:
            raise MismatchError(f"{adapter.file.path}: {pairs[0].a.name!r} is a target_parameters factor of "
                                f"{disk!r}, but that module of the base owns none of the targeted parameters "
                                f"({', '.join(targeted) or 'none'})")
        assigned = []
        for pp in pairs:
            param = _assign(pp, layouts, adapter)
            assigned.append((pp, param, layouts.pop(param)))
        orientation = _module_orientation(assigned)
        for pp, param, lay in assigned:
            found.update(_split(pp, param, lay, adapter, orientation))
    return found


def _orientation(pp: ParamPair, lay: _Layout) -> bool | None:
    """For a fused 3-D tensor: True if stored (E, in, out); None when it is square and cannot tell."""
    if lay.fused is None:
        return False
    if lay.inp == lay.out:
        return None
    return (lay.inp, lay.out) != (pp.a.shape[1], pp.b.shape[0])


def _module_orientation(assigned: list[tuple[ParamPair, str, _Layout]]) -> bool | None:
    """One checkpoint stores a module's fused experts one way: a square tensor (2·I == H) takes the
    orientation its non-square sibling shows."""
    known = {_orientation(pp, lay) for pp, _, lay in assigned if lay.fused is not None} - {None}
    if len(known) > 1:
        raise MismatchError(f"{assigned[0][0].module}: fused expert tensors are stored in both orientations")
    return known.pop() if known else None


class _Layout:
    """Where a fused parameter lives on disk: per-expert tensors (names per expert) or one 3-D tensor."""

    def __init__(self, experts: int, inp: int, out: int, per_expert: list[tuple[str, ...]] | None,
                 fused: str | None, transposed: bool, part_rows: tuple[int, ...]) -> None:
        self.experts, self.inp, self.out = experts, inp, out
        self.per_expert, self.fused, self.transposed, self.part_rows = per_expert, fused, transposed, part_rows


def _expert_index(entries: dict[str, TensorEntry]) -> dict[tuple[str, str], list[int]]:
    """(module, projection) -> expert indices present, from one pass over the tensor names."""
    index: dict[tuple[str, str], list[int]] = {}
    for name in entries:
        found = EXPERT_NAME.match(name)
        if found:
            index.setdefault((found.group(1), found.group(3)), []).append(int(found.group(2)))
    return index


EXPERT_NAME = re.compile(r"(.+)\.(\d+)\.([^.]+)\.weight$")


def _layout(module: str, param: str, entries: dict[str, TensorEntry],
            experts: dict[tuple[str, str], list[int]]) -> _Layout:
    fused = entries.get(f"{module}.{param}")
    if fused is not None and len(fused.shape) == 2:  # a plain 2-D parameter (e.g. the MoE router's weight)
        out, inp = fused.shape
        return _Layout(1, inp, out, [(fused.name,)], None, False, (out,))
    if fused is not None and len(fused.shape) == 3:
        e, d1, d2 = fused.shape
        return _Layout(e, d2, d1, None, fused.name, False, (d1,))  # orientation settled by the factors
    for parts in PER_EXPERT.get(param, ()):
        count = _count_experts(module, parts, experts)
        if count:
            experts = count
            names = [tuple(f"{module}.{e}.{p}.weight" for p in parts) for e in range(experts)]
            shapes = [entries[n].shape for n in names[0]]
            if any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes):
                break
            _check_expert_shapes(names, shapes, entries)
            rows = tuple(s[0] for s in shapes)
            return _Layout(experts, shapes[0][1], sum(rows), names, None, False, rows)
    raise MismatchError(f"target_parameters names {module}.{param}, but the base has neither a 3-D tensor "
                        f"{module}.{param} nor per-expert tensors {module}.<e>.<proj>.weight for it")


def _check_expert_shapes(names: list[tuple[str, ...]], shapes: list[tuple[int, ...]],
                         entries: dict[str, TensorEntry]) -> None:
    """Every expert's tensors have expert 0's shapes: one fused LoRA is split evenly among them."""
    for tensor_names in names[1:]:
        for name, shape in zip(tensor_names, shapes, strict=True):
            if entries[name].shape != shape:
                raise MismatchError(f"{name}: the base stores this expert's tensor as {list(entries[name].shape)} "
                                    f"but expert 0's as {list(shape)}; a target_parameters LoRA is split evenly "
                                    f"over experts of one shape (is the checkpoint damaged, or another model's?)")


def _count_experts(module: str, parts: tuple[str, ...], experts: dict[tuple[str, str], list[int]]) -> int:
    """E when every projection in `parts` exists for experts 0..E-1 of `module`, else 0."""
    found = [sorted(experts.get((module, p), [])) for p in parts]
    if not found[0] or found[0] != list(range(len(found[0]))) or any(f != found[0] for f in found):
        return 0
    return len(found[0])


def _assign(pp: ParamPair, layouts: dict[str, _Layout], adapter: Adapter) -> str:
    inp, out = pp.a.shape[1], pp.b.shape[0]
    fits = [p for p, lay in layouts.items() if (lay.inp, lay.out) == (inp, out)
            or lay.fused and (lay.out, lay.inp) == (inp, out)]
    if len(fits) != 1:
        what = "no" if not fits else "more than one"
        raise MismatchError(f"{adapter.file.path}: {pp.a.name!r} (in={inp}) / {pp.b.name!r} (out={out}) fit {what} "
                            f"targeted parameter of {pp.module!r} ({', '.join(layouts) or 'none left'})")
    return fits[0]


def _split(pp: ParamPair, param: str, lay: _Layout, adapter: Adapter, orientation: bool | None
           ) -> dict[str, ExpertPair]:
    rank, alpha, scale = module_scale(adapter.config, f"{pp.module}.{param}")
    if pp.a.shape[0] != lay.experts * rank or pp.b.shape[1] != lay.experts * rank:
        raise MismatchError(f"{adapter.file.path}: {pp.a.name!r} {list(pp.a.shape)} / {pp.b.name!r} "
                            f"{list(pp.b.shape)}: expected {lay.experts} experts x r={rank} = "
                            f"{lay.experts * rank} rank rows for {pp.module}.{param}")
    fixed = (pp.module, param, pp.a, pp.b, lay.experts, rank, float(alpha), scale)
    if lay.fused is not None:
        transposed = _orientation(pp, lay)
        transposed = orientation if transposed is None else transposed
        if transposed is None:
            raise MismatchError(f"{lay.fused}: the fused expert tensor is square per expert "
                                f"({lay.out}x{lay.inp}), so its shape cannot tell (E, out, in) from (E, in, out), "
                                f"and no sibling tensor of {pp.module} settles it")
        return {lay.fused: ExpertPair(*fixed, transposed=transposed)}
    # one pair per expert tensor (thousands in a model): positional arguments, and the row ranges shared
    starts = [sum(lay.part_rows[:k]) for k in range(len(lay.part_rows))]
    ranges = [(start, start + rows) for start, rows in zip(starts, lay.part_rows, strict=True)]
    found = {}
    for e, tensor_names in enumerate(lay.per_expert):
        for name, rows in zip(tensor_names, ranges, strict=True):
            found[name] = ExpertPair(*fixed, e, rows)
    return found

