"""The model card (`README.md`) of a merge published to the Hub: YAML metadata the Hub reads (`base_model`,
`base_model_relation: merge`, `library_name`, `tags`), then what was merged — base and adapter with their
commits, the options, the tool version — and how to check the upload with `qwen-merge verify`. When the
adapter has a card, its text (without its own metadata) follows ours."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..version import VERSION

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
TAGS = ("qwen-merge", "lora", "peft", "merge")


@dataclass(frozen=True, slots=True)
class Source:
    """An input as the card names it: a Hub repo and the commit merged, or a local folder's name."""

    name: str
    commit: str | None = None  # None: a local folder

    def __str__(self) -> str:
        return f"[`{self.name}`](https://huggingface.co/{self.name}) at commit `{self.commit}`" if self.commit \
            else f"`{self.name}` (a local folder)"


def model_card(repo_id: str, base: Source, adapters: Sequence[Source], options: dict, base_model: str | None,
               adapter_card: str | None, *, weights: Sequence[float] = ()) -> bytes:
    """The card. `adapters`: one, or several merged as a sum weighted by `weights`; `base_model`: the repo
    id the Hub links as the base (a Hub base's, else the one the first adapter's config names, when it reads
    as a repo id); `adapter_card`: the (first) adapter's README.md, if any."""
    meta = []
    if base_model and _REPO_ID.fullmatch(base_model):
        meta += [f"base_model: {base_model}", "base_model_relation: merge"]
    meta += ["library_name: transformers", "tags:", *(f"- {tag}" for tag in TAGS)]
    shown = {k: v for k, v in options.items() if v not in (None, {}, [], False)}
    option_text = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(shown.items())) or "the defaults"
    verify_base = base.name if base.commit is None else f"{base.name}@{base.commit}"
    verify_adapters = " ".join(f"--adapter {a.name}" if a.commit is None else f"--adapter {a.name}@{a.commit}"
                               for a in adapters)
    if weights:  # several adapters: the sum of their changes, each weighted
        what = "several LoRA adapters merged into its base model's weights (W + Σ wᵢ·ΔWᵢ, weighted as listed)"
        adapter_lines = "- Adapters:\n" + "\n".join(f"  - {a}, weight {w:g}" for a, w in zip(adapters, weights))
        owner = "adapters'"
    else:
        what = "a LoRA adapter merged into its base model's weights"
        adapter_lines, owner = f"- Adapter: {adapters[0]}", "adapter's"
    body = f"""# {repo_id.split("/")[-1]}

This model is {what} by qwen-merge {VERSION}: it loads
like the base model, with no PEFT needed.

- Base model: {base}
{adapter_lines}
- Options: {option_text}

`qwen_merge.json` records the inputs (sizes, the {owner} SHA-256, the commits), the options and every
shard's SHA-256.

## How to check it

```
hf download {repo_id} --local-dir merged
qwen-merge verify merged --base {verify_base} {verify_adapters}
```
"""
    text = "---\n" + "\n".join(meta) + "\n---\n\n" + body
    if adapter_card and (kept := _without_metadata(adapter_card).strip()):
        text += "\n## The adapter's card\n\n" + kept + "\n"
    return text.encode()


def _without_metadata(card: str) -> str:
    """A card's text without its YAML front matter (ours replaces it)."""
    if card.startswith("---"):
        end = card.find("\n---", 3)
        if end != -1:
            return card[card.find("\n", end + 1) + 1:] if card.find("\n", end + 1) != -1 else ""
    return card
