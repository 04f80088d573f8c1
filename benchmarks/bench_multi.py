#!/usr/bin/env python3
"""Benchmark several adapters merged in one pass: ``qwen-merge merge BASE A1 … AN OUT --weights …`` for N = 1, 2
and 4 on the synthetic checkpoints of ``bench_merge.py``, against ``cp -r`` (the I/O floor).

N adapters in one pass read and write the base once; what grows with N is the product: one GEMM over the summed
rank (N·16) per block, and the factors read from N files. N = 1 is the plain merge (no ``--weights``).

The extra adapters are built once beside the cached inputs (``benchmarks/.cache/<preset>/adapter-<k>``): r=16,
alpha 32 on the seven projections, like the first, with other random values. Each run spot-checks two merged
tensors of the N = 2 output against W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ computed in float64 and rounded once (bf16: within one unit in
the last place plus the fp32 arithmetic's band, (R + 4)·2^-24 of the summed magnitudes, which matters where the sum
nearly cancels; fp32: equal), and that untouched tensors are byte copies.

Usage::

    python benchmarks/bench_merge.py --preset 4b --build-only      # once: the ~8 GB Qwen3-4B-shaped inputs
    python benchmarks/bench_multi.py --preset 4b --repeat 3         # 1, 2 and 4 adapters, with cp
    python benchmarks/bench_multi.py --preset 1.9gb --layers 2 --hidden 256 --repeat 1   # a small check
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import (LORA_ALPHA, LORA_R, PRESETS, WEIGHT_DTYPES, checkpoint_tensors,  # noqa: E402
                         code_fingerprint, ensure_inputs, fmt, log, lora_tensors, median, model_cfg, ours_command,
                         run_timed, tensor_specs, warm_read)

COUNTS = (1, 2, 4)
WEIGHTS = (0.6, 0.3, -0.2, 0.5)  # the first N are used


def extra_adapters(cfg, first: Path, count: int) -> list[Path]:
    """The first adapter and `count - 1` more beside it (built once, generator seeds 1001, 1002, …)."""
    import torch
    from safetensors.torch import save_file

    found = [first]
    for k in range(1, count):
        folder = first.parent / f"adapter-{k}"
        found.append(folder)
        if (folder / "adapter_model.safetensors").is_file():
            continue
        tensors = lora_tensors(cfg, tensor_specs(cfg), torch.Generator().manual_seed(1000 + k))
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copy(first / "adapter_config.json", tmp / "adapter_config.json")
        tmp.rename(folder)
        log(f"built {folder}")
    return found


def spot_check(base: Path, adapters: list[Path], weights: tuple[float, ...], out: Path) -> dict:
    """Two merged tensors against the float64 sum rounded once (bf16: within 1 ulp plus the fp32 band; fp32:
    equal), and the untouched tensors' bytes."""
    import torch
    from safetensors import safe_open

    theirs, ours = checkpoint_tensors(base), checkpoint_tensors(out)
    scale = LORA_ALPHA / LORA_R
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    worst = 0
    for name in names:
        with safe_open(str(theirs[name][0]), "pt") as f:
            w = f.get_tensor(name)
        with safe_open(str(ours[name][0]), "pt") as f:
            got = f.get_tensor(name)
        exact, terms = w.double(), w.double().abs()
        for adapter, weight in zip(adapters, weights):
            with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
                module = "base_model.model." + name[:-len(".weight")]
                a, b = f.get_tensor(module + ".lora_A.weight"), f.get_tensor(module + ".lora_B.weight")
            exact += weight * scale * (b.double() @ a.double())
            terms += abs(weight * scale) * (b.double().abs() @ a.double().abs())
        want = exact.to(w.dtype)
        if w.dtype == torch.float32:
            worst = max(worst, int((got != want).sum()))
        else:
            ulp = (torch.nextafter(want.abs(), torch.tensor(float("inf"), dtype=w.dtype)) - want.abs()).double()
            band = (LORA_R * len(adapters) + 4) * 2.0 ** -24 * terms
            worst = max(worst, int(((got.double() - exact).abs() > ulp + band).sum()))
    copies = [n for n in theirs if ".layers." not in n or "norm" in n][:4]
    same = all(_bytes(theirs[n]) == _bytes(ours[n]) for n in copies)
    return {"beyond_band": worst, "copies_identical": same, "ok": worst == 0 and same}


def _bytes(where) -> bytes:
    path, entry = where
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        start, end = entry["data_offsets"]
        f.seek(8 + header + start)
        return f.read(end - start)


def report(results: dict[str, list[dict]], gb: float, preset: str, repeat: int) -> None:
    """One row per step: median wall time with its range, ratios to one adapter and to cp, CPU time."""
    wall = {label: median([r["wall_s"] for r in runs]) for label, runs in results.items()}
    one, cp = wall.get("ours-1"), wall.get("cp")
    print(f"\n### Several adapters in one pass ({preset}, {gb:.2f} GB, {repeat} round(s); code {code_fingerprint()})\n")
    print("| step | wall s, median (min–max) | ÷ 1 adapter | ÷ cp | CPU s | CPU s/GB | peak RssAnon MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, runs in results.items():
        walls = [r["wall_s"] for r in runs]
        cpu = median([r.get("cpu_s") for r in runs])
        anon = max(r.get("anon_peak_mib") or 0 for r in runs)
        name = "`cp -r` + sync" if label == "cp" else f"qwen-merge, {label.split('-')[1]} adapter(s)"
        print(f"| {name} | {fmt(wall[label])} ({fmt(min(walls))}–{fmt(max(walls))}) | "
              f"{fmt(wall[label] / one if one else None)} | {fmt(wall[label] / cp if cp else None)} | "
              f"{fmt(cpu, '.1f')} | {fmt(cpu / gb if cpu else None)} | {anon:.0f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="4b")
    ap.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), default="bf16")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--hidden", type=int, help="override the preset's hidden size")
    ap.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="adapter counts (at most 4)")
    ap.add_argument("--repeat", type=int, default=1, help="run each step N times, report the median")
    ap.add_argument("--no-cp", action="store_true", help="skip the cp -r baseline")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 spot-check")
    ap.add_argument("--idle-wait", type=float, default=60.0, help="wait up to S s for an idle machine before a step")
    ap.add_argument("--json", type=Path, help="dump raw numbers to this path")
    args = ap.parse_args(argv)
    if max(args.counts) > len(WEIGHTS) or min(args.counts) < 1:
        ap.error(f"--counts: 1 to {len(WEIGHTS)}")
    cfg = model_cfg(args)
    base, first = ensure_inputs(cfg)
    adapters = extra_adapters(cfg, first, max(args.counts))
    cmd, env = ours_command(args=argparse.Namespace(ours_cmd=None))
    warm_read(base)
    results: dict[str, list[dict]] = {}
    checks = {}
    steps = ([] if args.no_cp else ["cp"]) + list(args.counts)
    with tempfile.TemporaryDirectory(prefix="bench-multi-", dir=base.parent) as scratch:
        out = Path(scratch) / "out"
        for r in range(args.repeat):
            for step in steps[r % len(steps):] + steps[:r % len(steps)]:  # the order rotates each round
                if step == "cp":
                    results.setdefault("cp", []).append(run_timed("cp", ["cp", "-r", str(base), str(out)],
                                                                  idle_wait=args.idle_wait))
                    shutil.rmtree(out)
                    continue
                n = step
                weights = [] if n == 1 else ["--weights", ",".join(f"{w:g}" for w in WEIGHTS[:n])]
                run = run_timed(f"ours-{n}", [*cmd, "merge", str(base), *map(str, adapters[:n]), str(out), "--quiet",
                                             *weights], env=env, idle_wait=args.idle_wait)
                results.setdefault(f"ours-{n}", []).append(run)
                if n == 2 and not args.no_check and "n2" not in checks and run["rc"] == 0:
                    checks["n2"] = spot_check(base, adapters[:2], WEIGHTS[:2], out)
                    log(f"spot-check (2 adapters): {checks['n2']}")
                shutil.rmtree(out, ignore_errors=True)
    report(results, sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9, cfg["key"], args.repeat)
    if args.json:
        args.json.write_text(json.dumps({"cfg": cfg, "results": results, "checks": checks}, indent=2, default=str))
    failed = any(r["rc"] != 0 for runs in results.values() for r in runs) or not all(c["ok"] for c in checks.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
