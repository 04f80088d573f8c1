"""A base model on disk: one safetensors file, or an HF index plus shards, plus its other files.

Only headers and JSON are read here. The result says which tensor lives in which shard, in the
order the output will be written, and which side files (config, tokenizer, ...) travel along.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import FormatError
from ..files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INDEX_NAME, MANIFEST_NAME, MODEL_CONFIG, SINGLE_NAME, read_json
from .tensorfile import TensorEntry, TensorFile, read_header

ADAPTER_NAMES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)  # what marks a PEFT adapter given as BASE
# Weights in other formats would sit beside the merged safetensors unmerged: never copy them.
STALE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".safetensors")


@dataclass(frozen=True, slots=True)
class HubOrigin:
    """A checkpoint or adapter from the Hugging Face Hub: `revision` as asked (None: the default branch),
    the `commit` it resolved to, the cache's snapshot `folder` where each file is (or will be, once
    downloaded), every file's size at that commit, and the files already in the cache before this run."""

    repo_id: str
    revision: str | None
    commit: str
    folder: Path
    sizes: dict[str, int]
    cached: frozenset[str]
    offline: bool = False  # resolved from the cache alone: `sizes` lists only the cached files

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A base checkpoint. `shards` are in output order; `weight_map` maps tensor name -> shard file name."""

    root: Path
    shards: tuple[TensorFile, ...]
    weight_map: dict[str, str]
    index_name: str | None
    index_metadata: dict
    side_files: tuple[Path, ...]
    skipped: tuple[str, ...]
    config: dict | None
    hub: HubOrigin | None = None  # set when the checkpoint comes from the Hub (its shards may not be cached yet)

    def file_size(self, path: Path) -> int:
        """The size of one of its files (a Hub file's from the repo listing: it may not be cached yet)."""
        return self.hub.sizes[path.name] if self.hub is not None else path.stat().st_size

    def entries(self) -> dict[str, TensorEntry]:
        return {e.name: e for shard in self.shards for e in shard.entries}

    def locations(self) -> dict[str, tuple[TensorFile, TensorEntry]]:
        """tensor name -> (its shard, its entry), built in one pass."""
        return {e.name: (shard, e) for shard in self.shards for e in shard.entries}


def open_checkpoint(base: str | os.PathLike) -> Checkpoint:
    """Open a model folder, an index file or a single `.safetensors` file, reading headers only.

    Raises:
        FormatError: missing files, an inconsistent index, or an invalid header.
    """
    path = Path(base)
    if not path.exists():
        raise FormatError(f"{path}: base model not found: {no_such_path(path)}")
    if path.is_file() and path.name.endswith(".safetensors"):
        _refuse_adapter(path.parent, [path])
        _refuse_one_shard(path)
        # The config and tokenizer beside the file travel as they do for a folder: without config.json
        # transformers cannot load the output.
        return _assemble(path.parent, (read_header(path),), None, {}, side_files=True)
    root, index_path = _locate(path)
    if index_path is None:
        single = root / SINGLE_NAME if (root / SINGLE_NAME).is_file() else _only_safetensors(root)
        return _assemble(root, (read_header(_inside(root, single)),), None, {}, side_files=True)
    weight_map, metadata = read_index(index_path)
    shards = tuple(read_header(_inside(root, root / name)) for name in sorted(set(weight_map.values())))
    stored = check_index_matches(index_path, weight_map, shards)
    return _assemble(root, shards, index_path.name, metadata, side_files=True, weight_map=stored)


def no_such_path(path: Path) -> str:
    """"no such file or folder", and for a relative path the directory it was looked for in."""
    return "no such file or folder" + ("" if path.is_absolute() else f" in {Path.cwd()}")


def _inside(root: Path, path: Path) -> Path:
    """Refuse a shard that is a link to somewhere outside the model folder. The one layout allowed is the
    Hugging Face cache's: `<repo>/snapshots/<rev>/x.safetensors -> ../../blobs/<hash>`."""
    target, folder = path.resolve(), root.resolve()
    if folder in target.parents:
        return path
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").resolve() in target.parents:
        return path
    raise FormatError(f"{path}: shard links to {target}, outside the model folder {root}; copy the file in "
                      f"or merge from the folder it lives in")


def _locate(path: Path) -> tuple[Path, Path | None]:
    if path.is_file():
        if path.name.endswith(".index.json"):
            return path.parent, path
        _refuse_adapter(path.parent, [path])
        raise FormatError(f"{path}: expected a model folder, a .safetensors file or a .safetensors.index.json")
    if (path / INDEX_NAME).is_file():
        return path, path / INDEX_NAME
    if (path / SINGLE_NAME).is_file():
        return path, None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return path, indexes[0]
    _refuse_adapter(path, sorted(path.glob("*.safetensors")))
    return path, None


def _refuse_adapter(folder: Path, weights: list[Path]) -> None:
    """An adapter given as BASE would otherwise be read as a one-file model (adapter_model.safetensors) and
    fail later on a misleading mismatch. A model folder that also holds an adapter_config.json has weights
    of its own and is not refused."""
    if (folder / ADAPTER_NAMES[0]).is_file() and all(w.name in ADAPTER_NAMES for w in weights):
        raise FormatError(f"{folder}: expected a base model, found a PEFT adapter ({ADAPTER_NAMES[0]}); BASE and "
                          f"ADAPTER look swapped: give the base model first, the adapter second (BASE ADAPTER [OUT])")


def _refuse_one_shard(path: Path) -> None:
    """One shard of a sharded model is only part of it. A file that no index beside it lists together with
    other shards (a single-file model, a consolidated copy) is a whole model and is accepted."""
    for index_path in sorted(path.parent.glob("*.safetensors.index.json")):
        try:
            weight_map = read_json(index_path, "index").get("weight_map")
        except FormatError:
            continue  # an unreadable index beside a whole file says nothing about that file
        files = {f for f in weight_map.values() if isinstance(f, str)} if isinstance(weight_map, dict) else set()
        if path.name in files and len(files) > 1:
            raise FormatError(f"{path}: expected a whole model, found one of the {len(files)} shards listed in "
                              f"{index_path.name}; pass the model folder {path.parent} as BASE instead")


def _only_safetensors(root: Path) -> Path:
    files = sorted(root.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise FormatError(f"{root}: expected {SINGLE_NAME} or {INDEX_NAME}; safetensors files found: {found}")
    return files[0]


def read_index(index_path: Path, listed: Callable[[str], bool] | None = None) -> tuple[dict[str, str], dict]:
    """The weight map and metadata of an HF index, each shard name checked: a plain `.safetensors` name
    that exists beside the index (or, for a Hub repo, that `listed` says the repo has)."""
    index = read_json(index_path, "index")
    weight_map, metadata = index.get("weight_map"), index.get("metadata", {})
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index_path}: 'weight_map' must be a non-empty object of tensor -> shard file")
    if not isinstance(metadata, dict):
        raise FormatError(f"{index_path}: 'metadata' must be an object, found {type(metadata).__name__}")
    try:
        shards = set(weight_map.values())  # thousands of tensors name a few shards: check each name once
    except TypeError:  # a list or an object where a file name belongs
        shards = list(weight_map.values())
    for shard in shards:
        if (problem := _shard_name_problem(index_path, shard, listed)) is not None:
            tensor = next(t for t, s in weight_map.items() if s == shard)
            raise FormatError(f"{index_path}: weight_map[{tensor!r}] {problem}")
    return dict(weight_map), dict(metadata)


def _shard_name_problem(index_path: Path, shard: object, listed: Callable[[str], bool] | None) -> str | None:
    if not isinstance(shard, str):
        return f"must be a file name, found {shard!r}"
    plain = PurePosixPath(shard).name == shard and PureWindowsPath(shard).name == shard
    if not plain or shard in (".", "..") or not shard.endswith(".safetensors"):
        return f"= {shard!r} is not a plain .safetensors file name inside the model folder"
    if not (listed(shard) if listed is not None else (index_path.parent / shard).is_file()):
        return f"names {shard!r}, which does not exist"
    return None


def stored_map(shards: tuple[TensorFile, ...]) -> dict[str, str]:
    """Tensor name -> the shard file holding it, as the headers say."""
    found: dict[str, str] = {}
    for shard in shards:
        found.update(dict.fromkeys((e.name for e in shard.entries), shard.path.name))
    return found


def check_index_matches(index_path: Path, weight_map: dict[str, str], shards: tuple[TensorFile, ...]
                        ) -> dict[str, str]:
    """The tensor -> shard map the headers give (`stored_map`), once it is checked to be the index's."""
    stored = stored_map(shards)
    if stored == weight_map and len(stored) == sum(len(shard.entries) for shard in shards):
        return stored  # the common case, at the speed of a dict comparison; otherwise find the first difference
    seen: dict[str, str] = {}
    for shard in shards:
        file = shard.path.name
        for e in shard.entries:
            if e.name in seen:
                raise FormatError(f"{shard.path}: tensor {e.name!r} is also stored in {seen[e.name]}")
            seen[e.name] = file
            if weight_map.get(e.name) != file:
                raise FormatError(f"{index_path}: tensor {e.name!r} is stored in {file} "
                                  f"but the index says {weight_map.get(e.name)!r}")
    missing = [t for t in weight_map if t not in seen]
    if missing:
        raise FormatError(f"{index_path}: tensor {missing[0]!r} is listed for {weight_map[missing[0]]} "
                          f"but that shard does not contain it ({len(missing)} such tensors)")
    return stored


def _assemble(root: Path, shards: tuple[TensorFile, ...], index_name: str | None, metadata: dict,
              *, side_files: bool, weight_map: dict[str, str] | None = None) -> Checkpoint:
    weight_map = stored_map(shards) if weight_map is None else weight_map
    if len(weight_map) != sum(len(s.entries) for s in shards):
        raise FormatError(f"{root}: a tensor name appears in more than one shard")
    used = {s.path.name for s in shards} | {index_name, MANIFEST_NAME}
    files, skipped = _side_files(root, used) if side_files else ((), ())
    config_path = root / MODEL_CONFIG
    config = read_json(config_path, MODEL_CONFIG) if config_path.is_file() else None
    return Checkpoint(root, shards, weight_map, index_name, metadata, files, skipped, config)


def is_side_file(name: str) -> bool:
    """A file that travels with the merged weights (config, tokenizer, ...): not hidden, not weights in
    another format or shards the output replaces, not an index of other weights (it would point at files
    that are not copied)."""
    return not name.startswith(".") and not name.endswith(STALE_WEIGHT_SUFFIXES + (".index.json",))


def _side_files(root: Path, used: set[str | None]) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """Regular top-level files to copy (config, tokenizer, ...) and names deliberately left behind."""
    keep, skip = [], []
    for entry in sorted(root.iterdir()):
        if entry.name in used or entry.name.startswith("."):
            continue
        if entry.is_file() and is_side_file(entry.name):
            keep.append(entry)
        else:
            skip.append(entry.name + ("/" if entry.is_dir() else ""))
    return tuple(keep), tuple(skip)
