"""The base model an adapter names: `base_model_name_or_path` (and `revision`) in its adapter_config.json.

PEFT writes there the name or path of the model the adapter was trained on. A merge does not depend on
it (trainers write local paths and 4-bit repo names there), but it is what BASE should be: `base_of` takes
BASE from it when BASE is omitted, as PEFT's `AutoPeftModelForCausalLM.from_pretrained(adapter)` does,
and `base_note` says in one line when it names another model than BASE.

The field names the same model as BASE (no note) when
* both are the same path (a single `.safetensors` BASE counts as its folder);
* both are the same Hub repo id (letter case aside), or BASE is a snapshot in the Hugging Face cache
  (`models--org--name/snapshots/<commit>`) of that repo;
* the field's last component is BASE's folder or repo name (letter case aside): a local copy, such as
  `hf download Qwen/Qwen3-8B --local-dir Qwen3-8B`, or the same path on the training machine.
With a quantization suffix (`-bnb-4bit`, `-4bit`, `-8bit`, `-GPTQ`, `-AWQ`, `-FP8`, …) removed, a field
that names BASE so names a quantized copy of it (QLoRA trains on those): the note says so. Anything else
is another model, named in the note. A `revision` is compared with a Hub BASE's revision and commit.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

from ..errors import AdapterError, HubError, QwenMergeError
from ..files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_json
from . import hub
from .adapter import config_path
from .checkpoint import Checkpoint

FIELD = "base_model_name_or_path"
QUANTIZED = re.compile(r"(?:-unsloth)?(?:-bnb)?-[48]bit$|-(?:gptq|awq)(?:-int[48])?$|-fp8(?:-dynamic)?$",
                       re.IGNORECASE)


def base_of(adapter: str | os.PathLike) -> str:
    """The BASE an adapter names: its `base_model_name_or_path`, with `@revision` when the config has a
    `revision` and the name is a Hub repo id — the string `plan_merge(None, adapter)` and
    `merge_shards(None, adapter, output)` use as BASE.

    Args:
        adapter: a PEFT adapter folder, or a Hub repo id holding one (its adapter_config.json is fetched).

    Raises:
        AdapterError: no adapter there, or its config names no usable base (missing, empty, or neither an
            existing path nor a Hub repo id).
        HubError: a Hub adapter cannot be resolved or lacks adapter_config.json.

    Example:
        >>> base_of("my-lora")   # doctest: +SKIP
        'Qwen/Qwen3-4B'
    """
    if (ref := hub.repo_ref(adapter)) is None:
        path = config_path(adapter)
    else:
        origin = hub.resolve(ref)
        if ADAPTER_CONFIG not in origin.sizes:
            raise HubError(f"{origin}: not a PEFT adapter: the repo has no {ADAPTER_CONFIG} at commit "
                           f"{origin.commit[:12]}")
        path = hub.fetch(origin, ADAPTER_CONFIG)
    return base_from_config(read_json(path, ADAPTER_CONFIG), path)


def may_be_adapter(value: str | os.PathLike) -> bool:
    """Whether `value` names an adapter: a folder with adapter_config.json, one of its two files, or a
    Hub repo id (only the Hub can tell what it holds)."""
    path = Path(value)
    if (path / ADAPTER_CONFIG).is_file() or (path.is_file() and path.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)):
        return True
    return hub.repo_ref(value) is not None


def base_from_config(config: dict, path: Path) -> str:
    """`base_of` for an adapter config already read from `path`.

    Raises:
        AdapterError: the field is missing or empty, or names neither an existing path nor a Hub repo id.
    """
    name = config.get(FIELD)
    if not isinstance(name, str) or not name.strip():
        state = "missing" if name is None else "empty" if isinstance(name, str) else f"{name!r}, not a name"
        raise AdapterError(f"{path}: {FIELD} is {state}, so BASE cannot be taken from it; give BASE before "
                           f"ADAPTER (qwen-merge merge BASE ADAPTER OUT; merge_shards(base, adapter, output))")
    if os.path.exists(name):
        return name
    if hub.repo_ref(name) is None:
        raise AdapterError(f"{path}: {FIELD} {name!r} is neither a file or folder here ({Path.cwd()}) nor a "
                           f"Hub repo id (org/name); give BASE before ADAPTER (qwen-merge merge BASE ADAPTER "
                           f"OUT; merge_shards(base, adapter, output))")
    revision = config.get("revision")
    return f"{name}@{revision}" if isinstance(revision, str) and revision and "@" not in name else name


def named_by_adapter(error: QwenMergeError, path: Path) -> QwenMergeError:
    """`error`, about a BASE taken from the adapter's config, saying where that BASE came from."""
    said = copy.copy(error)
    said.args = (f"{error} (BASE taken from {FIELD} in {path}; give BASE before ADAPTER to use another)",)
    return said


def base_note(config: dict, base: Checkpoint) -> str | None:
    """One line when the adapter's config names another model than `base` (see the module docstring for
    what counts as the same), else None."""
    named = config.get(FIELD)
    if not isinstance(named, str) or not named.strip():
        return None
    ids, names = _names(base)
    last = _last(named)
    if _same_path(named, base) or named.lower() in ids or last in names:
        return _revision_note(named, config.get("revision"), base)
    if QUANTIZED.search(last) and QUANTIZED.sub("", last) in names:
        return (f"the adapter was trained on {named} ({FIELD} in {ADAPTER_CONFIG}), a quantized copy of BASE; its "
                f"merge into BASE's unquantized weights is the usual way")
    return f"the adapter was trained on {named} ({FIELD} in {ADAPTER_CONFIG}), another model than BASE {_shown(base)}"


def _names(base: Checkpoint) -> tuple[set[str], set[str]]:
    """The Hub repo ids BASE is (lower case), and its folder or repo names."""
    if base.hub is not None:
        repo = base.hub.repo_id
    else:
        snapshots = base.root.parent
        cached = snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--")
        repo = snapshots.parent.name[len("models--"):].replace("--", "/") if cached else None
    ids = {repo.lower()} if repo else set()
    names = {_last(repo)} if repo else set()
    if base.hub is None:
        names.add(base.root.resolve().name.lower())
    return ids, names


def _last(name: str) -> str:
    return re.split(r"[/\\]", name.rstrip("/\\"))[-1].lower()


def _same_path(named: str, base: Checkpoint) -> bool:
    path = Path(named).expanduser()
    if base.hub is not None or not path.exists():
        return False
    folder = path.parent if path.is_file() else path
    return folder.resolve() == base.root.resolve()


def _revision_note(named: str, revision: object, base: Checkpoint) -> str | None:
    if not isinstance(revision, str) or not revision or base.hub is None:
        return None
    if revision in (base.hub.revision or "main", base.hub.commit) or (len(revision) >= 7
                                                                      and base.hub.commit.startswith(revision)):
        return None
    return (f"the adapter was trained on {named} at revision {revision} ({ADAPTER_CONFIG}); BASE is commit "
            f"{base.hub.commit[:12]}")


def _shown(base: Checkpoint) -> str:
    return str(base.hub) if base.hub is not None else str(base.root)


def combined_notes(adapters: list[tuple[dict, Path]], base: Checkpoint) -> tuple[str, ...]:
    """For several adapters (each its config and the path of its adapter_config.json): a note for each that
    names another model than `base` (as `base_note`), and one when their names differ from each other in a
    way that may still be one model (local paths, copies under other names).

    Raises:
        AdapterError: two adapters name Hub repos of different models (their repo names differ, a
            quantization suffix aside): deltas trained on different models do not add up.
    """
    named = [(config.get(FIELD).strip(), path) for config, path in adapters
             if isinstance(config.get(FIELD), str) and config.get(FIELD).strip()]
    repos: dict[str, tuple[str, Path]] = {}
    for name, path in named:
        if not os.path.exists(name) and hub.repo_ref(name) is not None:
            repos.setdefault(_model(name), (name, path))
    if len(repos) > 1:
        (first, first_path), (second, second_path) = list(repos.values())[:2]
        raise AdapterError(f"{first_path} names the base model {first} and {second_path} names {second} ({FIELD}): "
                           f"adapters trained on different models do not add up; combine adapters of one base model")
    notes = [f"{path.parent}: {note}" for config, path in adapters if (note := base_note(config, base))]
    if len({_model(name) for name, _ in named}) > 1:
        shown = ", ".join(dict.fromkeys(name for name, _ in named))
        notes.append(f"the adapters name different base models ({FIELD}: {shown}); combined deltas are only "
                     f"meaningful when all were trained on BASE")
    return tuple(notes)


def _model(name: str) -> str:
    """A model's name without its owner, path or quantization suffix, in lower case."""
    return QUANTIZED.sub("", _last(name))
