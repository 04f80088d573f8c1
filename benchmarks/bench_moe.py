#!/usr/bin/env python3
"""Benchmark ``qwen-merge`` on a Qwen3-30B-A3B-shaped checkpoint: many small tensors (issue 4).

The synthetic bf16 checkpoint has the real Qwen3-30B-A3B tensor count -- 48 layers x 128 experts x 3
projections, plus router, attention and norms: 18,867 tensors in 16 shards, per-expert names as in the
official repo (``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``) -- but small dimensions
(hidden 128, moe_intermediate 64, head_dim 32, heads 4/2, vocab 4096: about 0.3 GB). It is built once
under ``benchmarks/.cache/moe/`` (git-ignored), together with two adapters in PEFT's key format:

* ``fused``: target_parameters LoRA r=8 on every layer's experts (``experts.base_layer.lora_*`` =
  gate_up_proj (E·r, H)/(2I, E·r), ``experts.lora_*`` = down_proj (E·r, I)/(H, E·r)) plus q/v LoRA:
  18,528 of the 18,867 tensors are merged;
* ``attn``: Linear LoRA r=8 on q, k, v, o: 192 tensors merged, 18,675 copied.

One run, for each adapter, measures (all after ``sync``, with a warm page cache):
* ``cp -r BASE DST && sync`` (the I/O floor) and ``/usr/bin/time -v qwen-merge merge BASE AD OUT --quiet``
  + ``sync``: wall time, tensors per second, peak RSS, and the ratio ours / cp (target <= 2x);
* ``qwen-merge plan BASE AD`` alone (wall, including interpreter start-up);
* linearity: the same on a 24-layer variant (half the tensors), with the ratio full / half, both for the
  CLI wall times and for in-process times without start-up (``plan_merge`` / ``merge_shards`` called
  from a fresh interpreter after the imports);
* contention: before each step the harness waits (``--idle-wait``) for the machine to go quiet, records the
  CPU other processes used, and leaves contended runs out of the medians when a quiet run exists;
* a spot check of the merged output against ``rnd(fp32(W) + fl32(s·B_e@A_e))`` (tests/builders.py).
When ours misses 2x cp, one ``python -m cProfile -s tottime -m qwen_merge merge ...`` is run and its top
15 lines printed.

Usage::

    python benchmarks/bench_moe.py                   # full + half, both adapters, markdown table
    python benchmarks/bench_moe.py --json /tmp/moe.json --repeat 3
    python benchmarks/bench_moe.py --build-only
    python benchmarks/bench_moe.py --no-half --no-profile
    python benchmarks/bench_moe.py --preset 30b-a3b-4l --repeat 3   # real dimensions, 4 layers, ~6 GB
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from bench_merge import code_fingerprint, log, ours_command, rm_tree, run_timed, warm_read  # noqa: E402
from builders import (SynthSpec, adapter_tensors, checkpoint_tensors, expert_delta_loop, operand_ulps,  # noqa: E402
                      single_rounding, to_tensor, write_synthetic_fused_adapter, write_synthetic_linear_adapter,
                      write_synthetic_moe)

CACHE = REPO / "benchmarks" / ".cache" / "moe"
BUILD_VERSION = 1
TARGET_RATIO_TO_CP = 2.0
R, ALPHA = 8, 16
# small: Qwen3-30B-A3B's tensor count (48 layers x 128 experts x 3) at small dimensions, for per-tensor
# costs; 30b-a3b-4l: its real dimensions (hidden 2048, expert intermediate 768, vocab 151936), 4 layers.
PRESETS = {
    "small": SynthSpec(layers=48, experts=128),
    "30b-a3b-4l": SynthSpec(layers=4, experts=128, hidden=2048, moe_intermediate=768, heads=32, kv_heads=4,
                            head_dim=128, vocab=151936, shards=3),
}

INPROC = r"""
import json, sys, time
t0 = time.perf_counter()
import qwen_merge
import qwen_merge.compute.stream  # start-up includes torch: the timed call is the merge after it
plan_merge, merge_shards = qwen_merge.plan_merge, qwen_merge.merge_shards  # and the modules they live in
t1 = time.perf_counter()
what, base, adapter = sys.argv[1:4]
if what == "plan":
    plan = plan_merge(base, adapter)
    n = len(plan.merges)
else:
    n = merge_shards(base, adapter, sys.argv[4], progress=False).merged
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "call_s": t2 - t1, "merged": n}))
"""


def ensure_inputs(spec: SynthSpec) -> dict[str, Path]:
    """base, fused adapter and attention adapter for `spec`, built once and reused."""
    root = CACHE / f"L{spec.layers}-E{spec.experts}-h{spec.hidden}-i{spec.moe_intermediate}"
    marker = root / "build.json"
    want = {"version": BUILD_VERSION, "spec": asdict(spec), "r": R, "alpha": ALPHA}
    paths = {"base": root / "base", "fused": root / "adapter_fused", "attn": root / "adapter_attn"}
    if marker.exists() and all(p.is_dir() for p in paths.values()):
        try:
            if json.loads(marker.read_text()) == want:
                log(f"reusing cached inputs in {root}")
                return paths
        except ValueError:
            pass
    rm_tree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    write_synthetic_moe(paths["base"], spec)
    write_synthetic_fused_adapter(paths["fused"], spec, r=R, alpha=ALPHA, attention=("q_proj", "v_proj"))
    write_synthetic_linear_adapter(paths["attn"], spec, r=R, alpha=ALPHA)
    marker.write_text(json.dumps(want, indent=2))
    log(f"built {root} in {time.perf_counter() - t0:.1f} s ({du(paths['base']) / 1e6:.0f} MB base)")
    return paths


def du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def count_tensors(base: Path) -> int:
    index = json.loads((base / "model.safetensors.index.json").read_text())
    return len(index["weight_map"])


def inproc(what: str, paths: list[str], env) -> dict:
    r = subprocess.run([sys.executable, "-c", INPROC, what, *paths], capture_output=True, text=True, env=env,
                       cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"in-process {what} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def spot_check(base: Path, adapter: Path, out: Path, fused: bool) -> str:
    """A few merged tensors against rnd(fp32(W) + fl32(ΔW)) with ΔW exact (tests/builders.py), within 1 ulp of
    the larger operand, and a few copies byte-equal."""
    import torch

    spec_cfg = json.loads((base / "config.json").read_text())
    e_count, inter = spec_cfg["num_experts"], spec_cfg["moe_intermediate_size"]
    a = adapter_tensors(adapter)
    b_t, o_t = checkpoint_tensors(base), checkpoint_tensors(out)
    assert list(o_t) == list(b_t), "output tensor order differs from the base"
    scale = ALPHA / R
    worst, checked = 0, []
    layer = spec_cfg["num_hidden_layers"] - 1
    wanted: dict[str, torch.Tensor] = {}
    m = f"model.layers.{layer}.self_attn.q_proj"
    if m + ".lora_A.weight" in a:
        wanted[m + ".weight"] = scale * (a[m + ".lora_B.weight"].double() @ a[m + ".lora_A.weight"].double())
    if fused:
        mod = f"model.layers.{layer}.mlp.experts"
        gu = expert_delta_loop(a[mod + ".base_layer.lora_A.weight"], a[mod + ".base_layer.lora_B.weight"],
                               e_count, R, scale)
        dn = expert_delta_loop(a[mod + ".lora_A.weight"], a[mod + ".lora_B.weight"], e_count, R, scale)
        for e in (0, 5, e_count - 1):
            wanted[f"{mod}.{e}.gate_proj.weight"] = gu[e][:inter]
            wanted[f"{mod}.{e}.up_proj.weight"] = gu[e][inter:]
            wanted[f"{mod}.{e}.down_proj.weight"] = dn[e]
    for name, delta in wanted.items():
        w = to_tensor(*b_t[name][1:])
        got = to_tensor(*o_t[name][1:])
        # in units of the larger operand's ulp: where W + ΔW nearly cancels, the fp32 product's own rounding
        # is many ulps of the tiny result, for any fp32 GEMM (PEFT's included)
        worst = max(worst, operand_ulps(got, single_rounding(w, delta), w, delta)[1])
        checked.append(name)
    copies = [n for n in b_t if n.endswith("layernorm.weight")][:3] + ["model.embed_tokens.weight"]
    same = all(b_t[n][3] == o_t[n][3] for n in copies)
    ok = worst <= 1 and same
    return (f"{'OK' if ok else 'FAILED'}: {len(checked)} merged tensors within {worst:.2f} ulp of the larger "
            f"operand, copies identical: {same}")


def profile(cmd_prefix: list[str], env, base: Path, adapter: Path, out: Path) -> str:
    python_cmd = [sys.executable, "-m", "cProfile", "-s", "tottime", "-m", "qwen_merge", "merge",
                  str(base), str(adapter), str(out), "--quiet"]
    env = dict(env)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log("profiling: " + shlex.join(python_cmd))
    r = subprocess.run(python_cmd, capture_output=True, text=True, env=env, cwd=REPO)
    rm_tree(out)
    lines = r.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), None)
    if start is None:
        return r.stdout[-3000:] + r.stderr[-2000:]
    head = [line for line in lines[:start] if "function calls" in line]
    return "\n".join(head + lines[start:start + 16])


def measure(label: str, paths: dict[str, Path], adapter_key: str, work: Path, cmd, env, repeat: int,
            idle_wait: float) -> dict:
    base, adapter = paths["base"], paths[adapter_key]
    n = count_tensors(base)
    res = {"label": label, "adapter": adapter_key, "tensors": n, "bytes": du(base), "cp": [], "ours": [],
           "plan": [], "inproc_plan": [], "inproc_merge": []}
    warm_read(base)
    warm_read(adapter)
    for _ in range(repeat):
        dst = work / "cp"
        res["cp"].append(run_timed(f"cp-{label}", ["cp", "-r", str(base), str(dst)], logdir=work,
                                   idle_wait=idle_wait))
        rm_tree(dst)
        out = work / "ours"
        res["ours"].append(run_timed(f"ours-{label}-{adapter_key}",
                                     [*cmd, "merge", str(base), str(adapter), str(out), "--quiet"], env=env,
                                     logdir=work, idle_wait=idle_wait))
        if "check" not in res and res["ours"][-1]["rc"] == 0:
            res["check"] = spot_check(base, adapter, out, fused=adapter_key == "fused")
            log(f"spot check: {res['check']}")
        rm_tree(out)
        res["plan"].append(run_timed(f"plan-{label}-{adapter_key}", [*cmd, "plan", str(base), str(adapter)],
                                     env=env, logdir=work, sample=False, idle_wait=idle_wait))
        res["inproc_plan"].append(inproc("plan", [str(base), str(adapter)], env))
        res["inproc_merge"].append(inproc("merge", [str(base), str(adapter), str(out)], env))
        rm_tree(out)
    plan_log = work / f"bench-plan-{label}-{adapter_key}.log"
    res["plan_lines"] = len(plan_log.read_text().splitlines()) if plan_log.exists() else None
    return res


def contended(run: dict) -> bool:
    """Other processes used more than a quarter of the machine (and > 1 CPU-s) during the step."""
    return run.get("other_cpu_s", 0.0) > max(1.0, 0.25 * (os.cpu_count() or 1) * run["wall_s"])


def med(runs: list[dict], key: str):
    """Median over successful runs, leaving contended ones out when at least one quiet run exists."""
    ok = [r for r in runs if r.get(key) is not None and r.get("rc", 0) == 0]
    quiet = [r for r in ok if "wall_s" not in r or not contended(r)]
    xs = [r[key] for r in (quiet or ok)]
    return statistics.median(xs) if xs else None


def summarize(res: dict) -> dict:
    s = {k: res[k] for k in ("label", "adapter", "tensors", "bytes", "plan_lines")}
    s["check"] = res.get("check")
    s["cp_s"], s["ours_s"], s["plan_s"] = med(res["cp"], "wall_s"), med(res["ours"], "wall_s"), med(res["plan"], "wall_s")
    s["ours_maxrss_mib"], s["ours_anon_mib"] = med(res["ours"], "maxrss_mib"), med(res["ours"], "anon_peak_mib")
    s["ours_cpu_s"] = med(res["ours"], "cpu_s")
    s["other_cpu_s"] = med(res["ours"], "other_cpu_s")
    s["inproc_plan_s"] = med(res["inproc_plan"], "call_s")
    s["inproc_merge_s"] = med(res["inproc_merge"], "call_s")
    s["import_s"] = med(res["inproc_merge"], "import_s")
    s["ratio"] = s["ours_s"] / s["cp_s"] if s["ours_s"] and s["cp_s"] else None
    s["tensors_per_s"] = s["tensors"] / s["ours_s"] if s["ours_s"] else None
    s["min_max"] = {k: (min(r["wall_s"] for r in res[k]), max(r["wall_s"] for r in res[k])) for k in ("cp", "ours")}
    s["contended"] = {k: sum(contended(r) for r in res[k]) for k in ("cp", "ours", "plan")}
    return s


def fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def table(summaries: list[dict], cmd: list[str]) -> str:
    rows = [("| checkpoint | adapter | tensors | `cp -r`+sync s | ours+sync s | ours / cp | tensors/s | peak RSS MiB "
             "(anon) | `plan` s (CLI) | in-process plan s | in-process merge s |"),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        rows.append(f"| {s['label']} ({s['bytes'] / 1e6:.0f} MB) | {s['adapter']} | {s['tensors']:,} | {fmt(s['cp_s'])} | "
                    f"{fmt(s['ours_s'])} | {fmt(s['ratio'])}x | {fmt(s['tensors_per_s'], ',.0f')} | "
                    f"{fmt(s['ours_maxrss_mib'], '.0f')} ({fmt(s['ours_anon_mib'], '.0f')}) | {fmt(s['plan_s'])} | "
                    f"{fmt(s['inproc_plan_s'], '.3f')} | {fmt(s['inproc_merge_s'])} |")
    return "\n".join(rows) + f"\n\nours = `{shlex.join(cmd)} merge BASE ADAPTER OUT --quiet`"


def linearity(summaries: list[dict]) -> list[str]:
    by = {(s["label"], s["adapter"]): s for s in summaries}
    out = []
    for adapter in ("fused", "attn"):
        full, half = by.get(("full", adapter)), by.get(("half", adapter))
        if not full or not half:
            continue
        parts = [f"tensors {full['tensors'] / half['tensors']:.2f}x"]
        for key, name in (("ours_s", "merge CLI wall"), ("plan_s", "plan CLI wall"),
                          ("inproc_merge_s", "merge in-process"), ("inproc_plan_s", "plan in-process"),
                          ("cp_s", "cp")):
            if full[key] and half[key]:
                parts.append(f"{name} {full[key] / half[key]:.2f}x")
        out.append(f"- {adapter}: full / half: " + ", ".join(parts))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small",
                    help="small: the real tensor count at small dimensions; 30b-a3b-4l: the real dimensions, "
                         "4 layers (about 6 GB)")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-half", action="store_true", help="skip the 24-layer linearity variant")
    ap.add_argument("--no-profile", action="store_true", help="never run the cProfile step")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--json", type=Path, help="write all measurements here")
    ap.add_argument("--idle-wait", type=float, default=20.0,
                    help="before each timed step, wait up to this many seconds for the machine to be < 15%% busy")
    args = ap.parse_args(argv)

    preset = PRESETS[args.preset]
    full = replace(preset, layers=args.layers or preset.layers, experts=args.experts)
    half = args.no_half or args.preset != "small"
    specs = [("full", full)] + ([] if half else [("half", replace(full, layers=full.layers // 2))])
    inputs = {label: ensure_inputs(spec) for label, spec in specs}
    if args.build_only:
        return 0
    cmd, env = ours_command(argparse.Namespace(ours_cmd=None))
    fingerprint = code_fingerprint()
    work = CACHE / "work"
    rm_tree(work)
    work.mkdir(parents=True)
    summaries, raw = [], []
    for label, _ in specs:
        for adapter in ("fused", "attn"):
            res = measure(label, inputs[label], adapter, work, cmd, env, args.repeat, args.idle_wait)
            raw.append(res)
            summaries.append(summarize(res))
    prof = None
    worst = max((s for s in summaries if s["label"] == "full" and s["ratio"]), key=lambda s: s["ratio"], default=None)
    if worst and worst["ratio"] > TARGET_RATIO_TO_CP and not args.no_profile:
        paths = inputs["full"]
        prof = profile(cmd, env, paths["base"], paths[worst["adapter"]], work / "prof")
    rm_tree(work)
    if code_fingerprint() != fingerprint:
        log(f"WARNING: qwen_merge/*.py changed during the run ({fingerprint} -> {code_fingerprint()})")

    print(f"\n## qwen-merge on a Qwen3-30B-A3B-shaped checkpoint (code {fingerprint})\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; repeat {args.repeat} (medians)\n")
    print(table(summaries, cmd))
    print()
    for s in summaries:
        print(f"- {s['label']}/{s['adapter']}: {s['check']}; ours cpu {fmt(s['ours_cpu_s'])} s, other processes "
              f"{fmt(s['other_cpu_s'])} cpu-s, import {fmt(s['import_s'])} s; summary plan "
              f"{s['plan_lines']} lines; min-max cp {s['min_max']['cp'][0]:.2f}-{s['min_max']['cp'][1]:.2f} s, "
              f"ours {s['min_max']['ours'][0]:.2f}-{s['min_max']['ours'][1]:.2f} s; contended runs left out of "
              f"the medians (when a quiet one exists): {s['contended']}")
    for line in linearity(summaries):
        print(line)
    verdict = [f"{s['label']}/{s['adapter']} {fmt(s['ratio'])}x" for s in summaries]
    print(f"\ntarget ours/cp <= {TARGET_RATIO_TO_CP}x: " + ", ".join(verdict))
    if prof:
        print(f"\nprofile of {worst['label']}/{worst['adapter']} (top 15 by tottime):\n\n```\n{prof}\n```")
    if args.json:
        args.json.write_text(json.dumps({"fingerprint": fingerprint, "summaries": summaries, "runs": raw,
                                         "profile": prof}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
