"""The names of the files qwen-merge reads and writes, and JSON as Hugging Face tools write it.

One place for them, so that a name means one file everywhere: `MODEL_CONFIG` is always a model's
`config.json`, `ADAPTER_CONFIG` always a PEFT adapter's `adapter_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FormatError

MODEL_CONFIG = "config.json"
SINGLE_NAME = "model.safetensors"  # a model in one file
INDEX_NAME = "model.safetensors.index.json"  # a sharded model's tensor -> shard map
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"  # read only when pickles are allowed
MANIFEST_NAME = "qwen_merge.json"  # what a merge wrote: identity, options, each shard's SHA-256
STATE_NAME = "qwen_merge.partial.json"  # a partial folder's record of the shards completed so far


def read_json(path: Path, what: str) -> dict:
    """Read a JSON object, turning every failure into a one-line FormatError."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: {what} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise FormatError(f"{path}: {what} must be a JSON object, found {type(value).__name__}")
    return value



def json_bytes(value: dict, *, sort_keys: bool = False) -> bytes:
    """JSON the way transformers writes it (indent 2, trailing newline): the bytes `write_json` and
    `write_json_atomic` (with `sort_keys`) write, and what the plan counts for them."""
    return (json.dumps(value, indent=2, sort_keys=sort_keys) + "\n").encode("utf-8")
