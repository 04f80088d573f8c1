#!/usr/bin/env python3
"""Benchmark FP8 merges: a Qwen3-4B-shaped fine-grained FP8 checkpoint (about 4 GB) and the 4b preset's
r=16 LoRA on all seven projections, merged both ways, side by side with the I/O floor of each:

* FP8 -> FP8 (``qwen-merge merge FP8 ADAPTER OUT``: dequant, merge, requant per 128x128 block) against
  ``cp -r`` + ``sync`` of the FP8 base (the same bytes);
* FP8 -> bf16 (``--dtype bfloat16``: every FP8 tensor dequantized) against ``cp -r`` + ``sync`` of the
  bf16 4b base (writing as many bf16 bytes as the output has).

The FP8 base is built once from the cached bf16 4b preset (``bench_merge.py --preset 4b --build-only``)
with the reference formulas of tests/fp8ref.py (amax/448 per block, F32 scales by default), streamed
tensor by tensor, and kept in ``benchmarks/.cache/4b-fp8/``. Each step runs under ``/usr/bin/time -v``;
the steps alternate, ``--repeat`` times, and the table reports medians.

Usage::

    python benchmarks/bench_fp8.py --repeat 3
    python benchmarks/bench_fp8.py --repeat 3 --drop-caches      # cold page cache before each step
    python benchmarks/bench_fp8.py --scale-dtype bf16            # BF16 scales (Qwen3.5 FP8 layout)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import bench_merge as bm  # noqa: E402
from builders import Streamed, write_safetensors  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = 128
TARGET_FP8 = 1.5  # FP8 -> FP8 within 1.5x cp of the FP8 base
TARGET_BF16 = 1.5  # FP8 -> bf16 within 1.5x cp of the bf16 bytes
TARGET_RSS_MIB = 640


def quantize(w, scale_dtype):
    """(Q float8_e4m3fn, S scale_dtype) of a 2-D tensor per 128x128 block: s = amax/448 stored in the scale
    dtype, Q = e4m3(clip(w / f32(s), ±448)) (tests/fp8ref.py, in fp32 here to build 4 GB in minutes)."""
    import torch
    rows, cols = w.shape
    gr, gc = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = torch.zeros(gr * BLOCK, gc * BLOCK, dtype=torch.float32)
    padded[:rows, :cols] = w
    tiles = padded.view(gr, BLOCK, gc, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)).to(scale_dtype)
    q = (tiles / s.float().view(gr, 1, gc, 1)).clamp_(-448, 448).view(gr * BLOCK, gc * BLOCK)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), s.contiguous()


def build_fp8(bf16: Path, out: Path, scale_dtype) -> Path:
    """The FP8 twin of a bf16 checkpoint: same shard names, projections in F8_E4M3 with weight_scale_inv,
    each shard in the reference writer's order (scales first, then bf16, then FP8)."""
    import torch
    from safetensors import safe_open

    marker = out / "build.json"
    want = {"source": str(bf16), "scale_dtype": str(scale_dtype), "block": BLOCK, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == want:
        bm.log(f"reusing {out}")
        return out / "base"
    shutil.rmtree(out, ignore_errors=True)
    (out / "base.tmp").mkdir(parents=True)
    index = json.loads((bf16 / "model.safetensors.index.json").read_text())
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(bf16 / shard), "pt") as f:
            names = list(f.keys())
            quantized = {n for n in names if n.endswith(".weight") and n.split(".")[-2] in PROJ}
            scales = {n + "_scale_inv": quantize(f.get_tensor(n), scale_dtype)[1] for n in sorted(quantized)}

            def fp8_chunks(name):
                q, s = quantize(f.get_tensor(name), scale_dtype)
                assert torch.equal(s, scales[name + "_scale_inv"])
                yield q.view(torch.uint8)

            def plain(name):
                yield f.get_tensor(name)

            entries = {}
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if name in quantized:
                    entries[name] = ("F8_E4M3", shape, fp8_chunks(name))
                else:
                    entries[name] = ("BF16", shape, plain(name))
            for name, s in scales.items():
                entries[name] = ({torch.float32: "F32", torch.bfloat16: "BF16"}[s.dtype], tuple(s.shape), [s])
            size = {"F32": 4, "BF16": 2, "F8_E4M3": 1}
            ordered = dict(sorted(entries.items(), key=lambda kv: (-size[kv[1][0]], kv[0])))
            total += write_safetensors(out / "base.tmp" / shard, {k: Streamed(*v) for k, v in ordered.items()},
                                       {"format": "pt"}, fsync=True)
            weight_map.update(dict.fromkeys(ordered, shard))
        bm.log(f"  wrote {shard} ({len(quantized)} FP8 weights) at {time.perf_counter() - t0:.0f} s")
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (out / "base.tmp" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(bf16 / "generation_config.json", out / "base.tmp")
    (out / "base.tmp" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    os.replace(out / "base.tmp", out / "base")
    marker.write_text(json.dumps(want))
    return out / "base"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--scale-dtype", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--idle-wait", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--build-only", action="store_true", help="build the cached FP8 base and exit")
    args = ap.parse_args(argv)
    import torch

    cfg = bm.model_cfg(argparse.Namespace(preset="4b", layers=None, hidden=None, dtype="bf16"))
    bf16_base, adapter = bm.ensure_inputs(cfg)
    scale_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.scale_dtype]
    fp8_base = build_fp8(bf16_base, bm.CACHE_ROOT / f"4b-fp8-{args.scale_dtype}", scale_dtype)
    if args.build_only:
        return 0
    work = bm.CACHE_ROOT / "4b-fp8-work"
    bm.rm_tree(work)
    work.mkdir(parents=True)
    ours, env = bm.ours_command(argparse.Namespace(ours_cmd=None))
    steps = {
        "cp fp8": ["cp", "-r", str(fp8_base), str(work / "cp")],
        "fp8->fp8": [*ours, "merge", str(fp8_base), str(adapter), str(work / "ours"), "--quiet"],
        "cp bf16": ["cp", "-r", str(bf16_base), str(work / "cp")],
        "fp8->bf16": [*ours, "merge", str(fp8_base), str(adapter), str(work / "ours"), "--quiet",
                      "--dtype", "bfloat16"],
    }
    if not args.drop_caches:
        bm.warm_read(fp8_base)
    results: dict[str, list[dict]] = {k: [] for k in steps}
    for rep in range(args.repeat):
        bm.log(f"--- repeat {rep + 1}/{args.repeat}")
        for label, cmd in steps.items():
            if label == "cp bf16" and not args.drop_caches:
                bm.warm_read(bf16_base)  # the bf16 source is read by cp only; give it the same warm cache
            res = bm.run_timed(label.replace(" ", "_").replace(">", ""), cmd, env=env, drop=args.drop_caches,
                               idle_wait=args.idle_wait)
            results[label].append(res)
            bm.rm_tree(work / "cp")
            bm.rm_tree(work / "ours")
            if not args.drop_caches and label == "cp bf16":
                bm.warm_read(fp8_base)
    med = {k: bm.median([r["wall_s"] for r in v if r["rc"] == 0]) for k, v in results.items()}
    rss = {k: max(r.get("maxrss_mib", 0) for r in v) for k, v in results.items()}
    size = sum(p.stat().st_size for p in fp8_base.iterdir())
    print(f"\n### FP8 4b: {size / 1e9:.2f} GB fine-grained FP8 ({args.scale_dtype} scales), r=16 LoRA on 7 "
          f"projections x 36 layers; {'cold' if args.drop_caches else 'warm'} page cache; median of "
          f"{args.repeat}\n")
    print("| step | wall s (median) | min–max | peak RSS MiB | vs its floor |")
    print("|---|---|---|---|---|")
    floors = {"fp8->fp8": "cp fp8", "fp8->bf16": "cp bf16"}
    for label, runs in results.items():
        walls = [r["wall_s"] for r in runs if r["rc"] == 0]
        ratio = f"{med[label] / med[floors[label]]:.2f}x `{floors[label]}`" if label in floors else "1.00x"
        print(f"| {label} | {med[label]:.2f} | {min(walls):.2f}–{max(walls):.2f} | {rss[label]:.0f} | {ratio} |")
    fp8_ratio, bf16_ratio = med["fp8->fp8"] / med["cp fp8"], med["fp8->bf16"] / med["cp bf16"]
    print(f"\nTargets: FP8->FP8 {fp8_ratio:.2f}x cp (target <= {TARGET_FP8}) "
          f"{'MET' if fp8_ratio <= TARGET_FP8 else 'MISSED'}; FP8->bf16 {bf16_ratio:.2f}x cp of the bf16 bytes "
          f"(target <= {TARGET_BF16}) {'MET' if bf16_ratio <= TARGET_BF16 else 'MISSED'}; peak RSS "
          f"{max(rss['fp8->fp8'], rss['fp8->bf16']):.0f} MiB (target <= {TARGET_RSS_MIB})")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "median": med}, indent=2, default=str))
    bm.rm_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
