"""GGUF output against the safetensors merge of the same inputs, and against `cp` of the same bytes, side by
side in one run, then a check that what was timed is right (the GGUF tensors against the folder merge's):

    python benchmarks/bench_merge.py --preset 4b --build-only    # once: the ~8 GB Qwen3-4B-shaped inputs
    python benchmarks/bench_gguf.py --repeat 3                   # warm page cache
    python benchmarks/bench_gguf.py --repeat 3 --cold            # the page cache dropped before each run (root)

Workloads, alternating in each round (the order rotates) so a slow minute of a shared machine falls on all:
* `cp`: `cp` of the base's shards into a fresh folder, then `sync`;
* `safetensors`: `qwen-merge merge BASE ADAPTER OUT` (the folder output);
* `gguf bf16` and `gguf q8_0`: `qwen-merge merge BASE ADAPTER OUT.gguf --outtype T`.

The preset has no tokenizer; the GGUF needs one, so BASE here is a folder of hard links to the preset's
files plus a synthetic byte-level BPE tokenizer of Qwen3's size (151,643 tokens and merges, Qwen3's 26 added
tokens), so the header is as large as a real Qwen3 GGUF's. Reported per workload: median wall seconds
(including the `sync` of what was written) with min–max, the ratio to the safetensors merge and to `cp`,
CPU-seconds and CPU-seconds per GB of base, and the peak anonymous memory (RssAnon of the process tree,
sampled; ru_maxrss counts page-cache pages a process maps and is not shown).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from bench_ab import cpu_model  # benchmarks/ is the script's folder
from bench_merge import drop_caches, run_timed

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
PRESET = CACHE / "4b"
VIEW = CACHE / "4b-gguf"
WORK = CACHE / "gguf-work"
QWEN3_TOKENS, QWEN3_ADDED = 151643, 26  # Qwen3's BPE vocabulary and its added tokens (ids 151643..151668)


def inputs() -> tuple[Path, Path]:
    """The preset's base as hard links plus a tokenizer, and its adapter."""
    if not (PRESET / "base" / "config.json").is_file():
        sys.exit("no 4b inputs: run `python benchmarks/bench_merge.py --preset 4b --build-only` first")
    base = VIEW / "base"
    if not (base / "tokenizer.json").is_file():
        shutil.rmtree(VIEW, ignore_errors=True)
        base.mkdir(parents=True)
        for path in (PRESET / "base").iterdir():
            os.link(path, base / path.name)
        write_tokenizer(base)
    return base, PRESET / "adapter"


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer the size of Qwen3's: 256 byte tokens, then tokens made by merging pairs of
    earlier ones (a valid merge list), then Qwen3's number of added special tokens."""
    chars = [chr(b) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255 else None for b in range(256)]
    extra = iter(range(256, 1024))
    chars = [c if c is not None else chr(next(extra)) for c in chars]
    tokens, merges, seen = list(chars), [], set(chars)
    for a in tokens:  # grows while iterated: pairs of bytes first, then longer tokens
        for b in chars:
            if (new := a + b) not in seen:
                seen.add(new)
                tokens.append(new)
                merges.append([a, b])
            if len(tokens) == QWEN3_TOKENS:
                break
        if len(tokens) == QWEN3_TOKENS:
            break
    added = [{"id": QWEN3_TOKENS + k, "content": f"<|extra_{k}|>" if k > 2 else
              ("<|endoftext|>", "<|im_start|>", "<|im_end|>")[k], "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for k in range(QWEN3_ADDED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: n for n, t in enumerate(tokens)}, "merges": merges}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                            "{{ m['content'] }}<|im_end|>\n{% endfor %}"}))


OUTPUTS = {"cp": WORK / "cp", "safetensors": WORK / "folder", "gguf bf16": WORK / "out.bf16.gguf",
           "gguf q8_0": WORK / "out.q8_0.gguf"}


def workloads(base: Path, adapter: Path) -> dict[str, list[str]]:
    shards = sorted(str(p) for p in base.glob("*.safetensors"))
    merge = [sys.executable, "-m", "qwen_merge", "merge", str(base), str(adapter)]
    return {"cp": ["cp", *shards, str(OUTPUTS["cp"])],
            "safetensors": [*merge, str(OUTPUTS["safetensors"]), "--quiet"],
            "gguf bf16": [*merge, str(OUTPUTS["gguf bf16"]), "--outtype", "bf16", "--quiet"],
            "gguf q8_0": [*merge, str(OUTPUTS["gguf q8_0"]), "--outtype", "q8_0", "--quiet"]}


def clean(name: str) -> None:
    """The workload's earlier output removed; the others' stay, so that `check_outputs` sees the last of each."""
    out = OUTPUTS[name]
    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    OUTPUTS["cp"].mkdir(parents=True, exist_ok=True)


def check_outputs() -> None:
    """What was timed is right: every tensor of the bf16 GGUF equals the folder merge's bytes, and every
    fourth tensor of the Q8_0 GGUF equals the `gguf` package's quantization of the folder merge's."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    folder = OUTPUTS["safetensors"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, blocks)
    hf_name = {names.get_name(n, try_suffixes=(".weight", ".bias")): n for n in index}
    for path, every in ((OUTPUTS["gguf bf16"], 1), (OUTPUTS["gguf q8_0"], 4)):
        if not path.is_file():
            continue
        tensors = gguf.GGUFReader(path).tensors[::every]
        for t in tensors:
            name = hf_name[t.name]
            with safe_open(folder / index[name], "pt") as f:
                merged = f.get_tensor(name)
            if t.tensor_type.name == "Q8_0":
                want = gguf.quants.quantize(merged.float().numpy(), t.tensor_type).tobytes()
            else:
                want = merged.to(torch.float32 if t.tensor_type.name == "F32" else merged.dtype).view(-1).view(
                    torch.uint8).numpy().tobytes()
            if np.asarray(t.data).tobytes() != want:
                sys.exit(f"{path.name}: tensor {t.name} differs from the folder merge's")
        print(f"[bench] {path.name}: {len(tensors)} tensors equal the folder merge's")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (needs root)")
    ap.add_argument("--only", default="", help="comma-separated workloads to run (default: all)")
    args = ap.parse_args()
    base, adapter = inputs()
    jobs = workloads(base, adapter)
    if args.only:
        jobs = {k: v for k, v in jobs.items() if k in args.only.split(",")}
    gb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    env = dict(os.environ, PYTHONPATH=str(REPO))
    results: dict[str, list[dict]] = {name: [] for name in jobs}
    names = list(jobs)
    try:
        for r in range(args.repeat):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
                clean(name)
                if args.cold:
                    drop_caches()
                res = run_timed(name.replace(" ", "-"), jobs[name], env=env)
                if res["rc"] != 0:
                    sys.exit(f"{name} failed: {res.get('error_tail', '')}")
                results[name].append(res)
        if "safetensors" in jobs:
            check_outputs()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    report(results, gb, args)


def report(results: dict[str, list[dict]], gb: float, args) -> None:
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in results.items()}
    print(f"\nbase: {gb:.2f} GB bf16 (Qwen3-4B-shaped preset), {args.repeat} rounds, "
          f"{'cold' if args.cold else 'warm'} page cache, CPU: {cpu_model()}, {os.cpu_count()} cores\n")
    print("| workload | wall s, median (min–max) | ÷ safetensors | ÷ cp | CPU-s (median) | CPU-s/GB | peak anon MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        walls = [r["wall_s"] for r in runs]
        cpu = statistics.median(r.get("cpu_s", float("nan")) for r in runs)
        anon = max(r.get("anon_peak_mib", float("nan")) for r in runs)
        vs_st = f"{med[name] / med['safetensors']:.2f}" if "safetensors" in med else "—"
        vs_cp = f"{med[name] / med['cp']:.2f}" if "cp" in med else "—"
        print(f"| {name} | {med[name]:.2f} ({min(walls):.2f}–{max(walls):.2f}) | {vs_st} | {vs_cp} | {cpu:.1f} | "
              f"{cpu / gb:.2f} | {anon:.0f} |")


if __name__ == "__main__":
    main()
