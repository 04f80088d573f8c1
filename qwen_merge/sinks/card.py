"""The model card (`README.md`) of a merge published to the Hub: YAML metadata the Hub reads (`base_model`,
`base_model_relation: merge`, `library_name`, `tags`), then what was merged — base and adapter with their
commits, the options, the tool version — and how to check the upload with `qwen-merge verify`. When the
adapter has a card, its text (without its own metadata) follows ours."""

from __future__ import annotations

import json
import re
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


def model_card(repo_id: str, base: Source, adapter: Source, options: dict, base_model: str | None,
               adapter_card: str | None) -> bytes:
    """The card. `base_model`: the repo id the Hub links as the base (a Hub base's, else the one the
    adapter's config names, when it reads as a repo id); `adapter_card`: the adapter's README.md, if any."""
    meta = []
    if base_model and _REPO_ID.fullmatch(base_model):
        meta += [f"base_model: {base_model}", "base_model_relation: merge"]
    meta += ["library_name: transformers", "tags:", *(f"- {tag}" for tag in TAGS)]
    shown = {k: v for k, v in options.items() if v not in (None, {}, [], False)}
    option_text = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(shown.items())) or "the defaults"
    verify_base = base.name if base.commit is None else f"{base.name}@{base.commit}"
    verify_adapter = adapter.name if adapter.commit is None else f"{adapter.name}@{adapter.commit}"
    body = f"""# {repo_id.split("/")[-1]}

This model is a LoRA adapter merged into its base model's weights by qwen-merge {VERSION}: it loads
like the base model, with no PEFT needed.

- Base model: {base}
- Adapter: {adapter}
- Options: {option_text}

`qwen_merge.json` records the inputs (sizes, the adapter's SHA-256, the commits), the options and every
shard's SHA-256.

## How to check it

```
hf download {repo_id} --local-dir merged
qwen-merge verify merged --base {verify_base} --adapter {verify_adapter}
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
