"""Two versions of qwen-merge side by side, on the same inputs, in one run: did a change cost time or change
a byte?

    python benchmarks/bench_ab.py --before main~3                # a git revision against this checkout
    python benchmarks/bench_ab.py --before-path ../other --repeat 5
    python benchmarks/bench_ab.py --before main~3 --workloads startup,moe

Workloads (inputs built by bench_merge.py / bench_moe.py, cached under benchmarks/.cache/):
* `4b`: `qwen-merge merge` of the Qwen3-4B-shaped preset (~8 GB bf16, r=16 LoRA on every projection);
* `moe`: `qwen-merge merge` of the Qwen3-30B-A3B-shaped MoE (18,867 tensors), fused-expert adapter;
* `startup`: `python -c "import qwen_merge"`, and `qwen-merge plan` of the MoE (interpreter start-up,
  imports and planning 18,867 tensors).

Each run is a fresh interpreter with PYTHONPATH set to the version's tree; the versions alternate (A B B A ...)
so a slow minute of a shared machine falls on both. Reported per workload: median wall seconds and spread of
each version, the ratio after/before, the child CPU-seconds, and whether the two outputs are byte-identical
(their manifests, which hold every shard's SHA-256, and every other file of the output, compared byte for byte).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
WORK = CACHE / "ab-work"


def moe_inputs() -> tuple[Path, Path]:
    roots = sorted((CACHE / "moe").glob("L48-E128-*"))
    if not roots:
        sys.exit("no MoE inputs: run `python benchmarks/bench_moe.py --build-only` first")
    return roots[0] / "base", roots[0] / "adapter_fused"


def dense_inputs() -> tuple[Path, Path]:
    root = CACHE / "4b"
    if not (root / "base").is_dir():
        sys.exit("no 4b inputs: run `python benchmarks/bench_merge.py --preset 4b --build-only` first")
    return root / "base", root / "adapter"


def workloads(names: list[str]) -> list[tuple[str, list[str], bool]]:
    """(name, qwen-merge arguments or a `-c` program, whether it writes WORK/out)."""
    chosen = []
    for name in names:
        if name == "4b":
            base, adapter = dense_inputs()
            chosen.append(("merge 4b (8 GB)", ["-m", "qwen_merge", "merge", str(base), str(adapter), "OUT", "--quiet"],
                           True))
        elif name == "moe":
            base, adapter = moe_inputs()
            chosen.append(("merge MoE (18,867 tensors)",
                           ["-m", "qwen_merge", "merge", str(base), str(adapter), "OUT", "--quiet"], True))
        elif name == "startup":
            base, adapter = moe_inputs()
            chosen.append(("import qwen_merge", ["-c", "import qwen_merge"], False))
            chosen.append(("plan MoE (start-up + planning)", ["-m", "qwen_merge", "plan", str(base), str(adapter)],
                           False))
        else:
            sys.exit(f"unknown workload {name!r}: choose from 4b, moe, startup")
    return chosen


def run_once(tree: Path, argv: list[str], out: Path | None) -> tuple[float, float]:
    """Wall seconds (including the sync of what was written) and child CPU-seconds of one run."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [str(out) if a == "OUT" else a for a in argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], env=env, check=True, stdout=subprocess.DEVNULL, cwd="/")
    if out is not None:
        os.sync()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def identical(a: Path, b: Path) -> bool:
    names_a, names_b = sorted(p.name for p in a.iterdir()), sorted(p.name for p in b.iterdir())
    if names_a != names_b:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names_a, shallow=False)
    return not mismatch and not errors


def materialize(rev: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="qwen-merge-ab-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(folder / "tree"), rev], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return folder / "tree"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--before", help="a git revision of this repository (checked out into a temporary worktree)")
    which.add_argument("--before-path", type=Path, help="another checkout's root folder")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each version per workload (default 3)")
    ap.add_argument("--workloads", default="startup,moe,4b", help="comma-separated: startup, moe, 4b")
    args = ap.parse_args()
    before = args.before_path.resolve() if args.before_path else materialize(args.before)
    trees = {"before": before, "after": REPO}
    try:
        rows = [measure(name, argv, writes, trees, args.repeat) for name, argv, writes in
                workloads(args.workloads.split(","))]
    finally:
        if args.before:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, check=False)
        shutil.rmtree(WORK, ignore_errors=True)
    print(f"\nbefore: {args.before or before}   after: this checkout   repeat: {args.repeat}   "
          f"CPU: {cpu_model()}, {os.cpu_count()} cores\n")
    print("| workload | before s (median, min–max) | after s (median, min–max) | after/before | CPU-s before / after "
          "| outputs identical |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row)


def measure(name: str, argv: list[str], writes: bool, trees: dict[str, Path], repeat: int) -> str:
    walls: dict[str, list[float]] = {k: [] for k in trees}
    cpus: dict[str, list[float]] = {k: [] for k in trees}
    same = True
    for r in range(repeat):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))  # A B, then B A
        outs = {}
        for version in order:
            out = WORK / version if writes else None
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
            wall, cpu = run_once(trees[version], argv, out)
            walls[version].append(wall)
            cpus[version].append(cpu)
            outs[version] = out
            print(f"  {name}: {version} run {r + 1}: {wall:.2f} s wall, {cpu:.2f} CPU-s", file=sys.stderr)
        if writes:
            same &= identical(outs["before"], outs["after"])
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    cells = [f"{med[k]:.2f} ({min(walls[k]):.2f}–{max(walls[k]):.2f})" for k in trees]
    cpu = " / ".join(f"{statistics.median(cpus[k]):.2f}" for k in trees)
    return (f"| {name} | {cells[0]} | {cells[1]} | {med['after'] / med['before']:.3f} | {cpu} | "
            f"{('yes' if same else 'NO') if writes else '—'} |")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
