"""How one output tensor is made, before it is checked and laid out: the vocabulary the planner, the
tied-embedding decision and the report share.

A `Source` is where the tensor's starting bytes are (a base tensor, or an adapter tensor that replaces
it); a `Recipe` is the source plus what is applied to it (a LoRA pair's delta, trainable-token rows).
The planner turns each recipe into a `plan.TensorOp`, which adds the output dtype, shape and row blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..inputs.adapter import ExpertPair, LoraPair, TokenRows
from ..inputs.tensorfile import TensorEntry, TensorFile

Pair = LoraPair | ExpertPair


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
