#!/usr/bin/env python3
"""The arithmetic cost of fp32 outputs: the float64 merge from an exact product against fp32 arithmetic.

An fp32 output is merged in float64 from an exact `B @ A` (`compute.widen`), so that its bytes do not
depend on the machine; a bf16/fp16 output keeps PEFT's fp32 arithmetic. This times both on the same fp32
tensors, in this process, on one thread (as a merge computes), alternating the two and reporting the median
and spread of the repeats:

* `fp32`: `merge_rows` with fp32 factors, the operations PEFT performs (and qwen-merge for bf16 outputs);
* `float64`: `merge_rows` with the widened factors, as qwen-merge merges every fp32 output.

Rows are merged in blocks as a merge does (`--block-mib`, default 8 MiB of fp32). The figures are the
compute alone (no disk); `bench_merge.py --dtype fp32` gives the whole merge against `cp` and PEFT.

Usage::

    python benchmarks/bench_fp32.py                 # Qwen3-4B projection shapes, r = 16 and 64
    python benchmarks/bench_fp32.py --repeat 7 --ranks 8 16 64 128
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qwen_merge.compute.arithmetic import Workspace, make_factors, merge_rows, widen  # noqa: E402

# (name, rows, cols): Qwen3-4B's attention and MLP projections
SHAPES = [("q_proj 4096x2560", 4096, 2560), ("o_proj 2560x4096", 2560, 4096),
          ("up_proj 9728x2560", 9728, 2560), ("down_proj 2560x9728", 2560, 9728)]


def merge_seconds(w: torch.Tensor, factors, block_rows: int, out: torch.Tensor, wide: bool) -> float:
    workspace = Workspace()
    start = time.perf_counter()
    for row0 in range(0, w.shape[0], block_rows):
        rows = min(block_rows, w.shape[0] - row0)
        buffers = workspace.block(rows, (w.shape[1],), "F32", out[row0:row0 + rows], wide=wide)
        merge_rows(w[row0:row0 + rows], factors, row0, buffers)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--block-mib", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a merge computes on one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), blocks of {args.block_mib} MiB of fp32, "
          f"median (min-max) of {args.repeat}")
    print("| tensor | r | fp32 arithmetic s | float64 exact s | ratio | float64 CPU-s per GB of fp32 |")
    print("|---|---|---|---|---|---|")
    for name, rows, cols in SHAPES:
        w = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
        out = torch.empty_like(w)
        block_rows = max(1, (args.block_mib << 20) // (4 * cols))
        for rank in args.ranks:
            a = torch.from_numpy(rng.standard_normal((rank, cols), dtype=np.float32) / rank ** 0.5)
            b = torch.from_numpy(rng.standard_normal((rows, rank), dtype=np.float32) * 0.01)
            plain = make_factors(a, b, 2.0, transpose=False)
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeat):
                for wide in (False, True):
                    start = time.perf_counter()
                    factors = widen(plain) if wide else plain  # the split is part of the cost
                    split = time.perf_counter() - start
                    times[wide].append(split + merge_seconds(w, factors, block_rows, out, wide))
            f32, f64 = (statistics.median(times[k]) for k in (False, True))
            gb = w.numel() * 4 / 1e9
            print(f"| {name} | {rank} | {f32:.3f} ({min(times[False]):.3f}-{max(times[False]):.3f}) | "
                  f"{f64:.3f} ({min(times[True]):.3f}-{max(times[True]):.3f}) | {f64 / f32:.1f}x | "
                  f"{f64 / gb:.2f} |")


if __name__ == "__main__":
    main()
