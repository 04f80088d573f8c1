"""Tied input and output embeddings: make the merged checkpoint behave like the *unmerged* PEFT model.

In a tied model lm_head's weight is the embedding's parameter, so in the unmerged PEFT model:
  * lm_head starts from the embedding's (possibly replaced) matrix unless the adapter saved its own;
  * each side gets only its own LoRA delta (embedding LoRA changes the lookup, not the head);
  * trainable tokens on the embedding also change the head's rows (PEFT ties the wrapper).
If both sides end up with the same recipe the checkpoint stays tied and the matrix is stored once (or
twice, identically, when the base stored lm_head); otherwise lm_head is written separately and
`tie_word_embeddings` becomes false. PEFT's own merge gets several of these wrong (PEFT issues #2018, #2777).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ..inputs.tensorfile import TensorEntry
from .recipe import Pair, Part, Recipe, Source, SumPair

SameValues = Callable[[TensorEntry, TensorEntry, bool], bool]  # (x, y, y transposed) -> bit-equal

EMBED_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
               "language_model.model.embed_tokens.weight", "transformer.wte.weight")
HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
# transformers' PretrainedConfig ties by default; these model types default to untied.
UNTIED_BY_DEFAULT = frozenset({"qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral", "mixtral",
                               "phi3", "deepseek_v2", "deepseek_v3", "olmo2", "glm4", "glm4_moe"})


class Tie(Enum):
    """KEPT: embedding and lm_head merge to the same matrix, the checkpoint stays tied. UNTIED: they
    differ, lm_head is written separately and tie_word_embeddings becomes false."""

    KEPT = "kept tied"
    UNTIED = "untied"


@dataclass(frozen=True, slots=True)
class TieDecision:
    """What was decided for a tied base, and between which two tensors."""

    tie: Tie
    embed: str
    head: str
    stored_once: bool = False  # KEPT on a base that stores the matrix once: no lm_head is written

    def __str__(self) -> str:
        if self.tie is Tie.KEPT:
            once = ", stored once" if self.stored_once else ""
            return f"kept tied: {self.embed} and {self.head} merge to the same matrix{once}"
        return (f"untied: {self.embed} and {self.head} differ after the merge, so {self.head} is written "
                f"separately and tie_word_embeddings is set to false")


@dataclass(frozen=True, slots=True)
class TieInfo:
    """Whether the base ties its embeddings, and the names of the two matrices."""

    tied: bool
    embed: str | None
    head: str | None
    head_stored: bool

    @classmethod
    def of(cls, config: dict | None, entries: dict) -> TieInfo:
        config = config or {}
        flag = config.get("tie_word_embeddings")
        if flag is None and isinstance(config.get("text_config"), dict):
            flag = config["text_config"].get("tie_word_embeddings")
        tied = flag if flag is not None else config.get("model_type") not in UNTIED_BY_DEFAULT
        embed = next((n for n in EMBED_NAMES if n in entries), None)
        suffix = "model.embed_tokens.weight"
        prefix = embed[:-len(suffix)] if embed and embed.endswith(suffix) else ""
        head = next((n for n in (prefix + "lm_head.weight",) + HEAD_NAMES if n in entries), HEAD_NAMES[0])
        return cls(bool(tied) and embed is not None, embed, head, head in entries)

    def may_create(self, target: str) -> bool:
        """A tied base may lack lm_head: an adapter that changes it gets a new, untied lm_head."""
        return self.tied and not self.head_stored and target.endswith(HEAD_NAMES[0])


def decide(info: TieInfo, recipes: dict[str, Recipe], config: dict, base_source: Callable[[str], Source],
           same_values: SameValues) -> tuple[dict[str, Recipe], dict[str, str], TieDecision | None]:
    """Return the final recipes, new tensors (name -> the tensor they are stored after) and the decision.

    `base_source(name)` is the base checkpoint's tensor `name`; `same_values(x, y, transposed)` compares
    two adapter tensors' values (y transposed)."""
    head = info.head
    if not info.tied or (info.embed not in recipes and head not in recipes):
        return recipes, {}, None
    e = recipes.get(info.embed) or Recipe(base_source(info.embed))
    h = _head_recipe(e, recipes.get(head), config, same_values)
    recipes = {n: r for n, r in recipes.items() if n != head}
    if e.key() == h.key():
        if info.head_stored:
            recipes[head] = dataclasses.replace(e, shard_of=None)
        return recipes, {}, TieDecision(Tie.KEPT, info.embed, head, stored_once=not info.head_stored)
    if e.changes:
        recipes[info.embed] = e
    recipes[head] = dataclasses.replace(h, shard_of=info.embed)
    added = {} if info.head_stored else {head: info.embed}
    return recipes, added, TieDecision(Tie.UNTIED, info.embed, head)


def _head_recipe(e: Recipe, h: Recipe | None, config: dict, same_values: SameValues) -> Recipe:
    """lm_head in the unmerged model: its own saved matrix, else the embedding's source; its own LoRA;
    the embedding's trainable-token rows (PEFT ties that wrapper).

    With `ensure_weight_tying`, PEFT saves lm_head's factors as the embedding's, transposed, and the shared
    matrix under both names. The signature is the values, not the flag: after training the saved copies
    can differ, and then PEFT's unmerged model uses lm_head's own."""
    own_source = h is not None and h.source is not None and h.source.in_adapter
    source = h.source if own_source else e.source
    pair = h.pair if h is not None else None
    tokens = (h.tokens if h is not None else None) or e.tokens
    if pair is not None and e.pair is not None and _transposed_twins(e.pair, pair, same_values):
        pair = e.pair  # the same delta: apply it once
    if own_source and e.source.in_adapter and e.source.entry.shape == source.entry.shape \
            and same_values(e.source.entry, source.entry, False):
        source = e.source  # one trained matrix saved under both names
    return Recipe(source, pair, Part.WEIGHT, tokens)


def _transposed_twins(embed_pair: Pair, head_pair: Pair, same_values: SameValues) -> bool:
    if isinstance(embed_pair, SumPair) or isinstance(head_pair, SumPair):  # several adapters: deltas of their own
        return False
    if head_pair.a.shape != embed_pair.b.shape[::-1] or head_pair.b.shape != embed_pair.a.shape[::-1]:
        return False
    return same_values(head_pair.a, embed_pair.b, True) and same_values(head_pair.b, embed_pair.a, True)
