"""Provenance: what identifies a merge (`MergeIdentity`), the manifest written beside the shards
(`Manifest`), what differs between two identities (for refusing a resume), and whether a base already holds
this adapter.

The identity holds only what determines the output bytes (tool version, input files and sizes, the
adapter's SHA-256, resolved options) and nothing that varies between runs (no time, path, host or
user), so two merges of the same inputs write byte-identical folders, manifest included.

Each record has one `to_json` and one `from_json`. Reading is lenient about what a record lacks and strict
about what it holds: a field that is absent (or null) reads as not recorded (None, or empty), so a record
written by another version or edited by hand compares as different where it lacks something instead of
failing; a field of the wrong kind is a one-line FormatError naming the file and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from ..errors import AlreadyMergedError, FormatError
from ..files import ADAPTER_CONFIG, MANIFEST_NAME, MODEL_CONFIG, json_bytes, read_json
from ..inputs.checkpoint import HubOrigin
from ..inputs.digest import sha256_file
from ..version import VERSION
from .tokenizer import TokenizerRecord
from .tokenizer import identity as tokenizer_identity

if TYPE_CHECKING:  # for annotations only: the plan counts the manifest among the output's files
    from .plan import MergePlan

TOOL = "qwen-merge"
SHA256_PLACEHOLDER = "0" * 64  # a digest's length, for sizing the manifest before the digests exist
FileStat = tuple[int, ...]  # a base file's size, mtime (ns) and inode, as the resume state records them
R = TypeVar("R")


# -- reading records ----------------------------------------------------------------------------------------

class Kind(NamedTuple):
    """What a field must hold: in words (for the error), and the test."""

    text: str
    test: Callable[[object], bool]


def _is_int(value: object) -> bool:
    return type(value) is int  # JSON true and false are no sizes


STRING = Kind("a string", lambda v: isinstance(v, str))
INTEGER = Kind("an integer", _is_int)
OBJECT = Kind("an object", lambda v: isinstance(v, dict))
STRINGS = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
SIZES = Kind("an object of sizes (integers)", lambda v: isinstance(v, dict) and all(map(_is_int, v.values())))
DIGESTS = Kind("an object of SHA-256 strings",
               lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))
NUMBER = Kind("a number", lambda v: type(v) in (int, float))
OBJECTS = Kind("a list of objects", lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v))
PAIRS = Kind("a list of [from, to] pairs of strings",
             lambda v: isinstance(v, list) and all(isinstance(p, list) and len(p) == 2
                                                   and all(isinstance(x, str) for x in p) for p in v))


class Fields:
    """One JSON object of a record read from `path`, `where` its place in the file ("output.shards…"):
    each field comes back when it is of its kind, as None when it is absent or null, and is a FormatError
    naming the file and the field otherwise."""

    __slots__ = ("doc", "path", "where")

    def __init__(self, doc: Mapping, path: Path, where: str = "") -> None:
        self.doc, self.path, self.where = doc, path, where

    def get(self, key: str, kind: Kind) -> Any:
        return _checked(self.doc.get(key), kind, self.path, f"{self.where}{key}")

    def record(self, key: str, parse: Callable[[Mapping, Path, str], R]) -> R | None:
        """The record in the object at `key`, read by `parse` (a `from_json`); None when absent."""
        value = self.get(key, OBJECT)
        return None if value is None else parse(value, self.path, f"{self.where}{key}.")

    def section(self, key: str, parse: Callable[[Mapping, Path, str], R]) -> R:
        """`record`, for a part every record has: when absent, a record with nothing recorded."""
        return parse(self.get(key, OBJECT) or {}, self.path, f"{self.where}{key}.")

    def records(self, key: str, parse: Callable[[Mapping, Path, str], R]) -> dict[str, R]:
        """The records in the object at `key`, by name (the output's shards, those done)."""
        field = f"{self.where}{key}"
        return {name: parse(_checked(value, OBJECT, self.path, f'{field}["{name}"]') or {}, self.path,
                            f'{field}["{name}"].') for name, value in (self.get(key, OBJECT) or {}).items()}


def _checked(value: object, kind: Kind, path: Path, field: str) -> Any:
    if value is None or kind.test(value):
        return value
    shown = json.dumps(value)
    raise FormatError(f"{path}: field {field} must be {kind.text}, found {shown[:40]}{'…' * (len(shown) > 40)}; "
                      f"the file was edited or damaged: restore it as qwen-merge wrote it, or remove it")


# -- the records ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HubRecord:
    """A Hub input: its repo id and the commit it resolved to (not the branch name, which moves)."""

    repo: str | None
    commit: str | None

    def to_json(self) -> dict:
        return {"repo": self.repo, "commit": self.commit}

    @classmethod
    def from_json(cls, doc: Mapping, path: Path, where: str = "") -> HubRecord:
        read = Fields(doc, path, where)
        return cls(read.get("repo", STRING), read.get("commit", STRING))


@dataclass(frozen=True, slots=True)
class BaseRecord:
    """The base: each file's size by name, the adapters merged into it before (its own manifest's record,
    oldest first; None: not recorded), and its Hub origin (None: local files)."""

    files: dict[str, int]
    merged_adapters: tuple[str, ...] | None
    hub: HubRecord | None

    def to_json(self) -> dict:
        merged = list(self.merged_adapters) if self.merged_adapters is not None else None
        return {"files": dict(self.files), "merged_adapters": merged} | _hub_json(self.hub)

    @classmethod
    def from_json(cls, doc: Mapping, path: Path, where: str = "") -> BaseRecord:
        read = Fields(doc, path, where)
        merged = read.get("merged_adapters", STRINGS)
        return cls(read.get("files", SIZES) or {}, tuple(merged) if merged is not None else None,
                   read.record("hub", HubRecord.from_json))


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """The adapter: its weights file's SHA-256 and size, adapter_config.json's SHA-256, its Hub origin; and
    its weight, for one of several adapters merged as a weighted sum (None, and not written, otherwise)."""

    weights_sha256: str | None
    weights_size: int | None
    config_sha256: str | None
    hub: HubRecord | None
    weight: float | None = None

    def to_json(self) -> dict:
        weight = {"weight": self.weight} if self.weight is not None else {}
        return {"weights_sha256": self.weights_sha256, "weights_size": self.weights_size,
                "config_sha256": self.config_sha256} | _hub_json(self.hub) | weight

    @classmethod
    def from_json(cls, doc: Mapping, path: Path, where: str = "") -> AdapterRecord:
        read = Fields(doc, path, where)
        weight = read.get("weight", NUMBER)
        return cls(read.get("weights_sha256", STRING), read.get("weights_size", INTEGER),
                   read.get("config_sha256", STRING), read.record("hub", HubRecord.from_json),
                   float(weight) if weight is not None else None)


def _hub_json(hub: HubRecord | None) -> dict:
    return {"hub": hub.to_json()} if hub is not None else {}


@dataclass(frozen=True, slots=True)
class MergeIdentity:
    """Everything that determines the output bytes, and nothing else: the tool and its version, the base,
    the adapter, the options (`MergeOptions.identity()`: a tokenizer folder recorded as "folder") and the
    tokenizer files the output takes from the adapter or a folder (None: the base's). `adapters`: every
    adapter with its weight, in order, when several were merged as a weighted sum (`adapter` is then the
    first, without its weight); empty, and not written, for one adapter merged as it is."""

    tool: str | None
    version: str | None
    base: BaseRecord
    adapter: AdapterRecord
    options: dict[str, Any] | None
    tokenizer: TokenizerRecord | None
    adapters: tuple[AdapterRecord, ...] = ()

    def to_json(self) -> dict:
        ident = {"tool": self.tool, "version": self.version, "base": self.base.to_json(),
                 "adapter": self.adapter.to_json(), "options": self.options}
        if self.adapters:
            ident["adapters"] = [record.to_json() for record in self.adapters]
        if self.tokenizer is not None:  # absent when the output keeps the base's
            ident["tokenizer"] = {"source": self.tokenizer.source, "files": dict(self.tokenizer.files)}
        return ident

    @classmethod
    def from_json(cls, doc: Mapping, path: Path, where: str = "") -> MergeIdentity:
        read = Fields(doc, path, where)
        listed = read.get("adapters", OBJECTS) or []
        adapters = tuple(AdapterRecord.from_json(doc, path, f"{where}adapters[{k}].") for k, doc in enumerate(listed))
        return cls(read.get("tool", STRING), read.get("version", STRING), read.section("base", BaseRecord.from_json),
                   read.section("adapter", AdapterRecord.from_json), read.get("options", OBJECT),
                   read.record("tokenizer", _tokenizer_from_json), adapters)


def _tokenizer_from_json(doc: Mapping, path: Path, where: str) -> TokenizerRecord:
    read = Fields(doc, path, where)
    return TokenizerRecord(read.get("source", STRING), read.get("files", DIGESTS) or {})


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """An output shard as written: its SHA-256 and its size in bytes."""

    sha256: str | None
    size: int | None

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, doc: Mapping, path: Path, where: str = "") -> ShardRecord:
        read = Fields(doc, path, where)
        return cls(read.get("sha256", STRING), read.get("size", INTEGER))


@dataclass(frozen=True, slots=True)
class Manifest:
    """`qwen_merge.json`: the identity, the counts of tensors merged, otherwise computed and copied, every
    output shard by name, what was decided for tied embeddings (None: the base ties none) and the prefix
    renames applied to the adapter's names."""

    identity: MergeIdentity
    merged: int | None
    other_ops: int | None
    copied: int | None
    shards: dict[str, ShardRecord]
    tie: str | None
    renames: tuple[tuple[str, str], ...]

    def to_json(self) -> dict:
        counts = {"merged": self.merged, "other_ops": self.other_ops, "copied": self.copied}
        shards = {name: shard.to_json() for name, shard in self.shards.items()}
        return {**self.identity.to_json(), "counts": counts,
                "output": {"shards": shards, "tie": self.tie, "renames": [list(r) for r in self.renames]}}

    @classmethod
    def from_json(cls, doc: Mapping, path: Path, where: str = "") -> Manifest:
        """The manifest `doc` read from `path`.

        Raises:
            FormatError: a field holds a value of the wrong kind (named, with the file)."""
        read = Fields(doc, path, where)
        counts, output = read.section("counts", Fields), read.section("output", Fields)
        return cls(MergeIdentity.from_json(doc, path, where), counts.get("merged", INTEGER),
                   counts.get("other_ops", INTEGER), counts.get("copied", INTEGER),
                   output.records("shards", ShardRecord.from_json), output.get("tie", STRING),
                   tuple(tuple(r) for r in output.get("renames", PAIRS) or ()))


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of a folder qwen-merge wrote (None: it has none).

    Raises:
        FormatError: it is not valid JSON, or a field holds a value of the wrong kind."""
    path = folder / MANIFEST_NAME
    return Manifest.from_json(read_json(path, MANIFEST_NAME), path) if path.is_file() else None


# -- a merge's identity and manifest -------------------------------------------------------------------------

def identity(plan: MergePlan, digest: Callable[[Path], str] = sha256_file) -> MergeIdentity:
    """Everything that determines the output bytes, and nothing else; `digest` hashes the input files it
    names by content (a run passes its `Hashes.sha256`, which returns a hash started early)."""
    return _identity(plan, digest)


def _identity(plan: MergePlan, digest: Callable[[Path], str]) -> MergeIdentity:
    """The identity, with the input files it names by content hashed by `digest`."""
    base, adapter = plan.base, plan.adapter
    files = {s.path.name: s.size for s in base.shards} | {p.name: base.file_size(p) for p in base.side_files}
    adapters = tuple(_adapter_record(one, digest, weight) for one, weight in zip(plan.adapters, plan.weights))
    return MergeIdentity(
        TOOL, VERSION, BaseRecord(files, previous_adapters(base.root), _hub(base.hub)),
        _adapter_record(adapter, digest), plan.options.identity(),
        tokenizer_identity(plan.tokenizer, digest), adapters)  # the adapter's or a folder's tokenizer files it takes


def _adapter_record(adapter, digest: Callable[[Path], str], weight: float | None = None) -> AdapterRecord:
    return AdapterRecord(digest(adapter.file.path), adapter.file.size, digest(adapter.root / ADAPTER_CONFIG),
                         _hub(adapter.hub), weight)


def _hub(origin: HubOrigin | None) -> HubRecord | None:
    """A Hub input is identified by repo and resolved commit (not the branch name, which moves)."""
    return HubRecord(origin.repo_id, origin.commit) if origin is not None else None


def base_file_stats(plan: MergePlan) -> dict[str, FileStat]:
    """Size, mtime and inode of every base file: kept in the resume state only (they vary between
    copies of the same model, so they stay out of the manifest). A Hub base has none: its commit is in
    the identity, and its files appear in the cache as the merge goes."""
    if plan.base.hub is not None:
        return {}
    files = [s.path for s in plan.base.shards] + list(plan.base.side_files)
    return {p.name: ((st := p.stat()).st_size, st.st_mtime_ns, st.st_ino) for p in files}


def previous_adapters(folder: Path) -> tuple[str, ...]:
    """Adapter weight hashes already merged into a checkpoint made by qwen-merge (oldest first)."""
    found = read_manifest(folder)
    if found is None:
        return ()
    merged = found.identity.adapters or (found.identity.adapter,)
    return (*(found.identity.base.merged_adapters or ()), *(record.weights_sha256 or "?" for record in merged))


def check_not_merged_twice(ident: MergeIdentity, base: Path, force: bool) -> None:
    """Refuse to merge an adapter into a checkpoint that already contains it (unsloth #3633)."""
    merged = ident.base.merged_adapters or ()
    sha256 = next((r.weights_sha256 for r in ident.adapters or (ident.adapter,) if r.weights_sha256 in merged), None)
    if force or sha256 is None:
        return
    raise AlreadyMergedError(f"{base / MANIFEST_NAME}: this base was already merged with this adapter "
                        f"(sha256 {sha256[:12]}…); merging again applies the delta "
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
    digests = {shard.name: ShardRecord(SHA256_PLACEHOLDER, shard.size) for shard in plan.shards}
    sized = manifest(_identity(plan, lambda path: SHA256_PLACEHOLDER), plan, digests)  # no file read to size it
    files[MANIFEST_NAME] = len(json_bytes(sized.to_json(), sort_keys=True))  # as write_json_atomic writes it
    return files


def recorded_options(folder: Path) -> dict | None:
    """The options a merged folder's manifest records (`MergeOptions.identity()`), or None when it has no
    manifest or the manifest records none.

    Raises:
        FormatError: the manifest is not valid JSON, or a field holds a value of the wrong kind.
    """
    found = read_manifest(folder)
    return found.identity.options if found is not None else None


def manifest(ident: MergeIdentity, plan: MergePlan, shards: Mapping[str, ShardRecord]) -> Manifest:
    """The manifest of `plan`'s output, its shards written as `shards` say."""
    tie = str(plan.tie) if plan.tie is not None else None
    return Manifest(ident, len(plan.merges), len(plan.ops) - len(plan.merges), plan.copied, dict(shards), tie,
                    tuple(tuple(r) for r in plan.renames))


# -- what differs ---------------------------------------------------------------------------------------------

def differences(old: MergeIdentity, new: MergeIdentity, old_stats: Mapping[str, FileStat] | None = None,
                new_stats: Mapping[str, FileStat] | None = None) -> list[str]:
    """What differs between a recorded identity (a manifest's, or a resume state's with its base file stats)
    and this run's, one short phrase each: tool version, options, Hub origins, base files, adapter, tokenizer."""
    old_stats, new_stats = dict(old_stats or {}), dict(new_stats or {})
    changes = []
    if old.version != new.version:
        changes.append(f"qwen-merge version changed: {old.version!r} -> {new.version!r}")
    old_options, new_options = old.options or {}, new.options or {}
    changes += [f"option {key} changed: {old_options.get(key)!r} -> {new_options.get(key)!r}"
                for key in sorted(old_options.keys() | new_options.keys())
                if old_options.get(key) != new_options.get(key)]
    for role, was, now in (("base", old.base.hub, new.base.hub), ("adapter", old.adapter.hub, new.adapter.hub)):
        if was != now:
            changes.append(f"{role} {_hub_text(was)} -> {_hub_text(now)}")
    changes += _base_changes(old.base, new.base, old_stats, new_stats) + _adapter_changes(old.adapter, new.adapter)
    if old.adapters != new.adapters:
        changes.append(f"the adapters or their weights changed ({_weights_text(old)} -> {_weights_text(new)})")
    if old.tokenizer != new.tokenizer:
        changes.append("the tokenizer files the output takes changed")
    if not changes and (old, old_stats) != (new, new_stats):  # a field no phrase describes (the tool's name)
        changes.append("the recorded identity differs")
    return changes


def _weights_text(ident: MergeIdentity) -> str:
    if not ident.adapters:
        return "one adapter"
    weights = ", ".join("?" if r.weight is None else f"{r.weight:g}" for r in ident.adapters)
    return f"{len(ident.adapters)} adapters, weights {weights}"


def _hub_text(hub: HubRecord | None) -> str:
    return f"Hub repo {hub.repo} at commit {str(hub.commit)[:12]}" if hub is not None else "local files"


def _base_changes(old: BaseRecord, new: BaseRecord, old_stats: Mapping[str, FileStat],
                  new_stats: Mapping[str, FileStat], shown: int = 3) -> list[str]:
    old_files, new_files = _base_facts(old, old_stats), _base_facts(new, new_stats)
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
    if old.merged_adapters != new.merged_adapters:
        changes.append("the base's record of adapters merged into it changed")
    return changes


def _base_facts(base: BaseRecord, stats: Mapping[str, FileStat]) -> dict[str, dict]:
    """name -> size (from the identity), and mtime and inode (from a resume state's base file stats)."""
    facts = {name: {"size": size} for name, size in base.files.items()}
    for name, stat in stats.items():
        facts.setdefault(name, {}).update(zip(("size", "mtime", "inode"), stat, strict=False))
    return facts


def _adapter_changes(old: AdapterRecord, new: AdapterRecord) -> list[str]:
    changes = []
    if (old.weights_sha256, old.weights_size) != (new.weights_sha256, new.weights_size):
        changes.append(f"adapter weights changed (sha256 {str(old.weights_sha256)[:12]}… -> "
                       f"{str(new.weights_sha256)[:12]}…)")
    if old.config_sha256 != new.config_sha256:
        changes.append("adapter_config.json changed")
    return changes
