"""Which base files a merge from the Hub downloads, in what order, and the disk that takes.

Pure arithmetic on the plan (no huggingface_hub): `plan` reports it, `merge` checks free space with it,
and `hub.Downloads` follows its order.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .plan import MergePlan, ShardPlan


@dataclass(frozen=True, slots=True)
class FetchPlan:
    """`order`: the base shards not in the cache, in the order the merge first reads them. `reads`: each
    output shard's name and the base shards it reads, in output order. `download_bytes`: the total of
    `order`. `low_disk_bytes`: the most of them on disk at once with `--low-disk` (the shards the output
    shard being written reads, plus the next one downloading)."""

    order: tuple[str, ...]
    reads: tuple[tuple[str, frozenset[str]], ...]
    download_bytes: int
    low_disk_bytes: int
    cached_bytes: int

    def last_use(self) -> dict[str, int]:
        """Base shard -> the index of the last output shard that reads it (after which `--low-disk`
        deletes it)."""
        return _uses(self.reads)[1]

    def still_needed(self, done: Collection[str]) -> tuple[str, ...]:
        """The downloads that the output shards not in `done` read, in order."""
        wanted = {name for shard, names in self.reads if shard not in done for name in names}
        return tuple(n for n in self.order if n in wanted)


def base_reads(shard: ShardPlan) -> frozenset[str]:
    """The base files an output shard reads (by name): the sources of its copies, merges and block scales."""
    paths: set[Path] = set()
    for entry in shard.entries:
        op = shard.ops.get(entry.name)
        if op is None:
            paths.add(shard.copy_source(entry.name)[0].path)
        while op is not None:
            sources = [op.source] + [s.source for s in (op.dequant, op.requant) if s is not None]
            sources += op.packed.companions if op.packed is not None else ()
            paths.update(s.file.path for s in sources if not s.in_adapter)
            op = op.scales_of
    return frozenset(p.name for p in paths)


def fetch_plan(plan: MergePlan) -> FetchPlan | None:
    """None unless the base comes from the Hub."""
    origin = plan.base.hub
    if origin is None:
        return None
    reads = tuple((shard.name, base_reads(shard)) for shard in plan.shards)
    first, last = _uses(reads)
    order = tuple(sorted((n for n in first if n not in origin.cached), key=lambda n: (first[n], n)))
    size = {n: origin.sizes.get(n, 0) for n in first}
    peak = 0
    for k in range(len(reads)):
        live = sum(size[n] for n in order if first[n] <= k <= last[n])
        ahead = next((size[n] for n in order if first[n] > k), 0)
        peak = max(peak, live + ahead)
    return FetchPlan(order, reads, sum(size[n] for n in order), peak,
                     sum(size[n] for n in first if n in origin.cached))


def _uses(reads: tuple[tuple[str, frozenset[str]], ...]) -> tuple[dict[str, int], dict[str, int]]:
    """Base shard -> the index of the first, and of the last, output shard that reads it."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for k, (_, names) in enumerate(reads):
        for name in names:
            first.setdefault(name, k)
            last[name] = k
    return first, last
