"""How one output tensor is made, before it is checked and laid out: the vocabulary the planner, the
tied-embedding decision and the report share.

A `Source` is where the tensor's starting bytes are (a base tensor, or an adapter tensor that replaces
it); a `Recipe` is the source plus what is applied to it (a LoRA pair's delta, trainable-token rows).
The planner turns each recipe into a `plan.TensorOp`, which adds the output dtype, shape and row blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ..errors import AdapterError
from ..inputs.adapter import Adapter, ExpertPair, LoraPair, TokenRows
from ..inputs.tensorfile import TensorEntry, TensorFile


class Part(str, Enum):
    """Which tensor of a layer a LoRA pair's delta goes to: its weight, or its bias (`lora_B.bias`)."""

    WEIGHT = "weight"
    BIAS = "bias"


@dataclass(frozen=True, slots=True)
class Source:
    """An input tensor: which file (a base shard or the adapter) and where in it."""

    file: TensorFile
    entry: TensorEntry
    in_adapter: bool


@dataclass(frozen=True, slots=True)
class Recipe:
    """Start from `source`, add `pair`'s delta to `part`, set `tokens` rows. `shard_of` names the tensor
    beside which a tensor the base does not have (an untied lm_head) is stored. `source` is None only for
    an lm_head a tied base does not store, until the tie decision gives it the embedding's."""

    source: Source | None
    pair: Pair | None = None
    part: Part = Part.WEIGHT
    tokens: TokenRows | None = None
    shard_of: str | None = None

    @property
    def changes(self) -> bool:
        """Whether the output differs from the source's bytes."""
        return self.source.in_adapter or self.pair is not None or self.tokens is not None

    def key(self) -> tuple:
        """Equal keys make equal tensors (same source, same pair, same token rows)."""
        return (self.source.in_adapter, self.source.entry.name, id(self.pair), id(self.tokens))


@dataclass(frozen=True, slots=True)
class Term:
    """One adapter's LoRA pair in a weighted sum: the pair, the adapter's weight, its position among the
    adapters given, and the adapter (whose file holds the pair's tensors)."""

    pair: LoraPair | ExpertPair
    weight: float
    index: int
    adapter: Adapter

    @property
    def factor(self) -> float:
        """wᵢ·sᵢ, what multiplies Bᵢ·Aᵢ (PEFT's add_weighted_adapter folds it into Bᵢ)."""
        return self.weight * self.pair.scale


@dataclass(frozen=True, slots=True)
class SumPair:
    """The LoRA pairs of several adapters on one tensor: ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ (task arithmetic, what PEFT's
    `add_weighted_adapter(combination_type="cat")` computes: the factors concatenated along the rank with
    wᵢ·sᵢ folded into Bᵢ, scale 1). Every term is of the same `kind`; DoRA is never part of a sum."""

    terms: tuple[Term, ...]
    magnitude: None = None

    @property
    def kind(self):
        return self.terms[0].pair.kind

    @property
    def rank(self) -> int:
        """The rank of the concatenated factors: the sum of the terms' ranks."""
        return sum(t.pair.rank for t in self.terms)

    @property
    def scale(self) -> float:
        """1.0: each term's wᵢ·sᵢ is folded into its factors."""
        return 1.0

    @property
    def alpha(self) -> float:
        return float(self.rank)

    @property
    def bias(self) -> TensorEntry | None:
        return self.terms[0].pair.bias

    @property
    def expert(self) -> int | None:  # an expert's tensor: the same expert and rows in every term
        return self.terms[0].pair.expert

    @property
    def rows(self) -> tuple[int, int] | None:
        return self.terms[0].pair.rows

    @property
    def transposed(self) -> bool:
        return self.terms[0].pair.transposed

    @property
    def a(self) -> _Shaped:
        """The shape of the concatenated A (Σr, ...), for the memory estimate."""
        first = self.terms[0].pair.a.shape
        return _Shaped((sum(t.pair.a.shape[0] for t in self.terms), *first[1:]))

    @property
    def b(self) -> _Shaped:
        first = self.terms[0].pair.b.shape
        return _Shaped((first[0], sum(t.pair.b.shape[1] for t in self.terms), *first[2:]))


@dataclass(frozen=True, slots=True)
class _Shaped:
    shape: tuple[int, ...]


def combine(per_adapter: list[dict[str, Recipe]], adapters: list[Adapter], weights: tuple[float, ...],
            base_copy: Callable[[str, Source], Source | None] = lambda name, source: None) -> dict[str, Recipe]:
    """The recipes of several adapters as one: the LoRA pairs that land on a tensor become one `SumPair`
    (a single adapter's pair too: its weight applies). A tensor that one adapter replaces (modules_to_save,
    a saved embedding) or sets token rows of is taken as that adapter has it (its weight scales deltas only);
    when another adapter changes the same tensor too, there is no sum of deltas to make, unless the
    replacement is a byte copy of the base tensor (`base_copy(name, source)` returns the base's source then:
    PEFT saves the base embedding and lm_head beside LoRA on them), which is then read from the base.

    Raises:
        AdapterError: two adapters both change a tensor and one of them replaces it or sets its token rows,
            or their LoRA on it is of different kinds.
    """
    owners: dict[str, list[int]] = {}
    for k, recipes in enumerate(per_adapter):
        for name in recipes:
            owners.setdefault(name, []).append(k)
    combined = {}
    for name, ks in owners.items():
        recipes = [per_adapter[k][name] for k in ks]
        if len(ks) > 1:
            recipes = [_unsaved(r, name, base_copy) for r in recipes]
        whole = [(k, r) for k, r in zip(ks, recipes) if r.tokens is not None or (r.source and r.source.in_adapter)]
        if whole and len(ks) > 1:
            k, recipe = whole[0]
            other = next(j for j in ks if j != k)
            what = "sets trainable-token rows of" if recipe.tokens is not None else "replaces"
            raise AdapterError(f"{adapters[k].root} {what} {name!r} (modules_to_save / trainable tokens) and "
                               f"{adapters[other].root} changes it too; a replaced tensor is no sum of deltas: "
                               f"merge one of them first, or leave {name!r} out of one adapter")
        first = recipes[0]
        if first.pair is None:
            combined[name] = first
            continue
        kinds = {r.pair.kind for r in recipes}
        if len(kinds) > 1:
            raise AdapterError(f"{name!r} takes LoRA of different kinds from {adapters[ks[0]].root} and "
                               f"{adapters[ks[1]].root} ({' and '.join(sorted(k.value for k in kinds))}); "
                               f"their deltas are not laid out alike")
        terms = tuple(Term(r.pair, weights[k], k, adapters[k]) for k, r in zip(ks, recipes))
        combined[name] = dataclasses.replace(first, pair=SumPair(terms))
    return combined


Pair = LoraPair | ExpertPair | SumPair


def _unsaved(recipe: Recipe, name: str, base_copy: Callable[[str, Source], Source | None]) -> Recipe:
    """`recipe` reading the base tensor instead of a saved replacement that is a byte copy of it."""
    source = recipe.source
    if source is None or not source.in_adapter or recipe.tokens is not None:
        return recipe
    base = base_copy(name, source)
    return dataclasses.replace(recipe, source=base) if base is not None else recipe


def refuse_uncombinable(adapters: list[Adapter], weights: tuple[float, ...]) -> None:
    """What cannot be part of a weighted sum, refused before anything is planned.

    Raises:
        AdapterError: a DoRA adapter with another adapter, or with a weight other than 1: DoRA rescales
            each row of W + ΔW by its trained magnitude, so its result is no delta to add or scale.
    """
    dora = next((a for a in adapters if a.config.get("use_dora")), None)
    if dora is None:
        return
    if len(adapters) > 1:
        raise AdapterError(f"{dora.root}: a DoRA adapter (use_dora) cannot be combined with other adapters: it "
                           f"rescales W + ΔW row by row, so its change is no delta to add to theirs; merge it alone")
    raise AdapterError(f"{dora.root}: a DoRA adapter (use_dora) cannot be weighted ({weights[0]:g}): it rescales "
                       f"W + ΔW row by row, so its change is no delta to scale; merge it with weight 1")
