"""Provenance: what identifies a merge, the manifest written beside the shards, what differs between two
identities (for refusing a resume), and whether a destination already holds this very merge.

The identity holds only what determines the output bytes (tool version, input files and sizes, the
adapter's SHA-256, resolved options) and nothing that varies between runs (no time, path, host or
user), so two merges of the same inputs write byte-identical folders, manifest included.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AlreadyMergedError
from ..files import ADAPTER_CONFIG, MANIFEST_NAME, MODEL_CONFIG, json_bytes, read_json
from ..inputs.checkpoint import HubOrigin
from ..inputs.digest import sha256_file
from ..version import VERSION
from .tokenizer import identity as tokenizer_identity

if TYPE_CHECKING:  # for annotations only: the plan counts the manifest among the output's files
    from .plan import MergePlan

SHA256_PLACEHOLDER = "0" * 64  # a digest's length, for sizing the manifest before the digests exist


def identity(plan: MergePlan, digest: Callable[[Path], str] = sha256_file) -> dict:
    """Everything that determines the output bytes, and nothing else; `digest` hashes the input files it
    names by content (a run passes its `Hashes.sha256`, which returns a hash started early)."""
    return _identity(plan, digest)


def _identity(plan: MergePlan, digest: Callable[[Path], str]) -> dict:
    """The identity, with the input files it names by content hashed by `digest`."""
    base, adapter = plan.base, plan.adapter
    return {
        "tool": "qwen-merge",
        "version": VERSION,
        "base": {"files": {s.path.name: s.size for s in base.shards}
                 | {p.name: base.file_size(p) for p in base.side_files},
                 "merged_adapters": previous_adapters(base.root)} | _hub(base.hub),
        "adapter": {"weights_sha256": digest(adapter.file.path), "weights_size": adapter.file.size,
                    "config_sha256": digest(adapter.root / ADAPTER_CONFIG)} | _hub(adapter.hub),
        "options": plan.options.identity(),
    } | tokenizer_identity(plan.tokenizer, digest)  # the adapter's or a folder's tokenizer files it takes


def _hub(origin: HubOrigin | None) -> dict:
    """A Hub input is identified by repo and resolved commit (not the branch name, which moves)."""
    return {"hub": {"repo": origin.repo_id, "commit": origin.commit}} if origin is not None else {}


def base_file_stats(plan: MergePlan) -> dict[str, list[int]]:
    """Size, mtime and inode of every base file: kept in the resume state only (they vary between
    copies of the same model, so they stay out of the manifest). A Hub base has none: its commit is in
    the identity, and its files appear in the cache as the merge goes."""
    if plan.base.hub is not None:
        return {}
    files = [s.path for s in plan.base.shards] + list(plan.base.side_files)
    return {p.name: [(st := p.stat()).st_size, st.st_mtime_ns, st.st_ino] for p in files}


def previous_adapters(folder: Path) -> list[str]:
    """Adapter weight hashes already merged into a checkpoint made by qwen-merge (oldest first)."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return []
    found = read_json(path, MANIFEST_NAME)
    earlier = found.get("base", {}).get("merged_adapters", [])
    return [*earlier, found.get("adapter", {}).get("weights_sha256", "?")]


def check_not_merged_twice(ident: dict, base: Path, force: bool) -> None:
    """Refuse to merge an adapter into a checkpoint that already contains it (unsloth #3633)."""
    if force or ident["adapter"]["weights_sha256"] not in ident["base"]["merged_adapters"]:
        return
    raise AlreadyMergedError(f"{base / MANIFEST_NAME}: this base was already merged with this adapter "
                        f"(sha256 {ident['adapter']['weights_sha256'][:12]}…); merging again applies the delta "
                        f"twice. Pass force=True (--force) if that is really wanted")


def check_plan_not_merged_twice(plan: MergePlan, force: bool) -> None:
    """`check_not_merged_twice` for a plan: the adapter is hashed only when the base records merged
    adapters, so planning a merge into a checkpoint without a manifest reads no adapter bytes."""
    if not force and previous_adapters(plan.base.root):
        check_not_merged_twice(identity(plan), plan.base.root, force)


def output_files(plan: MergePlan) -> dict[str, int]:
    """Every file `merge_shards` writes into the output folder and its size in bytes, in writing order:
    the shards, the side files (config.json as the plan rewrites it; the chosen tokenizer's), the index, and the
    manifest. The manifest's size is known before its digests are, as a SHA-256 has a fixed length."""
    files = {shard.name: shard.size for shard in plan.shards}
    for side in plan.side_files:
        rewritten = side.name == MODEL_CONFIG and plan.config is not None
        files[side.name] = len(json_bytes(plan.config)) if rewritten else plan.side_file_size(side)
    if plan.index_name:
        files[plan.index_name] = len(plan.index_json)
    digests = {shard.name: {"sha256": SHA256_PLACEHOLDER, "size": shard.size} for shard in plan.shards}
    sized = manifest(_identity(plan, lambda path: SHA256_PLACEHOLDER), plan, digests)  # no file read to size it
    files[MANIFEST_NAME] = len(json_bytes(sized, sort_keys=True))  # as write_json_atomic writes it
    return files


def recorded_options(folder: Path) -> dict | None:
    """The options a merged folder's manifest records (`MergeOptions.identity()`), or None when it has no
    manifest or the manifest records none.

    Raises:
        FormatError: the manifest is not valid JSON.
    """
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    options = read_json(path, MANIFEST_NAME).get("options")
    return options if isinstance(options, dict) else None


def manifest(ident: dict, plan: MergePlan, shards: dict[str, dict]) -> dict:
    counts = {"merged": len(plan.merges), "other_ops": len(plan.ops) - len(plan.merges), "copied": plan.copied}
    tie = str(plan.tie) if plan.tie is not None else None
    return {**ident, "counts": counts, "output": {"shards": shards, "tie": tie,
                                                   "renames": [list(r) for r in plan.renames]}}


def differences(old: dict, new: dict) -> list[str]:
    """What differs between a recorded identity (a manifest's, or a resume state's with `base_files`) and
    this run's, one short phrase each: tool version, options, base files, adapter."""
    changes = []
    if old.get("version") != new.get("version"):
        changes.append(f"qwen-merge version changed: {old.get('version')!r} -> {new.get('version')!r}")
    old_options, new_options = old.get("options") or {}, new.get("options") or {}
    changes += [f"option {key} changed: {old_options.get(key)!r} -> {new_options.get(key)!r}"
                for key in sorted(old_options.keys() | new_options.keys())
                if old_options.get(key) != new_options.get(key)]
    for role in ("base", "adapter"):
        was, now = (old.get(role) or {}).get("hub"), (new.get(role) or {}).get("hub")
        if was != now:
            changes.append(f"{role} {_hub_text(was)} -> {_hub_text(now)}")
    changes += _base_changes(old, new) + _adapter_changes(old.get("adapter") or {}, new.get("adapter") or {})
    if old.get("tokenizer") != new.get("tokenizer"):
        changes.append("the tokenizer files the output takes changed")
    if not changes and old != new:  # a field this version does not describe (a record from another version)
        changes.append("the recorded identity differs")
    return changes


def _hub_text(hub: dict | None) -> str:
    return f"Hub repo {hub.get('repo')} at commit {str(hub.get('commit'))[:12]}" if hub else "local files"


def _base_changes(old: dict, new: dict, shown: int = 3) -> list[str]:
    old_files, new_files = _base_facts(old), _base_facts(new)
    changes = []
    for name in sorted(old_files.keys() | new_files.keys()):
        if name not in new_files:
            changes.append(f"base file {name} is gone")
        elif name not in old_files:
            changes.append(f"base file {name} is new")
        elif what := [k for k in ("size", "mtime", "inode") if old_files[name].get(k) != new_files[name].get(k)]:
            changes.append(f"base file {name} changed ({', '.join(what)})")
    if len(changes) > shown:  # a whole other model: a few names say enough, and the message stays one line
        changes[shown:] = [f"{len(changes) - shown} more base files differ"]
    if (old.get("base") or {}).get("merged_adapters") != (new.get("base") or {}).get("merged_adapters"):
        changes.append("the base's record of adapters merged into it changed")
    return changes


def _base_facts(ident: dict) -> dict[str, dict]:
    """name -> size (from the identity), and mtime and inode (from a resume state's `base_files`)."""
    facts = {name: {"size": size} for name, size in ((ident.get("base") or {}).get("files") or {}).items()}
    for name, stat in (ident.get("base_files") or {}).items():
        facts.setdefault(name, {}).update(zip(("size", "mtime", "inode"), stat, strict=False))
    return facts


def _adapter_changes(old: dict, new: dict) -> list[str]:
    changes = []
    if (old.get("weights_sha256"), old.get("weights_size")) != (new.get("weights_sha256"), new.get("weights_size")):
        changes.append(f"adapter weights changed (sha256 {str(old.get('weights_sha256'))[:12]}… -> "
                       f"{str(new.get('weights_sha256'))[:12]}…)")
    if old.get("config_sha256") != new.get("config_sha256"):
        changes.append("adapter_config.json changed")
    return changes
