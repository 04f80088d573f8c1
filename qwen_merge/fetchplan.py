"""Which base files a merge from the Hub downloads, in what order, and the disk that takes.

Pure arithmetic on the plan (no huggingface_hub): `plan` reports it, `merge` checks free space with it,
and `hub.Downloads` follows its order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .plan import MergePlan, ShardPlan


@dataclass(frozen=True, slots=True)
class FetchPlan:
    """`order`: the base shards not in the cache, in the order the merge first reads them. `last_use`:
    for every base shard, the index of the last output shard that reads it (after which `--low-disk`
    deletes it). `download_bytes`: their total. `low_disk_bytes`: the most of them on disk at once with
    `--low-disk` (the shards the output shard being written reads, plus the next one downloading)."""

    order: tuple[str, ...]
    last_use: dict[str, int]
    download_bytes: int
    low_disk_bytes: int
    cached_bytes: int


def base_reads(shard: ShardPlan) -> set[Path]:
    """The base files an output shard reads: the sources of its copies, merges and block scales."""
    paths: set[Path] = set()
    for entry in shard.entries:
        op = shard.ops.get(entry.name)
        if op is None:
            paths.add(shard.copy_source(entry.name)[0].path)
        while op is not None:
            sources = [op.source] + [s.source for s in (op.dequant, op.requant) if s is not None]
            paths.update(s.file.path for s in sources if not s.in_adapter)
            op = op.scales_of
    return paths


def fetch_plan(plan: MergePlan) -> FetchPlan | None:
    """None unless the base comes from the Hub."""
    origin = plan.base.hub
    if origin is None:
        return None
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for k, shard in enumerate(plan.shards):
        for path in sorted(base_reads(shard)):
            first.setdefault(path.name, k)
            last[path.name] = k
    order = tuple(sorted((n for n in first if n not in origin.cached), key=lambda n: (first[n], n)))
    size = {n: origin.sizes.get(n, 0) for n in first}
    peak = 0
    for k in range(len(plan.shards)):
        live = sum(size[n] for n in order if first[n] <= k <= last[n])
        ahead = next((size[n] for n in order if first[n] > k), 0)
        peak = max(peak, live + ahead)
    return FetchPlan(order, last, sum(size[n] for n in order), peak,
                     sum(size[n] for n in first if n in origin.cached))
