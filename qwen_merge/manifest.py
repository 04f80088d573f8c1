"""Provenance and resumability: what identifies a merge, the manifest written beside the shards, and the
state an interrupted run leaves for `resume`.

The identity holds only what determines the output bytes (tool version, input files and sizes, the
adapter's SHA-256, resolved options) and nothing that varies between runs (no time, path, host or
user), so two merges of the same inputs write byte-identical folders, manifest included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import MANIFEST_NAME, read_json
from .errors import MismatchError, OutputError
from .output import sha256_file, write_error
from .plan import MergePlan

VERSION = "0.1.0"
STATE_NAME = "qwen_merge.partial.json"


def identity(plan: MergePlan, options: dict) -> dict:
    """Everything that determines the output bytes, and nothing else."""
    base, adapter = plan.base, plan.adapter
    return {
        "tool": "qwen-merge",
        "version": VERSION,
        "base": {"files": {s.path.name: s.size for s in base.shards}
                 | {p.name: p.stat().st_size for p in base.side_files},
                 "merged_adapters": previous_adapters(base.root)},
        "adapter": {"weights_sha256": sha256_file(adapter.file.path), "weights_size": adapter.file.size,
                    "config_sha256": sha256_file(adapter.root / "adapter_config.json")},
        "options": options,
    }


def base_file_stats(plan: MergePlan) -> dict[str, list[int]]:
    """Size, mtime and inode of every base file: kept in the resume state only (they vary between
    copies of the same model, so they stay out of the manifest)."""
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
    raise MismatchError(f"{base / MANIFEST_NAME}: this base was already merged with this adapter "
                        f"(sha256 {ident['adapter']['weights_sha256'][:12]}…); merging again applies the delta "
                        f"twice. Pass force=True (--force) if that is really wanted")


def manifest(ident: dict, plan: MergePlan, shards: dict[str, dict]) -> dict:
    counts = {"merged": len(plan.merges), "other_ops": len(plan.ops) - len(plan.merges), "copied": plan.copied}
    return {**ident, "counts": counts, "output": {"shards": shards, "tie": plan.tie,
                                                   "renames": [list(r) for r in plan.renames]}}


def write_json_atomic(path: Path, value: dict) -> None:
    """Replace `path` with `value` as JSON (sorted keys, so equal values give equal bytes), durably."""
    temp = path.with_name(path.name + ".tmp")
    data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as e:
        raise write_error(path, e) from None


def load_state(folder: Path, ident: dict) -> dict[str, dict]:
    """The shards an interrupted run completed, if it ran with the same identity."""
    path = folder / STATE_NAME
    if not path.is_file():
        return {}  # killed before the first state was written: nothing was recorded complete
    state = read_json(path, STATE_NAME)
    if state.get("identity") != ident:
        changed = [k for k in ("base", "base_files", "adapter", "options", "version")
                   if state.get("identity", {}).get(k) != ident.get(k)]
        raise OutputError(f"{folder}: the interrupted merge used other inputs or options ({', '.join(changed)} "
                          f"changed); cannot resume it. Rerun with the same ones, or remove the folder to start over")
    done = state.get("done", {})
    for name, info in done.items():
        if not (folder / name).is_file() or (folder / name).stat().st_size != info.get("size"):
            raise OutputError(f"{folder / name}: a shard recorded as complete is missing or has the wrong size")
    return done
