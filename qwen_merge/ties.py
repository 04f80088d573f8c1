"""Tied input and output embeddings: make the merged checkpoint behave like the *unmerged* PEFT model.

In a tied model lm_head's weight is the embedding's parameter, so in the unmerged PEFT model:
  * lm_head starts from the embedding's (possibly replaced) matrix unless the adapter saved its own;
  * each side gets only its own LoRA delta (embedding LoRA changes the lookup, not the head);
  * trainable tokens on the embedding also change the head's rows (PEFT ties the wrapper).
If both sides end up with the same recipe the checkpoint stays tied and the matrix is stored once (or
twice, identically, when the base stored lm_head); otherwise lm_head is written separately and
`tie_word_embeddings` becomes false. PEFT's own merge gets several of these wrong (spec §7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import MismatchError

EMBED_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
               "language_model.model.embed_tokens.weight", "transformer.wte.weight")
HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
# transformers' PretrainedConfig ties by default; these model types default to untied.
UNTIED_BY_DEFAULT = frozenset({"qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral", "mixtral",
                               "phi3", "deepseek_v2", "deepseek_v3", "olmo2", "glm4", "glm4_moe"})


@dataclass(frozen=True, slots=True)
class Recipe:
    """How an output tensor is made: start from `source`, add `pair`'s delta (to `part`), set `tokens`
    rows. `shard_of` names the tensor beside which a new tensor is stored."""

    source: Any
    pair: Any = None
    part: str = "weight"
    tokens: Any = None
    shard_of: str | None = None

    @property
    def changes(self) -> bool:
        return self.source.in_adapter or self.pair is not None or self.tokens is not None

    def key(self) -> tuple:
        return (self.source.in_adapter, self.source.entry.name, id(self.pair), id(self.tokens))


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
        prefix = embed[:-len("model.embed_tokens.weight")] if embed and embed.endswith("model.embed_tokens.weight") else ""
        head = next((n for n in (prefix + "lm_head.weight",) + HEAD_NAMES if n in entries), HEAD_NAMES[0])
        return cls(bool(tied) and embed is not None, embed, head, head in entries)

    def may_create(self, target: str) -> bool:
        """A tied base may lack lm_head: an adapter that changes it gets a new, untied lm_head."""
        return self.tied and not self.head_stored and target.endswith(HEAD_NAMES[0])


def decide(info: TieInfo, recipes: dict[str, Recipe], config: dict, base_operand: Callable[[str], Any]
           ) -> tuple[dict[str, Recipe], dict[str, str], str | None]:
    """Return the final recipes, new tensors (name -> the tensor they are stored after) and the decision.

    `base_operand(name)` gives the base checkpoint's tensor `name` as a recipe source."""
    head = info.head
    if not info.tied or (info.embed not in recipes and head not in recipes):
        return recipes, {}, None
    e = recipes.get(info.embed) or Recipe(base_operand(info.embed))
    h = _head_recipe(e, recipes.get(head), config)
    recipes = {n: r for n, r in recipes.items() if n != head}
    if e.key() == h.key():
        if info.head_stored:
            recipes[head] = dataclasses.replace(e, shard_of=None)
        return recipes, {}, (f"kept tied: {info.embed} and {head} merge to the same matrix"
                             + ("" if info.head_stored else ", stored once"))
    if e.changes:
        recipes[info.embed] = e
    recipes[head] = dataclasses.replace(h, shard_of=info.embed)
    added = {} if info.head_stored else {head: info.embed}
    return recipes, added, (f"untied: {info.embed} and {head} differ after the merge, so {head} is written "
                            f"separately and tie_word_embeddings is set to false")


def _head_recipe(e: Recipe, h: Recipe | None, config: dict) -> Recipe:
    """lm_head in the unmerged model: its own saved matrix, else the embedding's source; its own LoRA;
    the embedding's trainable-token rows (PEFT ties that wrapper)."""
    own_source = h is not None and h.source is not None and h.source.in_adapter
    source = h.source if own_source else e.source
    pair = h.pair if h is not None else None
    tokens = (h.tokens if h is not None else None) or e.tokens
    if config.get("ensure_weight_tying"):
        if pair is not None and e.pair is not None:
            _check_transposed_factors(e.pair, pair)
            pair = e.pair  # lm_head's factors are the embedding's, transposed: the same delta, applied once
        if own_source and e.source.in_adapter:
            source = e.source  # PEFT saved the shared trained matrix under both names
    return Recipe(source, pair, "weight", tokens)


def _check_transposed_factors(embed_pair: Any, head_pair: Any) -> None:
    if head_pair.a.shape != embed_pair.b.shape[::-1] or head_pair.b.shape != embed_pair.a.shape[::-1]:
        raise MismatchError(f"ensure_weight_tying is set but {head_pair.a.name!r} {list(head_pair.a.shape)} is not "
                            f"the transpose of {embed_pair.b.name!r} {list(embed_pair.b.shape)}")
