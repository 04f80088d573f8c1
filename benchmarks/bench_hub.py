#!/usr/bin/env python3
"""Peak disk use and wall time of a merge from a Hugging Face Hub repo id, with and without `--low-disk`.

The base of a `bench_merge.py` preset (default `1.9gb`: 4 shards, 1.87 GB) and its adapter are served by
the test suite's fake Hub (`tests/hubserver.py`, a local HTTP server; no real host is reached). Each
run starts from an empty Hugging Face cache and runs

    qwen-merge merge bench/base bench/lora OUT --quiet [--low-disk]

as a subprocess, sampling every 20 ms the disk the run occupies: the cache folder plus the output and
its partial folder (allocated blocks, `st_blocks`). The modes alternate; medians and ranges are printed,
next to what `qwen-merge plan` predicts (output + downloads, output + the shards held at once), and a
merge of the same files from a local folder.

Usage::

    python benchmarks/bench_merge.py --preset 1.9gb --build-only   # the inputs, once
    python benchmarks/bench_hub.py --repeat 3
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from hubserver import FakeHub, hub_env  # noqa: E402

GB = 1e9


def disk_bytes(*roots: Path) -> int:
    """Allocated bytes of every regular file under `roots` (a symlink counts once, as its blob)."""
    total = 0
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                try:
                    st = os.lstat(os.path.join(folder, name))
                except FileNotFoundError:  # deleted between the listing and the stat
                    continue
                if not os.path.islink(os.path.join(folder, name)):
                    total += st.st_blocks * 512
    return total


class PeakDisk(threading.Thread):
    def __init__(self, *roots: Path, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.roots, self.every, self.peak, self.stopped = roots, every, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, disk_bytes(*self.roots))
            time.sleep(self.every)

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        self.peak = max(self.peak, disk_bytes(*self.roots))
        return self.peak


def cli() -> list[str]:
    return [sys.executable, "-m", "qwen_merge"]


def run_once(args: list[str], env: dict, cache: Path, out: Path) -> tuple[float, int]:
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cache.mkdir(parents=True)
    return timed(args, env, cache, out.parent)


def timed(args: list[str], env: dict, *watched: Path) -> tuple[float, int]:
    """`qwen-merge ARGS --quiet` after a sync: wall seconds including a trailing sync, and the peak bytes
    on disk under the `watched` folders."""
    subprocess.run("sync", shell=True, check=True)
    sampler = PeakDisk(*watched)
    sampler.start()
    start = time.perf_counter()
    subprocess.run([*cli(), *args, "--quiet"], env=env, check=True)
    subprocess.run("sync", shell=True, check=True)
    wall = time.perf_counter() - start
    return wall, sampler.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1.9gb", help="a bench_merge.py preset whose inputs are built")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = REPO / "benchmarks" / ".cache" / args.preset
    base, adapter = root / "base", root / "adapter"
    if not base.is_dir():
        print(f"build the inputs first: python benchmarks/bench_merge.py --preset {args.preset} --build-only")
        return 1
    shard_sizes = sorted((p.stat().st_size for p in base.glob("*.safetensors")), reverse=True)
    work = Path(tempfile.mkdtemp(prefix="bench-hub-", dir=root))
    try:
        with FakeHub() as hub:
            t = time.perf_counter()
            hub.add_repo("bench/base", base)
            hub.add_repo("bench/lora", adapter)
            print(f"serving {args.preset} from {hub.endpoint} (loaded in {time.perf_counter() - t:.1f} s)")
            cache, out = work / "hf-cache", work / "out" / "merged"
            env = {**hub_env(hub, cache, home=work / "hf-home", base=dict(os.environ)),
                   "PYTHONPATH": str(REPO)}
            plan = subprocess.run([*cli(), "plan", "bench/base", "bench/lora"], env=env, capture_output=True,
                                  text=True, check=True).stdout
            predicted = [line for line in plan.splitlines() if line.startswith(("download:", "disk:", "output:"))]
            runs: dict[str, list[tuple[float, int]]] = {"local": [], "hub": [], "hub --low-disk": []}
            for _ in range(args.repeat):
                runs["local"].append(run_once(["merge", str(base), str(adapter), str(out)], env, cache, out))
                runs["hub"].append(run_once(["merge", "bench/base", "bench/lora", str(out)], env, cache, out))
                runs["hub --low-disk"].append(run_once(["merge", "bench/base", "bench/lora", str(out), "--low-disk"],
                                                       env, cache, out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output = sum(p.stat().st_size for p in base.iterdir() if p.is_file())
    print(f"\npreset {args.preset}: {len(shard_sizes)} shards, largest {shard_sizes[0] / GB:.3f} GB; "
          f"medians of {args.repeat}")
    print("plan says: " + " | ".join(predicted))
    print("\n| run | wall s (median) | min–max | peak disk GB (output + cache) | min–max | vs output alone |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, results in runs.items():
        walls, peaks = [w for w, _ in results], [p for _, p in results]
        print(f"| {name} | {statistics.median(walls):.2f} | {min(walls):.2f}–{max(walls):.2f} | "
              f"{statistics.median(peaks) / GB:.3f} | {min(peaks) / GB:.3f}–{max(peaks) / GB:.3f} | "
              f"{statistics.median(peaks) / output:.2f}x |")
    print(f"\noutput + two largest shards = {(output + sum(shard_sizes[:2])) / GB:.3f} GB; "
          f"output + the whole base = {2 * output / GB:.3f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
