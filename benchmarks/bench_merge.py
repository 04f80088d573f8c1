#!/usr/bin/env python3
"""Benchmark ``qwen-merge merge`` against ``cp -r`` and against the PEFT merge path.

One run does the following:

1. Builds (once, then reuses) a synthetic Qwen3-shaped bf16 (or ``--dtype fp32``) checkpoint and an r=16 LoRA
   adapter on all seven projections, under ``benchmarks/.cache/<preset>/`` (git-ignored).
2. Times ``cp -r BASE DST && sync``: the I/O floor.
3. Times ``qwen-merge merge BASE ADAPTER OUT --quiet`` + ``sync`` under ``/usr/bin/time -v``.
4. Times the PEFT path (``from_pretrained`` -> ``PeftModel.from_pretrained`` -> ``merge_and_unload``
   -> ``save_pretrained``) + ``sync`` under ``/usr/bin/time -v`` (default on for the 1.9gb preset).
5. Prints a markdown table (wall time, peak RSS, sampled anonymous RSS, ratios).

Memory caveat: ``/usr/bin/time``'s "Maximum resident set size" (ru_maxrss) counts *file-backed* pages
that are mapped into the process (e.g. mmapped shards that were touched), so it over-states the heap
of an mmap-based tool.  The benchmark also samples ``RssAnon`` from ``/proc/<pid>/status`` of the
measured process tree every ~10 ms, which is the honest anonymous-memory figure (short spikes
between samples can be missed).  Neither figure includes the page cache.

Usage::

    python benchmarks/bench_merge.py                       # 1.9gb preset, with PEFT
    python benchmarks/bench_merge.py --preset 4b           # Qwen3-4B shapes, no PEFT
    python benchmarks/bench_merge.py --repeat 3 --json out.json
    python benchmarks/bench_merge.py --preset 4b --build-only
    python benchmarks/bench_merge.py --dtype fp32 --repeat 3   # fp32 weights: the float64 merge path
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
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

from builders import Streamed, checkpoint_entries, ulp_distance, write_safetensors  # noqa: E402

CACHE_ROOT = REPO / "benchmarks" / ".cache"
BUILD_VERSION = 1  # bump when the synthetic checkpoint layout changes

PRESETS = {
    "1.9gb": dict(hidden=2048, intermediate=6144, layers=16, vocab=32000, heads=16, kv_heads=8,
                  tied=False, shards=4, peft_default=True),
    "4b": dict(hidden=2560, intermediate=9728, layers=36, vocab=151936, heads=32, kv_heads=8,
               tied=True, shards=3, peft_default=False),
}
HEAD_DIM = 128
LORA_R = 16
LORA_ALPHA = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Targets from the project brief, used only for the informational "targets" section.
TARGET_RATIO_TO_CP = 1.5        # ours wall <= 1.5x cp+sync with a warm cache, 1.3x cold (4b preset)
TARGET_RATIO_TO_CP_COLD = 1.3
TARGET_SPEEDUP_VS_PEFT = 4.0    # ours >= 4x faster than PEFT (1.9gb and 4b presets)
TARGET_RSS_MIB = 640            # ours peak RSS <= 640 MiB

MEMORY_CAVEAT = (
    "Memory caveat: /usr/bin/time's 'Maximum resident set size' (ru_maxrss) counts file-backed pages "
    "mapped into the process (touched mmap pages of the input shards count in full), so it over-states "
    "the heap of an mmap-based tool. 'anon MiB' is RssAnon of the measured process tree, sampled from "
    "/proc every ~10 ms (short spikes between samples can be missed). Neither includes the page cache."
)


# --------------------------------------------------------------------------------------------
# synthetic checkpoint
# --------------------------------------------------------------------------------------------

# Weight dtypes the synthetic checkpoint can be built in: (safetensors name, bytes per element, torch name).
WEIGHT_DTYPES = {"bf16": ("BF16", 2, "bfloat16"), "fp32": ("F32", 4, "float32")}


def model_cfg(args) -> dict:
    cfg = dict(PRESETS[args.preset])
    key = args.preset
    cfg["dtype"] = args.dtype
    if args.dtype != "bf16":
        key += f"-{args.dtype}"
    if args.layers is not None:
        cfg["layers"] = args.layers
        key += f"-L{args.layers}"
    if args.hidden is not None:
        cfg["hidden"] = args.hidden
        key += f"-h{args.hidden}"
    cfg["key"] = key
    return cfg


def tensor_specs(cfg) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) in HF state_dict order."""
    h, i, v = cfg["hidden"], cfg["intermediate"], cfg["vocab"]
    q, kv = cfg["heads"] * HEAD_DIM, cfg["kv_heads"] * HEAD_DIM
    specs = [("model.embed_tokens.weight", (v, h), "normal")]
    for L in range(cfg["layers"]):
        p = f"model.layers.{L}."
        specs += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (q, h), "normal"),
            (p + "self_attn.k_proj.weight", (kv, h), "normal"),
            (p + "self_attn.v_proj.weight", (kv, h), "normal"),
            (p + "self_attn.o_proj.weight", (h, q), "normal"),
            (p + "self_attn.q_norm.weight", (HEAD_DIM,), "norm"),
            (p + "self_attn.k_norm.weight", (HEAD_DIM,), "norm"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (i, h), "normal"),
            (p + "mlp.up_proj.weight", (i, h), "normal"),
            (p + "mlp.down_proj.weight", (h, i), "normal"),
        ]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not cfg["tied"]:
        specs.append(("lm_head.weight", (v, h), "normal"))
    return specs


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def split_shards(specs, n_shards):
    """Greedy split in state_dict order into at most n_shards of ~equal bytes."""
    total = sum(numel(s) for _, s, _ in specs)
    target = total / n_shards
    shards, cur, cur_bytes = [], [], 0
    for spec in specs:
        nb = numel(spec[1])
        if cur and cur_bytes + nb > target and len(shards) < n_shards - 1:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(spec)
        cur_bytes += nb
    shards.append(cur)
    return shards


def gen_chunks(shape, init, gen, dtype: str, max_elems=8 * 1024 * 1024):
    """Yield torch tensors of `dtype` covering the tensor row-major, bounded in size."""
    import torch
    rows = shape[0]
    row_elems = numel(shape[1:]) if len(shape) > 1 else 1
    step = max(1, max_elems // row_elems)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0) * row_elems
        x = torch.randn(n, generator=gen)
        if init == "norm":
            x.mul_(0.05).add_(1.0)
        else:
            x.mul_(0.02)
        yield x.to(getattr(torch, WEIGHT_DTYPES[dtype][2]))


def write_shard(path: Path, specs, gen, dtype: str):
    """Stream one safetensors shard to disk, tensor by tensor (bounded memory)."""
    ordered = sorted(specs, key=lambda s: s[0])  # reference writer: same dtype -> by name
    tmp = path.with_name(path.name + ".tmp")
    off = write_safetensors(tmp, {name: Streamed(WEIGHT_DTYPES[dtype][0], shape, gen_chunks(shape, init, gen, dtype))
                                  for name, shape, init in ordered}, {"format": "pt"}, fsync=True)
    os.replace(tmp, path)
    return off


def hf_config(cfg) -> dict:
    big_vocab = cfg["vocab"] >= 151936
    bos, eos = (151643, 151645) if big_vocab else (cfg["vocab"] - 2, cfg["vocab"] - 1)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": cfg["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate"],
        "max_position_embeddings": 40960,
        "max_window_layers": cfg["layers"],
        "model_type": "qwen3",
        "num_attention_heads": cfg["heads"],
        "num_hidden_layers": cfg["layers"],
        "num_key_value_heads": cfg["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": cfg["tied"],
        "torch_dtype": WEIGHT_DTYPES[cfg["dtype"]][2],
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": cfg["vocab"],
    }


def build_marker(cfg) -> dict:
    return {"version": BUILD_VERSION, **{k: v for k, v in cfg.items() if k not in ("peft_default",)}}


def expected_total_size(cfg) -> int:
    return sum(numel(s) * WEIGHT_DTYPES[cfg["dtype"]][1] for _, s, _ in tensor_specs(cfg))


def free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def lora_tensors(cfg, specs, gen) -> dict:
    """A LoRA adapter's tensors (PEFT names), fp32, r=16 on all seven projections of every layer."""
    import torch

    shapes = {name: shape for name, shape, _ in specs}
    tensors = {}
    for L in range(cfg["layers"]):
        for t in TARGETS:
            sub = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            mod = f"model.layers.{L}.{sub}.{t}"
            out_f, in_f = shapes[mod + ".weight"]
            a = torch.randn(LORA_R, in_f, generator=gen) * (1.0 / math.sqrt(in_f))
            b = torch.randn(out_f, LORA_R, generator=gen) * 0.02
            tensors[f"base_model.model.{mod}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{mod}.lora_B.weight"] = b.contiguous()
    return tensors


def ensure_inputs(cfg, seed=0) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    root = CACHE_ROOT / cfg["key"]
    base, adapter, marker = root / "base", root / "adapter", root / "build.json"
    want = build_marker(cfg)
    if marker.exists() and base.is_dir() and adapter.is_dir():
        try:
            if json.loads(marker.read_text()) == want:
                log(f"reusing cached inputs in {root}")
                return base, adapter
        except ValueError:
            pass
    total = expected_total_size(cfg)
    need = 2 * total + (1 << 30)  # input + one output at a time + margin
    free = free_bytes(CACHE_ROOT)
    if free < need:
        sys.exit(f"not enough free disk under {CACHE_ROOT}: {free / 1e9:.1f} GB free, "
                 f"need ~{need / 1e9:.1f} GB (input {total / 1e9:.1f} GB + one output + 1 GiB)")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    log(f"building synthetic checkpoint {cfg['key']} ({total / 1e9:.2f} GB) in {base} ...")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    gen = torch.Generator().manual_seed(seed)
    specs = tensor_specs(cfg)
    shards = split_shards(specs, cfg["shards"])
    n = len(shards)
    tmpbase = root / "base.tmp"
    tmpbase.mkdir()
    weight_map, total_written = {}, 0
    for idx, shard in enumerate(shards):
        fname = f"model-{idx + 1:05d}-of-{n:05d}.safetensors"
        total_written += write_shard(tmpbase / fname, shard, gen, cfg["dtype"])
        for name, _, _ in shard:
            weight_map[name] = fname
        log(f"  wrote {fname} ({len(shard)} tensors)")
    assert total_written == total
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmpbase / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmpbase / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    gc_ids = hf_config(cfg)
    (tmpbase / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": gc_ids["bos_token_id"], "eos_token_id": gc_ids["eos_token_id"],
         "do_sample": False}, indent=2) + "\n")
    os.replace(tmpbase, base)

    # LoRA adapter (PEFT format), fp32, r=16 on all seven projections.
    tmpad = root / "adapter.tmp"
    tmpad.mkdir()
    tensors = lora_tensors(cfg, specs, gen)
    save_file(tensors, str(tmpad / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_cfg = {
        "peft_type": "LORA", "r": LORA_R, "lora_alpha": LORA_ALPHA, "target_modules": TARGETS,
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "lora_dropout": 0.0,
        "inference_mode": True,
    }
    (tmpad / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2) + "\n")
    os.replace(tmpad, adapter)
    marker.write_text(json.dumps(want, indent=2) + "\n")
    log(f"built inputs in {time.perf_counter() - t0:.1f} s")
    return base, adapter


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------

def log(msg: str):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def sync():
    subprocess.run(["sync"], check=True)


def drop_caches():
    sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        log(f"cannot drop caches ({e}); continuing with a warm page cache")


def warm_read(path: Path):
    """Read every file under path once so every tool starts from the same (warm) page cache."""
    buf = bytearray(16 << 20)
    mv = memoryview(buf)
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.readinto(mv):
                    pass


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all CPUs; idle and iowait excluded)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_idle(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait s) until the machine's busy fraction over 1 s drops below threshold.

    Returns the last measured busy fraction (0..1 of all CPUs)."""
    ncpu = os.cpu_count() or 1
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = cpu_busy_s(), time.monotonic()
        time.sleep(1.0)
        frac = (cpu_busy_s() - b0) / ((time.monotonic() - t0) * ncpu)
        if frac < threshold or time.monotonic() >= deadline:
            if frac >= threshold and max_wait > 0:
                log(f"machine still {frac:.0%} busy after waiting {max_wait:.0f} s; measuring anyway")
            return frac
        time.sleep(2.0)


def _ppid_map() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    s = f.read()
                out[int(d)] = int(s[s.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _status_kib(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            txt = f.read()
    except OSError:
        return None
    anon = re.search(rb"RssAnon:\s+(\d+)", txt)
    rss = re.search(rb"VmRSS:\s+(\d+)", txt)
    if not anon or not rss:
        return None
    return int(anon.group(1)), int(rss.group(1))


class TreeSampler(threading.Thread):
    """Samples RssAnon/VmRSS (summed over the process tree below ``root``) every ``interval`` s."""

    def __init__(self, root: int, interval=0.01, exclude=()):
        super().__init__(daemon=True)
        self.root, self.interval, self.exclude = root, interval, set(exclude)
        self.stop = threading.Event()
        self.peak_anon_kib = 0
        self.peak_rss_kib = 0
        self.samples = 0

    def run(self):
        pids: set[int] = set()
        last_scan = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now - last_scan > (0.05 if now - self._t0 < 1 else 0.5):
                pm = _ppid_map()
                kids: dict[int, list[int]] = {}
                for p, pp in pm.items():
                    kids.setdefault(pp, []).append(p)
                todo, pids = [self.root], set()
                while todo:
                    p = todo.pop()
                    for c in kids.get(p, ()):
                        if c not in pids:
                            pids.add(c)
                            todo.append(c)
                last_scan = now
            anon = rss = 0
            for p in list(pids):
                if p in self.exclude:
                    continue
                v = _status_kib(p)
                if v:
                    anon += v[0]
                    rss += v[1]
            self.peak_anon_kib = max(self.peak_anon_kib, anon)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.samples += 1
            self.stop.wait(self.interval)

    def start(self):
        self._t0 = time.monotonic()
        super().start()


def parse_time_v(text: str) -> dict:
    out = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["maxrss_kib"] = int(m.group(1))
    for key, pat in (("user_s", r"User time \(seconds\): ([\d.]+)"),
                     ("sys_s", r"System time \(seconds\): ([\d.]+)"),
                     ("cpu_pct", r"Percent of CPU this job got: (\d+)%"),
                     ("major_faults", r"Major \(requiring I/O\) page faults: (\d+)"),
                     ("minor_faults", r"Minor \(reclaiming a frame\) page faults: (\d+)"),
                     ("fs_in", r"File system inputs: (\d+)"),
                     ("fs_out", r"File system outputs: (\d+)"),
                     ("exit_status", r"Exit status: (\d+)")):
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    return out


def run_timed(label: str, cmd: list[str], env=None, sample=True, drop=False, logdir: Path = None,
              idle_wait: float = 0.0):
    """sync (untimed), then time ``/usr/bin/time -v cmd`` + ``sync``."""
    if drop:
        drop_caches()
    else:
        sync()
    busy_before = wait_idle(idle_wait)
    tfile = tempfile.NamedTemporaryFile("w+", prefix="bench-time-", suffix=".txt", delete=False)
    tfile.close()
    logpath = (logdir or Path(tempfile.gettempdir())) / f"bench-{label}.log"
    full = ["/usr/bin/time", "-v", "-o", tfile.name, *cmd]
    log(f"{label}: {shlex.join(cmd)}")
    load0 = os.getloadavg()[0]
    with open(logpath, "w") as lf:
        busy0, self0 = cpu_busy_s(), self_cpu_s()
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=lf, stderr=subprocess.STDOUT, env=env)
        sampler = None
        if sample:
            sampler = TreeSampler(p.pid)
            sampler.start()
        rc = p.wait()
        t1 = time.perf_counter()
        if sampler:
            sampler.stop.set()
            sampler.join()
        sync()
        t2 = time.perf_counter()
        busy_total, self_total = cpu_busy_s() - busy0, self_cpu_s() - self0
    tv = parse_time_v(Path(tfile.name).read_text())
    os.unlink(tfile.name)
    res = {
        "label": label, "cmd": cmd, "rc": rc, "wall_s": t2 - t0, "cmd_s": t1 - t0, "sync_s": t2 - t1,
        "loadavg_before": load0, "loadavg_after": os.getloadavg()[0], **tv,
    }
    res["busy_before_frac"] = busy_before
    if "user_s" in tv and "sys_s" in tv:
        res["cpu_s"] = tv["user_s"] + tv["sys_s"]
        # CPU used by everything else (other users, kernel flusher threads, this harness's sampler).
        res["other_cpu_s"] = max(0.0, busy_total - res["cpu_s"] - self_total)
        res["harness_cpu_s"] = self_total
    if "maxrss_kib" in res:
        res["maxrss_mib"] = res["maxrss_kib"] / 1024
    if sampler:
        res["anon_peak_mib"] = sampler.peak_anon_kib / 1024
        res["sampled_rss_peak_mib"] = sampler.peak_rss_kib / 1024
        res["samples"] = sampler.samples
    if rc != 0:
        tail = logpath.read_text(errors="replace")[-3000:]
        res["error_tail"] = tail
        log(f"{label} FAILED rc={rc}; log {logpath}:\n{tail}")
    else:
        log(f"{label}: {res['wall_s']:.2f} s (cmd {res['cmd_s']:.2f} + sync {res['sync_s']:.2f}), "
            f"maxrss {res.get('maxrss_mib', float('nan')):.0f} MiB, "
            f"anon {res.get('anon_peak_mib', float('nan')):.0f} MiB, cpu {res.get('cpu_s', float('nan')):.1f} s, "
            f"other procs cpu {res.get('other_cpu_s', float('nan')):.1f} s, busy before {busy_before:.0%}")
    return res


# --------------------------------------------------------------------------------------------
# correctness spot-check
# --------------------------------------------------------------------------------------------

def checkpoint_tensors(d: Path) -> dict[str, tuple[Path, dict]]:
    """name -> (shard path, header entry), from the headers only (tests/builders.py)."""
    return {name: (d / shard, entry) for name, (shard, entry) in checkpoint_entries(d).items()}


def spot_check(base: Path, adapter: Path, out: Path, cfg, strict_keys=True) -> dict:
    import torch
    from safetensors import safe_open
    res = {"ok": True, "notes": []}
    try:
        src = checkpoint_tensors(base)
        dst = checkpoint_tensors(out)
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "notes": [f"cannot read output headers: {e!r}"]}
    missing = sorted(set(src) - set(dst))
    extra = sorted(set(dst) - set(src))
    if missing or extra:
        msg = f"key mismatch: missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)})"
        res["notes"].append(msg)
        if strict_keys:
            res["ok"] = False
    for k in set(src) & set(dst):
        a, b = src[k][1], dst[k][1]
        if a["shape"] != b["shape"] or a["dtype"] != b["dtype"]:
            res["ok"] = False
            res["notes"].append(f"{k}: {a['dtype']}{a['shape']} -> {b['dtype']}{b['shape']}")
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / acfg["r"]
    mid = cfg["layers"] // 2
    names = [f"model.layers.{mid}.self_attn.q_proj", f"model.layers.{cfg['layers'] - 1}.mlp.down_proj"]
    max_ulp_all = 0
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as fa:
        for mod in names:
            wname = mod + ".weight"
            if wname not in dst:
                continue
            with safe_open(str(src[wname][0]), "pt") as fs:
                w = fs.get_tensor(wname)
            with safe_open(str(dst[wname][0]), "pt") as fo:
                o = fo.get_tensor(wname)
            A = fa.get_tensor(f"base_model.model.{mod}.lora_A.weight").float()
            B = fa.get_tensor(f"base_model.model.{mod}.lora_B.weight").float()
            ref = (w.double() + scale * (B.double() @ A.double())).to(w.dtype)
            diff = ulp_distance(o, ref)
            max_ulp = int(diff.max())
            changed = int((o != w).sum())
            max_ulp_all = max(max_ulp_all, max_ulp)
            res["notes"].append(f"{wname}: max {max_ulp} ulp vs float64 W+{scale:g}*B@A, "
                                f"{int((diff > 0).sum())}/{diff.numel()} differ, "
                                f"{changed} elements changed from base")
            if max_ulp > 1 or changed == 0:
                res["ok"] = False
    for k in ("model.norm.weight", f"model.layers.{mid}.input_layernorm.weight"):
        if k in dst:
            with safe_open(str(src[k][0]), "pt") as fs, safe_open(str(dst[k][0]), "pt") as fo:
                if not torch.equal(fs.get_tensor(k).view(torch.int16), fo.get_tensor(k).view(torch.int16)):
                    res["ok"] = False
                    res["notes"].append(f"{k}: untouched tensor differs")
    res["max_ulp"] = max_ulp_all
    if not (out / "config.json").exists():
        res["notes"].append("no config.json in output")
    return res


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------

PEFT_SCRIPT = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, dtype = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""


def ours_command(args) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if args.ours_cmd:
        return shlex.split(args.ours_cmd), env
    exe = shutil.which("qwen-merge")
    if exe:
        # Only trust the console script when it imports *this* checkout (not a stale install).
        r = subprocess.run([sys.executable, "-c", "import qwen_merge,os;print(os.path.dirname(qwen_merge.__file__))"],
                           capture_output=True, text=True, cwd="/")
        if r.returncode == 0 and Path(r.stdout.strip()).resolve() == (REPO / "qwen_merge").resolve():
            return [exe], env
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, "-m", "qwen_merge"], env


def code_fingerprint() -> str:
    """sha256 (12 hex) over qwen_merge/*.py, to tie numbers to the library version measured."""
    import hashlib
    h = hashlib.sha256()
    for f in sorted((REPO / "qwen_merge").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def peft_available() -> str | None:
    r = subprocess.run([sys.executable, "-c", "import peft, transformers; print(peft.__version__, transformers.__version__)"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def rm_tree(p: Path):
    if p.exists():
        shutil.rmtree(p)


def du_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1.9gb")
    ap.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), default="bf16",
                    help="weight dtype of the synthetic checkpoint (fp32: the float64 merge path)")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--hidden", type=int, help="override the preset's hidden size")
    ap.add_argument("--repeat", type=int, default=1, help="run each step N times, report the median")
    ap.add_argument("--json", type=Path, help="dump raw numbers to this path")
    peft_grp = ap.add_mutually_exclusive_group()
    peft_grp.add_argument("--peft", dest="peft", action="store_true", default=None,
                          help="run the PEFT baseline (default only for 1.9gb)")
    peft_grp.add_argument("--no-peft", dest="peft", action="store_false")
    ap.add_argument("--no-cp", action="store_true", help="skip the cp -r baseline")
    ap.add_argument("--no-ours", action="store_true", help="skip qwen-merge")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness spot-check")
    ap.add_argument("--no-sample", action="store_true", help="do not sample RssAnon from /proc")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before each timed step (root only; cold source)")
    ap.add_argument("--no-warm", action="store_true",
                    help="do not pre-read the inputs once before timing")
    ap.add_argument("--ours-cmd", help="command prefix for our CLI (default: qwen-merge, or python -m qwen_merge)")
    ap.add_argument("--build-only", action="store_true", help="build the cached inputs and exit")
    ap.add_argument("--idle-wait", type=float, default=60.0,
                    help="before each step wait up to this many seconds for the machine to be idle (<15%% busy)")
    ap.add_argument("--keep-contended", action="store_true",
                    help="include runs during which other processes used >25%% of the CPUs in the medians")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed or a check fails")
    args = ap.parse_args(argv)

    if not Path("/usr/bin/time").exists():
        sys.exit("/usr/bin/time (GNU time) is required")
    cfg = model_cfg(args)
    base, adapter = ensure_inputs(cfg)
    if args.build_only:
        return 0

    run_peft = cfg["peft_default"] if args.peft is None else args.peft
    peft_ver = peft_available() if run_peft else None
    if run_peft and not peft_ver:
        log("peft/transformers not importable: skipping the PEFT baseline")
        run_peft = False
    ours_cmd, ours_env = ours_command(args)
    fingerprint = code_fingerprint()
    peft_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    total = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    n_tensors = len(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"])
    n_shards = len(list(base.glob("*.safetensors")))
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    work = CACHE_ROOT / cfg["key"] / "work"
    rm_tree(work)
    work.mkdir(parents=True)
    need = du_bytes(base) * 1.05 + (512 << 20)
    if free_bytes(work) < need:
        sys.exit(f"not enough free disk for one output: {free_bytes(work) / 1e9:.1f} GB free, "
                 f"need {need / 1e9:.1f} GB")

    if not args.no_warm and not args.drop_caches:
        t = time.perf_counter()
        warm_read(base)
        warm_read(adapter)
        log(f"pre-read inputs in {time.perf_counter() - t:.1f} s (warm page cache for every tool)")

    runs = {"cp": [], "ours": [], "peft": []}
    checks = {}
    sample = not args.no_sample
    for rep in range(args.repeat):
        log(f"--- repeat {rep + 1}/{args.repeat}")
        if not args.no_cp:
            dst = work / "cp"
            runs["cp"].append(run_timed("cp", ["cp", "-r", str(base), str(dst)], sample=sample,
                                        drop=args.drop_caches, logdir=work.parent, idle_wait=args.idle_wait))
            rm_tree(dst)
        if not args.no_ours:
            out = work / "ours"
            runs["ours"].append(run_timed("ours", [*ours_cmd, "merge", str(base), str(adapter), str(out), "--quiet"],
                                          env=ours_env, sample=sample, drop=args.drop_caches, logdir=work.parent,
                                          idle_wait=args.idle_wait))
            if rep == 0 and not args.no_check and runs["ours"][-1]["rc"] == 0:
                checks["ours"] = spot_check(base, adapter, out, cfg)
                log(f"ours spot-check: {'OK' if checks['ours']['ok'] else 'FAILED'}; "
                    + "; ".join(checks["ours"]["notes"]))
            rm_tree(out)
        if run_peft:
            out = work / "peft"
            runs["peft"].append(run_timed("peft", [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out),
                                                   WEIGHT_DTYPES[cfg["dtype"]][2]],
                                          env=peft_env, sample=sample, drop=args.drop_caches, logdir=work.parent,
                                          idle_wait=args.idle_wait))
            if rep == 0 and not args.no_check and runs["peft"][-1]["rc"] == 0:
                # PEFT double-rounds (W + rnd(dW)), and drops lm_head for tied models: informational only.
                checks["peft"] = spot_check(base, adapter, out, cfg, strict_keys=False)
                log("peft spot-check (informational): " + "; ".join(checks["peft"]["notes"]))
            rm_tree(out)
    rm_tree(work)

    fingerprint_end = code_fingerprint()
    if fingerprint_end != fingerprint:
        log(f"WARNING: qwen_merge/*.py changed during the run ({fingerprint} -> {fingerprint_end})")

    ncpu = os.cpu_count() or 1
    for v in runs.values():
        for r in v:
            # Contended: other processes used more than 25% of the machine (and > 1 CPU-s) during the step.
            r["contended"] = r.get("other_cpu_s", 0.0) > max(1.0, 0.25 * ncpu * r["wall_s"])

    def summary(key):
        ok = [r for r in runs[key] if r["rc"] == 0]
        if not ok:
            return None
        quiet = [r for r in ok if not r["contended"]]
        excluded = 0
        if quiet and not args.keep_contended:
            excluded = len(ok) - len(quiet)
            ok = quiet
        return {
            "wall_s": median([r["wall_s"] for r in ok]),
            "cmd_s": median([r["cmd_s"] for r in ok]),
            "sync_s": median([r["sync_s"] for r in ok]),
            "maxrss_mib": median([r.get("maxrss_mib") for r in ok]),
            "anon_peak_mib": median([r.get("anon_peak_mib") for r in ok]),
            "cpu_s": median([r.get("cpu_s") for r in ok]),
            "other_cpu_s": median([r.get("other_cpu_s") for r in ok]),
            "wall_min_s": min(r["wall_s"] for r in ok), "wall_max_s": max(r["wall_s"] for r in ok),
            "n": len(ok), "failed": len([r for r in runs[key] if r["rc"] != 0]), "contended_excluded": excluded,
            "contended_used": sum(1 for r in ok if r["contended"]),
        }

    S = {k: summary(k) for k in runs}
    cp_wall = S["cp"]["wall_s"] if S["cp"] else None
    ours_wall = S["ours"]["wall_s"] if S["ours"] else None
    peft_wall = S["peft"]["wall_s"] if S["peft"] else None

    def row(name, k):
        s = S[k]
        if s is None:
            if runs[k]:
                return f"| {name} | FAILED (rc={runs[k][0]['rc']}) | | | | | | | |"
            return None
        ratio = s["wall_s"] / cp_wall if cp_wall else None
        speed = peft_wall / s["wall_s"] if peft_wall else None
        spread = f"{s['wall_min_s']:.2f}–{s['wall_max_s']:.2f}" if s["n"] > 1 else "–"
        notes = []
        if s["contended_excluded"]:
            notes.append(f"{s['contended_excluded']} contended run(s) excluded")
        if s["contended_used"]:
            notes.append(f"CONTENDED: {s['contended_used']} run(s) used ran while other processes were busy")
        if s["failed"]:
            notes.append(f"{s['failed']} of {len(runs[k])} run(s) FAILED")
        if notes:
            name += f" ({s['n']} run(s) used; " + "; ".join(notes) + ")"
        return (f"| {name} | {fmt(s['wall_s'])} | {spread} | {fmt(s['cpu_s'], '.1f')} | {fmt(s['other_cpu_s'], '.1f')} | {fmt(s['maxrss_mib'], '.0f')} | "
                f"{fmt(s['anon_peak_mib'], '.0f')} | {fmt(ratio) + 'x' if ratio else 'n/a'} | "
                f"{fmt(speed, '.1f') + 'x' if speed else 'n/a'} |")

    versions = {"python": platform.python_version()}
    try:
        import torch
        versions["torch"] = torch.__version__
    except ImportError:
        pass
    if peft_ver:
        versions["peft"], versions["transformers"] = peft_ver.split()

    lines = []
    lines.append(f"### preset `{cfg['key']}`: {total / 1e9:.2f} GB {cfg['dtype']} ({total / 2**30:.2f} GiB), "
                 f"{n_tensors} tensors in {n_shards} shards; adapter r={LORA_R} on 7 projections x "
                 f"{cfg['layers']} layers ({adapter_bytes / 2**20:.0f} MiB fp32)")
    lines.append("")
    lines.append(f"median of {args.repeat} run(s); wall includes the trailing `sync`; "
                 f"{'cold page cache (dropped before each step)' if args.drop_caches else 'warm source page cache'}; "
                 f"{os.cpu_count()} CPUs; 1-min load average {os.getloadavg()[0]:.2f} at the end; "
                 f"qwen_merge/*.py sha256 {fingerprint}; {time.strftime('%Y-%m-%d %H:%M')}")
    lines.append("")
    lines.append("| tool | wall s | wall min–max | CPU s (user+sys) | other CPU s | peak RSS MiB (time -v) "
                 "| peak anon MiB (sampled) | vs cp+sync | speed-up vs PEFT |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, k in (("`cp -r` + sync", "cp"), (f"qwen-merge (`{shlex.join(ours_cmd)}`)", "ours"),
                    ("PEFT merge_and_unload + save_pretrained", "peft")):
        r = row(name, k)
        if r:
            lines.append(r)
    lines.append("")
    lines.append("'other CPU s': CPU seconds used by every other process on the machine during the step "
                 "(from /proc/stat, minus the tool and this harness). A run is 'contended' when that exceeds "
                 "25% of the machine over the step (and 1 CPU-s); medians skip contended runs when at least one quiet run exists"
                 + (" (disabled by --keep-contended)." if args.keep_contended else "."))
    if fingerprint_end != fingerprint:
        lines.append(f"WARNING: qwen_merge/*.py changed during the run ({fingerprint} -> {fingerprint_end}); "
                     "the numbers may mix versions.")
    lines.append("")
    lines.append(MEMORY_CAVEAT)
    for k in ("ours", "peft"):
        if k in checks:
            c = checks[k]
            lines.append(f"Spot-check {k}: {'OK' if c['ok'] else 'FAILED'} — " + "; ".join(c["notes"]))
    targets = []
    if S["ours"]:
        if cp_wall:
            r = ours_wall / cp_wall
            limit = TARGET_RATIO_TO_CP_COLD if args.drop_caches else TARGET_RATIO_TO_CP
            targets.append((f"ours/cp+sync = {r:.2f} (target <= {limit:g} "
                            f"{'cold' if args.drop_caches else 'warm'}, set for 4b)", r <= limit))
        if peft_wall:
            sp = peft_wall / ours_wall
            targets.append((f"PEFT/ours = {sp:.1f}x (target >= {TARGET_SPEEDUP_VS_PEFT:g}x, set for 1.9gb and 4b)",
                            sp >= TARGET_SPEEDUP_VS_PEFT))
        rss = S["ours"]["maxrss_mib"]
        if rss is not None:
            targets.append((f"ours peak RSS (time -v) = {rss:.0f} MiB (target <= {TARGET_RSS_MIB})",
                            rss <= TARGET_RSS_MIB))
    if targets:
        lines.append("")
        lines.append("Targets: " + "; ".join(f"{t} {'MET' if ok else 'MISSED'}" for t, ok in targets))
    report = "\n".join(lines)
    print(report)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "preset": cfg["key"], "config": cfg, "total_size": total, "tensors": n_tensors, "shards": n_shards,
            "adapter_bytes": adapter_bytes, "repeat": args.repeat, "drop_caches": args.drop_caches,
            "warm": not args.no_warm and not args.drop_caches, "ours_cmd": ours_cmd, "versions": versions,
            "qwen_merge_sha256_12": fingerprint, "qwen_merge_sha256_12_end": fingerprint_end, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "cpus": os.cpu_count(), "uname": platform.uname()._asdict(),
            "runs": runs, "summary": S, "checks": checks,
            "targets": [{"target": t, "met": ok} for t, ok in targets],
        }, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")

    failed = any(r["rc"] != 0 for v in runs.values() for r in v) or any(not c["ok"] for k, c in checks.items() if k == "ours")
    if args.strict and (failed or not all(ok for _, ok in targets)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
