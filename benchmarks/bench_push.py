#!/usr/bin/env python3
"""Wall time and peak disk of a merge from a Hub repo to a Hub repo (`--push-to-hub`, no local copy), against
the download alone and the upload alone of the same bytes, over a bandwidth-limited link.

The base of a `bench_merge.py` preset (default `1.9gb`: 4 shards, 1.87 GB; `--shard-size` re-shards it) and
its adapter are served by the test suite's fake Hub (`tests/hubserver.py`, a local HTTP server; no real host
is reached), which caps downloads and uploads at `--mbps` MB/s each (two directions of one link). Xet is off
(`HF_HUB_DISABLE_XET=1`): uploads take the LFS path. Each run starts from an empty Hugging Face cache:

* download: `qwen-merge merge bench/base bench/lora OUT --low-disk` (Hub to a local folder);
* upload:   `qwen-merge merge BASE_DIR ADAPTER_DIR --push-to-hub bench/up-k` (local folders to the Hub);
* hub to hub: `qwen-merge merge bench/base bench/lora --push-to-hub bench/h2h-k --low-disk`.

The disk a run occupies — the cache, the staging folder under HF_HOME, the output — is sampled every 20 ms
(allocated blocks). Medians and ranges are printed, and hub to hub against the longer of download and upload.

Usage::

    python benchmarks/bench_merge.py --preset 1.9gb --build-only   # the inputs, once
    python benchmarks/bench_push.py --repeat 2 --mbps 40 [--shard-size 250MB]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from bench_hub import GB, cli, timed  # noqa: E402
from hubserver import FakeHub, hub_env  # noqa: E402

TOKEN = "hf_bench_token"


def run_once(args: list[str], env: dict, work: Path) -> tuple[float, int]:
    for name in ("hf-cache", "hf-home", "out"):
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir()
    return timed(args, env, work / "hf-cache", work / "hf-home", work / "out")


def resharded(base: Path, adapter: Path, size: str) -> Path:
    """The base in shards of at most `size`: the merge of `adapter` written with --max-shard-size, its
    manifest dropped (a benchmark input, not a model to use)."""
    folder = base.with_name(f"base-{size}")
    if not folder.is_dir():
        subprocess.run([*cli(), "merge", str(base), str(adapter), str(folder), "--max-shard-size", size, "--quiet"],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
        (folder / "qwen_merge.json").unlink()
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1.9gb", help="a bench_merge.py preset whose inputs are built")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--mbps", type=float, default=40.0, help="the link's MB/s, each way")
    ap.add_argument("--shard-size", metavar="SIZE",
                    help="serve the base re-sharded to at most SIZE per shard (e.g. 250MB; made once, locally)")
    args = ap.parse_args()
    root = REPO / "benchmarks" / ".cache" / args.preset
    base, adapter = root / "base", root / "adapter"
    if not base.is_dir():
        print(f"build the inputs first: python benchmarks/bench_merge.py --preset {args.preset} --build-only")
        return 1
    if args.shard_size:
        base = resharded(base, adapter, args.shard_size)
    shard_sizes = sorted((p.stat().st_size for p in base.glob("*.safetensors")), reverse=True)
    work = Path(tempfile.mkdtemp(prefix="bench-push-", dir=root))
    runs: dict[str, list[tuple[float, int]]] = {"download": [], "upload": [], "hub to hub": []}
    try:
        with FakeHub() as hub:
            hub.tokens.add(TOKEN)
            hub.add_repo("bench/base", base)
            hub.add_repo("bench/lora", adapter)
            hub.limit_bandwidth(args.mbps * 1e6)
            env = {**hub_env(hub, work / "hf-cache", home=work / "hf-home", token=TOKEN, base=dict(os.environ)),
                   "PYTHONPATH": str(REPO), "HF_HUB_DISABLE_XET": "1"}
            print(f"serving {args.preset} from {hub.endpoint} at {args.mbps:g} MB/s each way", file=sys.stderr)
            for k in range(args.repeat):
                out = str(work / "out" / "merged")
                runs["download"].append(run_once(["merge", "bench/base", "bench/lora", out, "--low-disk"], env, work))
                runs["upload"].append(run_once(["merge", str(base), str(adapter), "--push-to-hub", f"bench/up-{k}"],
                                               env, work))
                runs["hub to hub"].append(run_once(["merge", "bench/base", "bench/lora", "--push-to-hub",
                                                    f"bench/h2h-{k}", "--low-disk"], env, work))
                print(f"round {k + 1}: " + ", ".join(f"{n} {r[-1][0]:.1f} s" for n, r in runs.items()),
                      file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output = sum(p.stat().st_size for p in base.iterdir() if p.is_file())
    print(f"\npreset {args.preset}: {len(shard_sizes)} shards, {output / GB:.2f} GB, largest shard "
          f"{shard_sizes[0] / GB:.3f} GB; link {args.mbps:g} MB/s each way; medians of {args.repeat}")
    print("\n| run | wall s (median) | min–max | peak disk GB (cache + staging + output) | min–max |")
    print("|---|---:|---:|---:|---:|")
    for name, results in runs.items():
        walls, peaks = [w for w, _ in results], [p for _, p in results]
        print(f"| {name} | {statistics.median(walls):.2f} | {min(walls):.2f}–{max(walls):.2f} | "
              f"{statistics.median(peaks) / GB:.3f} | {min(peaks) / GB:.3f}–{max(peaks) / GB:.3f} |")
    longer = max(statistics.median(w for w, _ in runs[n]) for n in ("download", "upload"))
    h2h = statistics.median(w for w, _ in runs["hub to hub"])
    print(f"\nhub to hub / longer of download and upload: {h2h / longer:.2f}x; "
          f"two largest input + two largest output shards: {4 * sum(shard_sizes[:2]) / 2 / GB:.3f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
