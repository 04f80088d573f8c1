#!/usr/bin/env python3
"""Where a merge's time goes: per-thread CPU, time spent waiting, and the cost of the SHA-256.

Runs `merge_shards` in this process (after importing torch, so start-up is not counted), alternating:
* `hash`: the merge as shipped, SHA-256 of every shard for the manifest;
* `nohash`: the same with the hashers' work replaced by nothing (a measurement only: the manifest then
  holds no hashes; qwen-merge itself always hashes).
For each run it prints the wall time, the CPU time of every thread (from /proc/self/task, sampled every
20 ms), and how long the merging thread waited for a free output buffer, the read-ahead thread and the
assembler waited for staging chunks. With `--cold`, the page cache is dropped before each run (root).

Usage::

    python benchmarks/bench_merge.py --preset 4b --build-only      # the 8 GB inputs, once
    python benchmarks/profile_merge.py --preset 4b --repeat 3
    python benchmarks/profile_merge.py --preset 4b --repeat 3 --cold
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import qwen_merge.compute.stream  # noqa: E402,F401 - torch and the compute code, imported before timing
from qwen_merge import merge_shards  # noqa: E402
from qwen_merge.compute import pieces  # noqa: E402
from qwen_merge.sinks import writer  # noqa: E402


class Waits:
    """Seconds spent blocked in the two buffer pools, by the thread that blocked."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._wrap(pieces.BlockRing, "take", "output buffer (merging thread)")
        self._wrap(writer._ChunkPool, "get", "staging chunk (assembler)")

    def _wrap(self, cls, name: str, label: str) -> None:
        original = getattr(cls, name)

        def timed(obj, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(obj, *args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(cls, name, timed)


class ThreadCpu:
    """CPU seconds per thread name, sampled from /proc while a merge runs."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {threading.get_native_id(): "merging (main)"}
        original = threading.Thread.run
        names = self.names

        def run(thread):
            names[threading.get_native_id()] = thread.name.split("_")[0].removeprefix("qwen-merge-")
            return original(thread)

        threading.Thread.run = run
        self.tick = os.sysconf("SC_CLK_TCK")

    def snapshot(self) -> dict[int, float]:
        found = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            found[int(tid)] = (int(fields[11]) + int(fields[12])) / self.tick
        return found

    def measure(self, run) -> tuple[float, dict[str, float]]:
        before, last, done = self.snapshot(), {}, []

        def sample():
            while not done:
                last.update(self.snapshot())
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, name="sampler")
        sampler.start()
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
        done.append(1)
        sampler.join()
        per_name: dict[str, float] = {}
        for tid, cpu in last.items():
            name = self.names.get(tid, "other")
            if name != "sampler":
                per_name[name] = per_name.get(name, 0.0) + cpu - before.get(tid, 0.0)
        return wall, per_name


def no_hashing() -> None:
    """Make the hashers pass chunks on without hashing them (their results become a dummy)."""
    original = writer._Hasher.take

    def take(hasher, item):
        if isinstance(item, writer._End):
            item.shard.hashed.set_result("not hashed")
        elif not isinstance(item, writer._Chunk):  # the writer gives the chunk back once the hasher returns
            original(hasher, item)

    writer._Hasher.take = take
    return original


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="4b", help="a bench_merge.py preset whose inputs are built")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    args = ap.parse_args()
    root = REPO / "benchmarks" / ".cache" / args.preset
    base, adapter, out = root / "base", root / "adapter", root / "work" / "profile"
    cpu, waits = ThreadCpu(), Waits()
    hashing = writer._Hasher.take
    results: dict[str, list] = {"hash": [], "nohash": []}
    for _ in range(args.repeat):
        for mode in ("hash", "nohash"):
            writer._Hasher.take = hashing
            if mode == "nohash":
                no_hashing()
            shutil.rmtree(out, ignore_errors=True)
            if args.cold:
                subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)
            waits.seconds.clear()
            wall, per_thread = cpu.measure(lambda: merge_shards(base, adapter, out, progress=False))
            results[mode].append((wall, per_thread, dict(waits.seconds)))
    writer._Hasher.take = hashing
    shutil.rmtree(out, ignore_errors=True)
    print(f"preset {args.preset}, {'cold' if args.cold else 'warm'} page cache, medians of {args.repeat}\n")
    for mode, runs in results.items():
        walls = [w for w, _, _ in runs]
        print(f"{mode}: wall {statistics.median(walls):.2f} s (min {min(walls):.2f}, max {max(walls):.2f})")
        names = sorted({n for _, per, _ in runs for n in per})
        for name in names:
            print(f"  CPU {name:24s} {statistics.median(per.get(name, 0.0) for _, per, _ in runs):6.2f} s")
        for label in sorted({k for _, _, w in runs for k in w}):
            print(f"  waiting for {label:34s} {statistics.median(w.get(label, 0.0) for _, _, w in runs):6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
