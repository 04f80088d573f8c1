"""Everything the tests and the benchmarks build, read and compare with, in one place.

* Paths and the command line: :func:`run_cli`, :func:`start_cli`, :func:`one_error_line`.
* Safetensors on the byte level (no qwen_merge code): reading headers, tensors and whole checkpoints
  (:func:`read_header`, :func:`checkpoint_entries`, :func:`checkpoint_tensors`, :func:`disk_tensors`,
  :func:`locate`, :func:`check_index`, :func:`tree_hash`), and writing them (:func:`write_safetensors`,
  streamed chunk by chunk if asked, :func:`write_checkpoint`, :func:`write_lora_adapter`) or editing them
  (:func:`edit_json`, :func:`edit_tensors`, :func:`rewrite_checkpoint`, :func:`rewrite_adapter`).
* ulp and rounding helpers: :func:`ulp_distance`, :func:`ulp_count`, :func:`bf16_ulp`,
  :func:`operand_ulps`, :func:`single_rounding`, :func:`double_rounding`.
* Tiny real checkpoints and real PEFT adapters: transformers writes the bases with
  ``save_pretrained(max_shard_size=...)`` and PEFT the adapters with ``get_peft_model(...,
  LoraConfig(init_lora_weights=False))`` + ``save_pretrained`` (:func:`build_tiny_base`,
  :func:`build_peft_adapter`). Three variant tables use them, each with a zoo that builds an entry on first
  use and keeps it for the session:
  - :data:`BASES` / :data:`ADAPTERS` / :class:`Zoo`: Qwen3 and GPT-2 in bf16/fp16/fp32, tied and untied,
    sharded and single-file, rsLoRA, rank/alpha patterns, layers_to_transform, fp16/bf16 adapter files;
  - :data:`ABASES` / :data:`AADAPTERS` / :class:`ArtifactZoo`: every LoRA artifact PEFT writes (embedding
    LoRA, DoRA, modules_to_save, trainable tokens, biases, resized vocabularies, tied embeddings, renames),
    with the trainable weights perturbed as training would (:func:`simulate_training`);
  - Qwen3-MoE: :func:`build_moe_base`, :func:`fuse_checkpoint`, :func:`build_fused_adapter`,
    :func:`write_expert_linear_adapter`, and synthetic Qwen3-30B-A3B-shaped checkpoints at any size
    (:class:`SynthSpec`, :func:`write_synthetic_moe`, used by benchmarks/bench_moe.py too).
  qwen_merge.demo's safetensors-only pair is :func:`demo_pair`.
* Real tokenizers (`tokenizers` BPE saved by transformers) and an adapter that adds tokens as users do:
  :func:`build_tokenizer`, :func:`build_added_tokens_adapter`.
* References from the real libraries (PEFT ``merge_and_unload``, the un-merged ``PeftModel``, logits) and
  expectations read from the adapter file alone (:func:`expected_ops`, :func:`expected_rank_alpha_scale`,
  :func:`fused_reference_deltas`, ...).
* Merging through qwen_merge, once per argument set (:class:`MergeCache`), and the ulp statistics printed
  at the end of the session (:func:`record`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parent.parent
PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
ADAPTER_ST = "adapter_model.safetensors"
ADAPTER_CFG = "adapter_config.json"
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
ST_SIZES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in ST_DTYPES.items()}

# Files that are not weights and that a merge must copy unchanged (the tokenizer ones are written by us).
EXTRA_BASE_FILES = {
    "tokenizer_config.json": '{"model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}\n',
    "special_tokens_map.json": '{"eos_token": "<|endoftext|>"}\n',
}


# --------------------------------------------------------------------------------------------------
# The command line, as a real subprocess


def cli_env() -> dict[str, str]:
    """os.environ with this checkout first on PYTHONPATH (and the hub offline): the environment of every
    Python subprocess the tests start, so that it imports this checkout's qwen_merge whether or not (and
    wherever) the package is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def python_argv(*args: object) -> list[str]:
    """`python <args>` with the interpreter running the tests."""
    return [sys.executable, *map(str, args)]


def cli_argv(*args: object) -> list[str]:
    return python_argv("-m", "qwen_merge", *args)


def run_python(code: str, *args: object, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -c code args...` in a subprocess, in `cli_env()` unless `env` is given (a test of the
    environment itself); keyword arguments go to `subprocess.run`."""
    return subprocess.run(python_argv("-c", code, *args), env=cli_env() if env is None else env, **kwargs)


def run_cli(*args: object, cwd: Path = REPO, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python -m qwen_merge <args>`, text output captured."""
    return subprocess.run(cli_argv(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def start_cli(*args: object, cwd: Path = REPO) -> subprocess.Popen:
    """`python -m qwen_merge <args>` started in the background, stdout and stderr piped (bytes)."""
    return subprocess.Popen(cli_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                            cwd=cwd)


def in_process_cli(capsys, *args: object) -> SimpleNamespace:
    """`qwen-merge <args>` run in this process (`cli.main`): exit status, stdout, stderr."""
    from qwen_merge.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def in_process_error_line(proc: SimpleNamespace) -> str:
    """Exit 1 and exactly one stderr line, `error: ...`, of an `in_process_cli` run. Returns it."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 1, no traceback, exactly one non-empty stderr line and it starts with 'error: '. Returns it."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got: {proc.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def writer_threads() -> list[str]:
    """The names of the shard writer's threads alive in this process: a merge joins them all before it
    returns or raises, so any left behind are stuck."""
    prefixes = ("qwen-merge-assemble", "qwen-merge-disk", "qwen-merge-hash", "qwen-merge-finish")
    return [thread.name for thread in threading.enumerate() if thread.name.startswith(prefixes)]


# --------------------------------------------------------------------------------------------------
# Reading safetensors files and checkpoints (byte level, no qwen_merge code)


def read_header(path: Path) -> tuple[int, dict]:
    """(N, header) from the raw file: 8-byte little-endian length, then N bytes of JSON."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    return n, header


def tensor_entries(path: Path) -> list[tuple[str, dict]]:
    """Tensor entries of one safetensors file, in data-offset order (no __metadata__)."""
    _, header = read_header(path)
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    return sorted(items, key=lambda kv: kv[1]["data_offsets"][0])


def raw_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype string, shape, raw payload bytes), read straight from the file, in offset order."""
    n, _ = read_header(path)
    out = {}
    data = Path(path).read_bytes()
    for name, e in tensor_entries(path):
        b, end = e["data_offsets"]
        out[name] = (e["dtype"], tuple(e["shape"]), data[8 + n + b : 8 + n + end])
    return out


def to_tensor(dtype: str, shape: tuple[int, ...], payload: bytes) -> torch.Tensor:
    t = torch.frombuffer(bytearray(payload), dtype=ST_DTYPES[dtype])
    return t.reshape(shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    return _buffer(t).tobytes()


def _buffer(t: torch.Tensor):
    """The tensor's bytes as a numpy uint8 array (no copy when it is already contiguous on the CPU)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).glob("*.safetensors"))


def checkpoint_entries(folder: Path) -> dict[str, tuple[str, dict]]:
    """name -> (shard file name, header entry) over all shards, in checkpoint order; headers only."""
    out = {}
    for shard in shard_files(folder):
        for name, entry in tensor_entries(Path(folder) / shard):
            assert name not in out, f"{name} stored twice"
            out[name] = (shard, entry)
    return out


def checkpoint_tensors(folder: Path) -> dict[str, tuple[str, str, tuple[int, ...], bytes]]:
    """name -> (shard file name, dtype, shape, bytes) over all shards, in checkpoint order."""
    out = {}
    for shard in shard_files(folder):
        for name, (dtype, shape, payload) in raw_tensors(Path(folder) / shard).items():
            assert name not in out, f"{name} stored twice"
            out[name] = (shard, dtype, shape, payload)
    return out


def disk_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """name -> tensor, read byte for byte from every shard (no qwen_merge, no transformers)."""
    return {n: to_tensor(dt, shape, payload) for n, (_, dt, shape, payload) in checkpoint_tensors(folder).items()}


def header_names(folder: Path) -> list[str]:
    """Tensor names over all shards of a folder, from the headers only."""
    return list(checkpoint_entries(folder))


def locate(folder: Path, name: str) -> tuple[Path, int, dict]:
    """(shard path, absolute offset of the tensor's first byte, header entry), via the index if there is one."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        path = folder / json.loads((folder / INDEX).read_text())["weight_map"][name]
    else:
        path = folder / "model.safetensors"
    n, header = read_header(path)
    return path, 8 + n + header[name]["data_offsets"][0], header[name]


def check_index(folder: Path) -> dict:
    """The index's weight_map names exactly the stored tensors and total_size is their payload; each shard's
    spans tile its data and the file ends with the last one."""
    index = json.loads((folder / INDEX).read_text())
    stored = checkpoint_tensors(folder)
    assert index["weight_map"] == {k: v[0] for k, v in stored.items()}, "index weight_map != shard contents"
    total = sum(len(v[3]) for v in stored.values())
    assert index["metadata"]["total_size"] == total, (index["metadata"]["total_size"], total)
    for shard in shard_files(folder):
        n, header = read_header(folder / shard)
        spans = sorted(tuple(e["data_offsets"]) for k, e in header.items() if k != "__metadata__")
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])), shard
        assert 8 + n + spans[-1][1] == (folder / shard).stat().st_size, f"{shard}: length != header"
    return index


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def tree_hash(folder: Path) -> dict[str, str]:
    """relative path -> content hash of every file under folder; "dir" for each folder (key ending in "/");
    a symlink records its target and, if it resolves to a file, that file's hash (links are not followed
    into folders)."""
    out: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = os.path.relpath(path, folder)
            if path.is_symlink():
                out[rel] = f"link:{os.readlink(path)}:{file_sha256(path) if path.is_file() else '-'}"
            elif path.is_dir():
                out[rel + "/"] = "dir"
            else:
                out[rel] = file_sha256(path)
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


# --------------------------------------------------------------------------------------------------
# Writing and editing safetensors files, checkpoints and adapters


class Streamed(NamedTuple):
    """A tensor written chunk by chunk: `chunks` yields its bytes (bytes-like objects or tensors) in order."""

    dtype: str
    shape: tuple[int, ...]
    chunks: Iterable


def write_safetensors(path: Path, tensors: dict[str, object], metadata: dict | None = None,
                      fsync: bool = False) -> int:
    """A safetensors file holding `tensors` in the given order; each value is a tensor, a
    ``(dtype, shape, bytes)`` tuple or a :class:`Streamed` tensor (never held whole). The header is padded to
    8 bytes. Returns the payload size."""
    items, header, offset = [], {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            dtype, shape, data = TORCH_TO_ST[value.dtype], tuple(value.shape), [_buffer(value)]
        else:
            dtype, shape, data = value
            data = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        size = ST_SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        items.append((name, size, data))
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, size, chunks in items:
            written = 0
            for chunk in chunks:
                chunk = _buffer(chunk) if isinstance(chunk, torch.Tensor) else chunk
                f.write(chunk)
                written += memoryview(chunk).nbytes
            assert written == size, f"{name}: wrote {written} bytes for a {size}-byte tensor"
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return offset


def write_checkpoint(folder: Path, shards: dict[str, dict[str, object]], config: dict | None = None) -> Path:
    """A checkpoint folder: each shard written by :func:`write_safetensors` (format pt), an index unless the
    only file is model.safetensors, and config.json if given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for shard, tensors in shards.items():
        total += write_safetensors(folder / shard, tensors, {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    if list(shards) != ["model.safetensors"]:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


LORA_DEFAULTS = dict(peft_type="LORA", init_lora_weights=True, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                     use_rslora=False, use_dora=False, task_type="CAUSAL_LM", base_model_name_or_path=None)


def write_lora_adapter(folder: Path, factors: dict[str, tuple[object, object]], config: dict) -> Path:
    """An adapter in PEFT's file layout: ``base_model.model.<module>.lora_A/B.weight`` for each module's
    (A, B) (tensors, or anything :func:`write_safetensors` takes) and adapter_config.json = `config`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    write_safetensors(folder / ADAPTER_ST, tensors, {"format": "pt"})
    (folder / ADAPTER_CFG).write_text(json.dumps(config, indent=2))
    return folder


def rolled_normal(shape: tuple[int, int], generator: torch.Generator, std: float = 0.02,
                  chunk_rows: int = 1024) -> Streamed:
    """A bf16 matrix written chunk by chunk, never held whole: one random block of `chunk_rows` rows,
    rolled by a chunk-dependent amount, so rows differ along the tensor."""
    rows, cols = shape
    assert rows % min(rows, chunk_rows) == 0, shape
    step = min(rows, chunk_rows)
    block = (torch.randn(step, cols, generator=generator) * std).to(torch.bfloat16)
    return Streamed("BF16", shape, (torch.roll(block, shifts=37 * i + 1, dims=1) for i in range(rows // step)))


def write_linear_pair(base: Path, adapter: Path, shards: dict[str, list[tuple[str, int, int, bool]]], *,
                      rank: int, alpha: float, seed: int, factor_std: float = 1.0, streamed: bool = False,
                      base_config: dict | None = None, **adapter_config) -> dict[str, torch.Tensor]:
    """A bf16 base of 2-D weights (N(0, 0.02²); :func:`rolled_normal` when `streamed`) laid out as
    ``shards = {file: [(tensor name, rows, cols, merged?)]}``, and a Linear LoRA adapter (fp32 factors,
    N(0, factor_std²)) on the tensors marked merged, with adapter_config.json {peft_type LORA, r, lora_alpha,
    **adapter_config}. Returns the adapter's tensors by file key."""
    g = torch.Generator().manual_seed(seed)
    files, factors = {}, {}
    for shard, specs in shards.items():
        files[shard] = {}
        for name, rows, cols, merged in specs:
            files[shard][name] = rolled_normal((rows, cols), g) if streamed else \
                (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
            if merged:
                factors[name.removesuffix(".weight")] = (torch.randn(rank, cols, generator=g) * factor_std,
                                                         torch.randn(rows, rank, generator=g) * factor_std)
    write_checkpoint(base, files, base_config)
    write_lora_adapter(adapter, factors, {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, **adapter_config})
    return {f"{PREFIX}{m}.lora_{ab}.weight": t for m, pair in factors.items() for ab, t in zip("AB", pair)}


FORMAT_PT = {"format": "pt"}
DROP = object()  # edit_json / rewrite_adapter(config=...): remove this key


def edit_json(path: Path, change: dict | Callable[[dict], object]) -> dict:
    """Rewrite a JSON file: `change` is merged into it (a value of DROP removes the key) or called on it."""
    path = Path(path)
    data = json.loads(path.read_text())
    if callable(change):
        change(data)
    else:
        for key, value in change.items():
            if value is DROP:
                data.pop(key, None)
            else:
                data[key] = value
    path.write_text(json.dumps(data, indent=2))  # NaN is written as NaN, as Python's json does
    return data


def edit_tensors(path: Path, change: Callable[[dict], object], metadata: dict | None = FORMAT_PT) -> None:
    """Load a safetensors file, let `change` edit the name -> tensor dict in place, and save it with
    `metadata` (None: no __metadata__)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def rewrite_checkpoint(src: Path, out: Path, edit: Callable[[str, dict], dict]) -> Path:
    """Copy a sharded checkpoint, passing each shard's tensor dict through edit(shard_name, tensors); the
    index's weight_map and total_size follow."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    weight_map, total = {}, 0
    for shard in shard_files(out):
        tensors = edit(shard, load_file(out / shard))
        save_file(tensors, out / shard, metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = shard
            total += v.numel() * v.element_size()

    def update(index: dict) -> None:
        index["weight_map"] = dict(sorted(weight_map.items()))
        index["metadata"]["total_size"] = total

    edit_json(out / INDEX, update)
    return out


def rewrite_adapter(src: Path, dst: Path | None = None, *, rename: Callable[[str], str] | None = None,
                    transform: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
                    add: dict[str, torch.Tensor] | None = None, config: dict | Callable | None = None) -> Path:
    """Copy an adapter folder to `dst` (or edit it in place): keys renamed (``rename(key)``), tensors changed
    or dropped (``transform(key, tensor)`` returning None drops it), tensors added (file keys, which must
    be new) and adapter_config.json edited (see :func:`edit_json`). The weights file is rewritten only if
    a tensor edit is asked for."""
    dst = Path(src) if dst is None else copy_tree(src, dst)
    if rename or transform or add:
        def change(tensors: dict) -> None:
            edited = {}
            for key, t in tensors.items():
                t = transform(key, t) if transform else t
                if t is not None:
                    edited[rename(key) if rename else key] = t
            for key, t in (add or {}).items():
                assert key not in edited, key
                edited[key] = t
            tensors.clear()
            tensors.update(edited)

        edit_tensors(dst / ADAPTER_ST, change)
    if config:
        edit_json(dst / ADAPTER_CFG, config)
    return dst


def prefix_renamer(old: str, new: str) -> Callable[[str], str]:
    return lambda k: new + k[len(old):] if k.startswith(old) else k


# --------------------------------------------------------------------------------------------------
# ulp and rounding helpers


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-element distance in units in the last place of the stored dtype, via the bit patterns.

    Sign-magnitude patterns are mapped onto a monotonic integer line (so +0 and -0 are both 0 and a
    sign change counts every representable value in between).
    """
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    int_dtype, mask = {
        torch.bfloat16: (torch.int16, 0x7FFF),
        torch.float16: (torch.int16, 0x7FFF),
        torch.float32: (torch.int32, 0x7FFFFFFF),
    }[a.dtype]

    def line(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(int_dtype).to(torch.int64)
        mag = i & mask
        return torch.where(i < 0, -mag, mag)

    return (line(a) - line(b)).abs()


def ulp_count(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[int, int]:
    """(number of elements that differ, largest difference in ulp)."""
    u = ulp_distance(ours.contiguous(), theirs.contiguous())
    return int((u > 0).sum()), int(u.max()) if u.numel() else 0


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 values at |x| (float64): 2^(floor(log2|x|) - 7), and the subnormal step at 0."""
    x = x.double().abs()
    _, exp = torch.frexp(x)  # x = m · 2^exp with m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(x), (exp - 8).to(torch.int32))
    return torch.where(x > 0, ulp, torch.full_like(x, 2.0 ** -133)).clamp_min(2.0 ** -133)


def operand_ulps(ours: torch.Tensor, theirs: torch.Tensor, *operands: torch.Tensor) -> tuple[int, float]:
    """(elements that differ, largest |ours - theirs| in bf16 ulps of the largest of |ours|, |theirs| and the
    operands). Double rounding W + rnd(ΔW) can move a result by one ulp of the larger operand; near a
    cancellation that is many ulps of the (tiny) result, so result ulps are the wrong yardstick."""
    larger = torch.stack([ours.float().abs(), theirs.float().abs(), *(o.float().abs() for o in operands)]).amax(0)
    ratio = (ours.float() - theirs.float()).abs() / bf16_ulp(larger)
    return int((ours != theirs).sum()), float(ratio.max()) if ratio.numel() else 0.0


def fl32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def single_rounding(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """rnd_W(fp32(W) + fl32(ΔW)): PEFT's Linear recipe (one rounding to W's dtype)."""
    return (w.float() + delta.float()).to(w.dtype)


def double_rounding(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """rnd_W(W + rnd_W(ΔW)): PEFT's ParamWrapper / embedding recipe (ΔW cast to W's dtype, then added)."""
    return (w.float() + delta.float().to(w.dtype).float()).to(w.dtype)


# --------------------------------------------------------------------------------------------------
# Tiny transformers checkpoints and real PEFT adapters


def tiny_qwen3_config(*, hidden: int, layers: int, head_dim: int, vocab: int = 256, max_positions: int = 128,
                      tie: bool = False, bias: bool = False):
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, vocab_size=vocab,
                       max_position_embeddings=max_positions, tie_word_embeddings=tie, attention_bias=bias)


def build_tiny_base(config, out: Path, *, seed: int, dtype: torch.dtype = torch.bfloat16,
                    max_shard_size: str | None = "20KB", model_class=None, bias_std: float = 0.0,
                    extra_files: bool = False, min_shards: int = 3) -> Path:
    """A random-initialised model saved with transformers' save_pretrained (in at least `min_shards` shards
    when `max_shard_size` is given, else one model.safetensors without an index). `model_class`: a
    transformers class (default AutoModelForCausalLM). `bias_std`: give the biases (zero after init) random
    values a merge must keep. `extra_files`: also write :data:`EXTRA_BASE_FILES`."""
    import transformers

    torch.manual_seed(seed)
    if model_class is None:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = model_class._from_config(config, dtype=dtype)
    if bias_std:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(bias_std * torch.randn(p.shape, generator=g))
    model.save_pretrained(out, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    if extra_files:
        for name, text in EXTRA_BASE_FILES.items():
            (out / name).write_text(text)
    shards = shard_files(out)
    if max_shard_size is None:
        assert shards == ["model.safetensors"], shards
        assert not (out / INDEX).exists()
    else:
        assert len(shards) >= min_shards, f"wanted >= {min_shards} shards, got {shards}"
        assert (out / INDEX).exists()
    assert (out / "config.json").exists()
    return out


def simulate_training(peft_model, seed: int) -> None:
    """Perturb every trainable parameter as training would, so nothing equals its initial value.

    PEFT initialises DoRA magnitudes to ||W + sBA||, trainable-token rows and modules_to_save copies to
    the base values and saved biases to the base biases; embedding LoRA factors start as randn (huge for
    a 0.02-scale embedding), so they are replaced by smaller random values. Linear lora_A / lora_B keep
    PEFT's (non-zero, init_lora_weights=False) values. ensure_weight_tying's lm_head factors are
    re-derived from the embedding factors afterwards, as the tie requires.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen = set()
        for name, p in peft_model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if "lora_embedding_" in name:
                p.copy_(0.1 * noise)
            elif (".lora_A." in name or ".lora_B." in name) and name.endswith(".weight"):
                continue
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * noise)
            elif name.endswith(".lora_B.default.bias"):
                p.copy_(0.1 * noise)
            else:  # modules_to_save copies, trainable-token rows, bias="all"/"lora_only" biases
                p.add_(0.05 * noise)
        # ensure_weight_tying: lm_head.lora_A = emb_B^T and lora_B = emb_A^T (PEFT creates them as copies)
        base = peft_model.base_model.model
        head = getattr(base, "lm_head", None)
        emb = base.get_input_embeddings()
        cfg = peft_model.peft_config["default"]
        if getattr(cfg, "ensure_weight_tying", False) and hasattr(head, "lora_A") and hasattr(emb, "lora_embedding_A"):
            head.lora_A["default"].weight.copy_(emb.lora_embedding_B["default"].t())
            head.lora_B["default"].weight.copy_(emb.lora_embedding_A["default"].t())


def build_peft_adapter(base_dir: Path, out: Path, lora: dict, *, seed: int, dtype: torch.dtype = torch.bfloat16,
                       resize: int | None = None, trained: bool = False, train_steps: int = 0) -> Path:
    """A real PEFT LoRA adapter saved with PeftModel.save_pretrained: the base loaded with transformers,
    seeded, optionally resized, ``get_peft_model(LoraConfig(init_lora_weights=False, **lora))`` (so A and B
    are random and non-zero), then with `trained` every other trainable weight perturbed
    (:func:`simulate_training`) and `train_steps` real SGD steps on :func:`input_ids`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    torch.manual_seed(seed)
    if resize:
        model.resize_token_embeddings(resize)
    peft_model = get_peft_model(model, LoraConfig(**{"init_lora_weights": False, **copy.deepcopy(lora)}))
    if trained:
        simulate_training(peft_model, seed)
    if train_steps:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        ids = input_ids(resize or VOCAB)
        for _ in range(train_steps):
            opt.zero_grad()
            peft_model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    peft_model.save_pretrained(out)
    assert (out / ADAPTER_ST).exists() and (out / ADAPTER_CFG).exists()
    return out


def demo_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """qwen_merge.demo's tiny 3-shard bf16 Qwen3-shaped base and LoRA adapter (safetensors only), under root."""
    from qwen_merge.demo import build_adapter, build_base

    base, adapter = Path(root) / "base", Path(root) / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    g = torch.Generator().manual_seed(seed)
    build_base(base, g)
    build_adapter(adapter, g)
    return base, adapter


# --------------------------------------------------------------------------------------------------
# Merging through qwen_merge, once per argument set (outputs are read-only)


@dataclass
class Merged:
    out: Path
    report: object
    base: Path
    adapter: Path
    inputs_before: tuple
    inputs_after: tuple
    beside: list  # what else appeared in the destination's (otherwise empty) parent folder


class MergeCache:
    """merge_shards(base, adapter, <fresh folder>/out, progress=False, **kwargs), once per argument set.

    Each merge also checks that neither input changed and that nothing but the destination appeared beside it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._done: dict[tuple, Merged] = {}

    def __call__(self, base: Path, adapter: Path, **kwargs) -> Merged:
        key = (str(base), str(adapter), repr(sorted(kwargs.items())))
        if key not in self._done:
            from qwen_merge import merge_shards

            parent = self.root / f"{len(self._done):03d}"
            parent.mkdir(parents=True)
            before = (tree_hash(base), tree_hash(adapter))
            report = merge_shards(base, adapter, parent / "out", progress=False, **kwargs)
            after = (tree_hash(base), tree_hash(adapter))
            beside = sorted(p.name for p in parent.iterdir() if p.name != "out")
            assert after == before, "an input folder changed"
            assert beside == [], f"leftovers beside the destination: {beside}"
            self._done[key] = Merged(parent / "out", report, Path(base), Path(adapter), before, after, beside)
        return self._done[key]


# --------------------------------------------------------------------------------------------------
# Variant table 1: Qwen3 / GPT-2 bases in three dtypes and plain LoRA adapters (test_against_peft & co)

QWEN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


@dataclass(frozen=True)
class BaseSpec:
    arch: str  # "qwen3" or "gpt2"
    dtype: str  # key of DTYPES
    tie: bool = False
    layers: int = 4
    max_shard_size: str | None = "40KB"  # None: a single model.safetensors without index
    seed: int = 0
    strip_metadata: bool = False  # rewrite the shards without __metadata__ (as some hub files are)


@dataclass(frozen=True)
class AdapterSpec:
    base: str
    lora: dict = field(default_factory=dict)  # LoraConfig keyword arguments
    file_dtype: str | None = None  # rewrite adapter_model.safetensors in this dtype
    seed: int = 1
    # PEFT writes adapter_config.json with sort_keys=True, so rank_pattern/alpha_pattern come back in
    # alphabetical order and "first key wins" then follows that order at load time (not the order used
    # while training). True: rewrite both dicts in the order given here (the order used to create the
    # tensors), so the file order is deliberately non-alphabetical.
    keep_pattern_order: bool = False


BASES: dict[str, BaseSpec] = {
    "qwen_bf16": BaseSpec("qwen3", "bf16"),
    "qwen_bf16_tied": BaseSpec("qwen3", "bf16", tie=True, seed=2),
    "qwen_bf16_single": BaseSpec("qwen3", "bf16", layers=2, max_shard_size=None, seed=3),
    "qwen_bf16_nometa": BaseSpec("qwen3", "bf16", layers=2, strip_metadata=True, seed=8),
    "qwen_fp16": BaseSpec("qwen3", "fp16", seed=4),
    "qwen_fp32": BaseSpec("qwen3", "fp32", layers=3, max_shard_size="80KB", seed=5),
    "qwen12_bf16": BaseSpec("qwen3", "bf16", layers=12, max_shard_size="120KB", seed=6),
    "gpt2_bf16": BaseSpec("gpt2", "bf16", tie=True, layers=2, seed=7),
}

_BASIC = dict(r=8, lora_alpha=16, target_modules=list(QWEN_TARGETS))

# rank_pattern / alpha_pattern exercising peft-semantics.md §2.2 on a 12-layer model. Dict order
# matters (first key wins). Expected values are spelled out in PATTERN_SPOT_CHECKS.
RANK_PATTERN = {
    "1.self_attn.k_proj": 2,  # layer 1 only; "...layers.11.self_attn.k_proj" must NOT match
    "layers.1.*": 4,  # regex pitfall: also matches layers.10.* and layers.11.*
    "^model.layers.2.self_attn.q_proj": 12,  # anchored full name
    "q_proj": 6,  # every other q_proj (shadowed for layer 1 by the key above it)
    "_proj": 16,  # not dot-aligned: matches nothing
    "model.layers.3": 10,  # does not reach the end of any module name: matches nothing
    "mlp\\..*_proj": 5,  # every remaining mlp projection
}
ALPHA_PATTERN = {
    "layers\\.1\\..*": 7,  # layer 1 only (escaped dots: not 10/11)
    "self_attn.q_proj": 20,
    "down_proj": 3,
    "proj": 100,  # not dot-aligned: matches nothing
}
_PATTERNS = dict(_BASIC, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
# (module, expected rank, expected alpha), computed by hand from the spec table.
PATTERN_SPOT_CHECKS = [
    ("model.layers.1.self_attn.k_proj", 2, 7),
    ("model.layers.11.self_attn.k_proj", 4, 16),
    ("model.layers.10.self_attn.v_proj", 4, 16),
    ("model.layers.1.self_attn.q_proj", 4, 7),
    ("model.layers.10.self_attn.q_proj", 4, 20),
    ("model.layers.2.self_attn.q_proj", 12, 20),
    ("model.layers.5.self_attn.q_proj", 6, 20),
    ("model.layers.5.self_attn.k_proj", 8, 16),
    ("model.layers.3.self_attn.o_proj", 8, 16),
    ("model.layers.5.mlp.up_proj", 5, 16),
    ("model.layers.5.mlp.down_proj", 5, 3),
    ("model.layers.1.mlp.down_proj", 4, 7),
    ("model.layers.11.mlp.down_proj", 4, 3),
]

ADAPTERS: dict[str, AdapterSpec] = {
    "basic": AdapterSpec("qwen_bf16", _BASIC),
    "basic_tied": AdapterSpec("qwen_bf16_tied", _BASIC, seed=11),
    "basic_single": AdapterSpec("qwen_bf16_single", _BASIC, seed=12),
    "basic_nometa": AdapterSpec("qwen_bf16_nometa", _BASIC, seed=23),
    "basic_fp16_base": AdapterSpec("qwen_fp16", _BASIC, seed=13),
    "basic_fp32_base": AdapterSpec("qwen_fp32", _BASIC, seed=14),
    "file_bf16": AdapterSpec("qwen_bf16", _BASIC, file_dtype="bf16", seed=15),
    "file_fp16": AdapterSpec("qwen_bf16", _BASIC, file_dtype="fp16", seed=16),
    "rslora": AdapterSpec("qwen_bf16", dict(_BASIC, lora_alpha=13, use_rslora=True), seed=17),
    "patterns": AdapterSpec("qwen12_bf16", _PATTERNS, seed=18, keep_pattern_order=True),
    # the same patterns exactly as PEFT saves them (keys sorted alphabetically)
    "patterns_sorted": AdapterSpec("qwen12_bf16", _PATTERNS, seed=22),
    "layers02": AdapterSpec("qwen_bf16", dict(_BASIC, layers_to_transform=[0, 2]), seed=19),
    "gpt2": AdapterSpec(
        "gpt2_bf16", dict(r=4, lora_alpha=12, target_modules=list(GPT2_TARGETS), fan_in_fan_out=True), seed=20
    ),
    # Only for refusal tests (not a mergeable adapter):
    "dora": AdapterSpec("qwen_bf16", dict(_BASIC, use_dora=True), seed=21),
}

# Variants compared against PEFT in test_against_peft.py.
MERGE_VARIANTS = [name for name in ADAPTERS if name != "dora"]


def _model_config(spec: BaseSpec):
    if spec.arch == "qwen3":
        return tiny_qwen3_config(hidden=64, layers=spec.layers, head_dim=16, tie=spec.tie)
    if spec.arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(n_embd=64, n_layer=spec.layers, n_head=4, vocab_size=256, n_positions=64)
    raise ValueError(spec.arch)


def build_base(spec: BaseSpec, out: Path) -> Path:
    build_tiny_base(_model_config(spec), out, seed=spec.seed, dtype=DTYPES[spec.dtype],
                    max_shard_size=spec.max_shard_size, extra_files=True)
    if spec.strip_metadata:
        for shard in out.glob("*.safetensors"):
            edit_tensors(shard, lambda tensors: None, metadata=None)
            assert "__metadata__" not in read_header(shard)[1]
    assert (out / "generation_config.json").exists()
    return out


def build_adapter(spec: AdapterSpec, base_spec: BaseSpec, base_dir: Path, out: Path) -> Path:
    build_peft_adapter(base_dir, out, spec.lora, seed=spec.seed, dtype=DTYPES[base_spec.dtype])
    if spec.file_dtype is not None:
        rewrite_adapter(out, transform=lambda k, t: t.to(DTYPES[spec.file_dtype]))
    if spec.keep_pattern_order:
        edit_json(out / ADAPTER_CFG, {"rank_pattern": dict(spec.lora.get("rank_pattern", {})),
                                      "alpha_pattern": dict(spec.lora.get("alpha_pattern", {}))})
    return out


class Zoo:
    """Builds the bases / adapters of table 1 on demand, once per session, and merges them once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._bases: dict[str, Path] = {}
        self._adapters: dict[str, Path] = {}
        self.merges = MergeCache(self.root / "merged")

    def base(self, name: str) -> Path:
        if name not in self._bases:
            self._bases[name] = build_base(BASES[name], self.root / "bases" / name)
        return self._bases[name]

    def adapter(self, name: str) -> Path:
        if name not in self._adapters:
            spec = ADAPTERS[name]
            base_dir = self.base(spec.base)
            self._adapters[name] = build_adapter(spec, BASES[spec.base], base_dir, self.root / "adapters" / name)
        return self._adapters[name]

    def pair(self, adapter_name: str) -> tuple[Path, Path]:
        spec = ADAPTERS[adapter_name]
        return self.base(spec.base), self.adapter(adapter_name)

    def merged(self, adapter_name: str, **kwargs) -> Merged:
        return self.merges(*self.pair(adapter_name), **kwargs)


# --------------------------------------------------------------------------------------------------
# Variant table 2: every LoRA artifact PEFT writes (test_artifacts_vs_peft, test_tied, test_renames, refusals)
#
# Bases are random tiny Qwen3 models (hidden 32, 2 layers, vocab 256, bf16, 3 shards): untied and tied, with
# and without attention biases. Derived on the byte level from real ones: ``tied_stored`` (the tied base plus
# an ``lm_head.weight`` copy of the embedding in the last shard, as older / hub checkpoints ship it;
# transformers v5 drops it on save), ``untied_vlm`` (every ``model.*`` key renamed to
# ``model.language_model.*``, a vision-language wrapper's layout) and ``untied_ambiguous``. Adapters are
# "trained" (:func:`simulate_training`) so magnitudes, trainable-token rows, ``modules_to_save`` copies and
# saved biases really differ from their initial values (PEFT initialises them *equal* to the base, which
# would make a merge that ignores them pass). Nothing is hand-assembled except where a table entry says so
# (key renames for the VLM cases).

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEAR = ATTN + MLP
VOCAB = 256
HIDDEN = 32
LAYERS = 2


@dataclass(frozen=True)
class ABase:
    tie: bool = False
    bias: bool = False  # Qwen3Config(attention_bias=...): q/k/v/o biases
    seed: int = 0
    derive: str | None = None  # "lm_head_stored", "vlm_keys" or "ambiguous": byte-level edit of another base
    source: str | None = None  # the base that `derive` starts from


ABASES: dict[str, ABase] = {
    "untied": ABase(seed=41),
    "untied_bias": ABase(bias=True, seed=42),
    "tied": ABase(tie=True, seed=43),
    "tied_bias": ABase(tie=True, bias=True, seed=44),
    "tied_stored": ABase(tie=True, derive="lm_head_stored", source="tied"),
    "untied_vlm": ABase(derive="vlm_keys", source="untied"),
    # the untied base plus a second copy of every model.* tensor under model.language_model.language_model.*:
    # an adapter saying model.language_model.* then lands under both model.language_model. -> model. and
    # model. -> model.language_model. (ambiguous)
    "untied_ambiguous": ABase(derive="ambiguous", source="untied"),
}


@dataclass(frozen=True)
class AAdapter:
    base: str
    lora: dict = field(default_factory=dict)
    seed: int = 1
    resize: int | None = None  # model.resize_token_embeddings(resize) before get_peft_model
    train_steps: int = 0  # real SGD steps (next-token loss on input_ids()) after simulate_training
    # byte-level rewrite of a built adapter: ("rename", source adapter, old key prefix, new key prefix)
    derive: tuple | None = None


def _L(*targets, r=4, alpha=8, **kw) -> dict:
    return dict(r=r, lora_alpha=alpha, target_modules=list(targets), **kw)


AADAPTERS: dict[str, AAdapter] = {
    # plain Linear LoRA (the control for renames and refusals)
    "plain": AAdapter("untied", _L(*LINEAR), seed=101),
    # 1. embedding LoRA (with its saved base_layer copy); rsLoRA makes the scale inexact in binary
    "emb": AAdapter("untied", _L("embed_tokens", "q_proj", "v_proj"), seed=102),
    "emb_rs": AAdapter("untied_bias", _L("embed_tokens", "lm_head", *ATTN, r=3, alpha=13, use_rslora=True),
                       seed=103),
    # 2. DoRA on Linear and Embedding
    "dora": AAdapter("untied", _L(*LINEAR, "embed_tokens", r=4, alpha=8, use_dora=True), seed=104),
    "dora_bias": AAdapter("untied_bias", _L(*ATTN, r=4, alpha=13, use_rslora=True, use_dora=True), seed=105),
    # 3. modules_to_save
    "mts_head": AAdapter("untied", _L("q_proj", modules_to_save=["lm_head"]), seed=106),
    # 4. trainable tokens, list and dict form
    "tt_list": AAdapter("untied", _L("q_proj", trainable_token_indices=[3, 7, 200]), seed=107),
    "tt_dict": AAdapter("untied", _L("q_proj", trainable_token_indices={"embed_tokens": [5, 250]}), seed=108),
    # 5. biases
    "bias_all": AAdapter("untied_bias", _L("q_proj", "v_proj", bias="all"), seed=109),
    "bias_lora_only": AAdapter("untied_bias", _L("q_proj", "v_proj", bias="lora_only"), seed=110),
    "lora_bias": AAdapter("untied_bias", _L(*ATTN, lora_bias=True), seed=111),
    "lora_bias_nobias": AAdapter("untied", _L(*ATTN, lora_bias=True), seed=112),  # refused (E12)
    # 6. resized vocabulary (256 -> 260)
    "rs_q": AAdapter("untied", _L("q_proj", "v_proj"), seed=113, resize=260),
    "rs_mts": AAdapter("untied", _L("q_proj", modules_to_save=["embed_tokens", "lm_head"]), seed=114, resize=260),
    "rs_tt": AAdapter("untied", _L("q_proj", trainable_token_indices=[256, 257, 10]), seed=115, resize=260),
    "rs_emb": AAdapter("untied", _L("embed_tokens", "q_proj"), seed=116, resize=260),  # E3: lm_head not saved
    # 7. tied embeddings (spec §7 table, one adapter per row)
    "t_emb": AAdapter("tied", _L("embed_tokens", "q_proj"), seed=121),
    "t_head": AAdapter("tied", _L("lm_head", "q_proj"), seed=122),
    "t_both": AAdapter("tied", _L("embed_tokens", "lm_head"), seed=123),
    "t_both_ewt": AAdapter("tied", _L("embed_tokens", "lm_head", ensure_weight_tying=True), seed=124),
    # the same, trained for real: PEFT 0.21.2 creates lm_head's factors as *copies* of the embedding's
    # (not shared storage), so the optimizer moves them apart and the file loses the tying signature
    "t_both_ewt_trained": AAdapter("tied", _L("embed_tokens", "lm_head", ensure_weight_tying=True), seed=130,
                                   train_steps=3),
    "t_mts": AAdapter("tied", _L("q_proj", modules_to_save=["lm_head"]), seed=125),
    "t_mts_ewt": AAdapter("tied", _L("q_proj", modules_to_save=["lm_head"], ensure_weight_tying=True), seed=126),
    "t_tt": AAdapter("tied", _L("q_proj", trainable_token_indices=[3, 7, 200]), seed=127),
    "t_q": AAdapter("tied_bias", _L(*ATTN), seed=128),  # control: tied base, no embedding touched
    "t_emb_bias": AAdapter("tied_bias", _L("embed_tokens", *ATTN, bias="all"), seed=129),
    # 8. renames (byte-level rewrites of real adapters)
    "vlm_emb": AAdapter("untied", derive=("rename", "emb", PREFIX + "model.", PREFIX + "model.language_model.")),
    "vlm_mts": AAdapter("untied", derive=("rename", "mts_head", PREFIX + "model.",
                                          PREFIX + "model.language_model.")),
    "custom_emb": AAdapter("untied", derive=("rename", "emb", PREFIX + "model.", PREFIX + "backbone.")),
    # refusal sources
    "dora_plain": AAdapter("untied", _L(*LINEAR, use_dora=True), seed=131),
}


def build_abase(spec: ABase, out: Path, sources: dict[str, Path]) -> Path:
    if spec.derive == "lm_head_stored":
        add_stored_lm_head(sources[spec.source], out)
    elif spec.derive == "vlm_keys":
        rename = prefix_renamer("model.", "model.language_model.")
        rewrite_checkpoint(sources[spec.source], out, lambda shard, t: {rename(k): v for k, v in t.items()})
    elif spec.derive == "ambiguous":
        def add_copies(shard, tensors):
            for k in list(tensors):
                if k.startswith("model."):
                    tensors["model.language_model.language_model." + k[len("model."):]] = tensors[k].clone()
            return tensors

        rewrite_checkpoint(sources[spec.source], out, add_copies)
    else:
        config = tiny_qwen3_config(hidden=HIDDEN, layers=LAYERS, head_dim=8, vocab=VOCAB, max_positions=64,
                                   tie=spec.tie, bias=spec.bias)
        build_tiny_base(config, out, seed=spec.seed, bias_std=0.05 if spec.bias else 0.0)
    assert (out / INDEX).exists()
    return out


def add_stored_lm_head(src: Path, out: Path) -> None:
    embed = disk_tensors(src)[EMBED].clone()
    last = shard_files(src)[-1]

    def edit(shard, tensors):
        assert HEAD not in tensors
        if shard == last:
            tensors[HEAD] = embed.clone()
        return tensors

    rewrite_checkpoint(src, out, edit)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


class ArtifactZoo:
    """Builds the bases / adapters of table 2 on first use, once per session; PEFT references and our
    merges are cached too."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._bases: dict[str, Path] = {}
        self._adapters: dict[str, Path] = {}
        self._refs: dict = {}
        self.merges = MergeCache(self.root / "merged")

    def base(self, name: str) -> Path:
        if name not in self._bases:
            spec = ABASES[name]
            sources = {spec.source: self.base(spec.source)} if spec.source else {}
            self._bases[name] = build_abase(spec, self.root / "bases" / name, sources)
        return self._bases[name]

    def adapter(self, name: str) -> Path:
        if name not in self._adapters:
            spec = AADAPTERS[name]
            out = self.root / "adapters" / name
            if spec.derive:
                kind, source, old, new = spec.derive
                assert kind == "rename"
                rewrite_adapter(self.adapter(source), out, rename=prefix_renamer(old, new))
                assert set(adapter_tensors(out)) != set(adapter_tensors(self.adapter(source)))
                self._adapters[name] = out
            else:
                self._adapters[name] = build_peft_adapter(self.base(spec.base), out, spec.lora, seed=spec.seed,
                                                          resize=spec.resize, trained=True,
                                                          train_steps=spec.train_steps)
        return self._adapters[name]

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.base(AADAPTERS[name].base), self.adapter(name)

    def merged(self, adapter: str, base: str | None = None, **kwargs) -> Merged:
        """Our merge of `adapter` on its base (or on `base`), once per argument set."""
        return self.merges(self.base(base or AADAPTERS[adapter].base), self.adapter(adapter), **kwargs)

    def twin(self, name: str, base_name: str | None = None) -> dict[str, torch.Tensor]:
        """PEFT merge_and_unload() of adapter `name` on an *untied twin* of its tied base."""
        base_name = base_name or AADAPTERS[name].base
        key = ("twin", name, base_name)
        if key not in self._refs:
            self._refs[key] = peft_untied_twin_state_dict(self.base(base_name), self.adapter(name))
        return self._refs[key]

    def reference(self, name: str, base_name: str | None = None) -> dict[str, torch.Tensor]:
        """PEFT merge_and_unload() state dict of adapter `name` on its base (or on `base_name`)."""
        base_name = base_name or AADAPTERS[name].base
        key = (name, base_name)
        if key not in self._refs:
            self._refs[key] = peft_merged_state_dict(self.base(base_name), self.adapter(name),
                                                     resize=AADAPTERS[name].resize)
        return self._refs[key]


# --------------------------------------------------------------------------------------------------
# Qwen3-MoE: tiny transformers checkpoints and adapters (test_moe), synthetic ones at any size (bench_moe)
#
# transformers 5 holds the experts fused in memory but writes one tensor per expert
# (``mlp.experts.<e>.{gate,up,down}_proj.weight``), like the official hub repos. :func:`fuse_checkpoint`
# rewrites such a base with fused 3-D expert tensors on disk, either as transformers holds them
# (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``) or transposed (``(E, H, 2I)`` / ``(E, I, H)``,
# GPT-OSS style). Fused ``target_parameters`` adapters are real PEFT; per-expert Linear LoRA (transformers
# 4.x / unsloth style) is written by hand in PEFT's key format, because transformers 5 no longer has
# per-expert Linear modules to inject into. References are computed from the raw adapter file with
# explicit per-expert loops (no reshapes shared with the library): ``ΔW[e] = s · B_e @ A_e`` with
# ``A_e[k] = lora_A[e·r + k]`` and ``B_e[:, k] = lora_B[:, k·E + e]`` (peft-semantics.md §3.5).

# The tiny model of every MoE test: hidden 32, moe_intermediate 16, 2 layers, 6 experts, vocab 128.
# Note 2·I == H: gate_up_proj (E, 32, 32) is square, so its orientation cannot be read from its shape.
TINY = dict(hidden=32, moe_intermediate=16, layers=2, experts=6, vocab=128, heads=4, kv_heads=2, head_dim=8)
_PER_EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    d = {**TINY, **overrides}
    return Qwen3MoeConfig(
        hidden_size=d["hidden"],
        intermediate_size=2 * d["hidden"],
        moe_intermediate_size=d["moe_intermediate"],
        num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"],
        num_key_value_heads=d["kv_heads"],
        head_dim=d["head_dim"],
        vocab_size=d["vocab"],
        num_experts=d["experts"],
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def build_moe_base(out: Path, *, seed: int = 0, max_shard_size: str = "20KB", **dims) -> Path:
    """Random tiny Qwen3-MoE (bf16) saved by transformers: per-expert tensors, several shards."""
    build_tiny_base(moe_config(**dims), out, seed=seed, max_shard_size=max_shard_size, extra_files=True)
    names = set(checkpoint_entries(out))
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in names, sorted(names)[:20]
    assert not any(n.endswith("gate_up_proj") for n in names), "transformers saved fused experts"
    return out


def fuse_checkpoint(src: Path, dst: Path, *, transposed: bool = False) -> Path:
    """Rewrite a per-expert base with fused 3-D expert tensors on disk.

    ``gate_up_proj[e] = cat([gate_e, up_e])`` (E, 2I, H) and ``down_proj[e] = down_e`` (E, H, I); with
    ``transposed``: (E, H, 2I) and (E, I, H). Each fused tensor goes into the shard that held expert 0's
    first part; other tensors keep their shard; the index is rewritten; the other files are copied."""
    weight_map = {n: s for n, (s, _) in checkpoint_entries(src).items()}
    tensors = disk_tensors(src)
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        m = _PER_EXPERT.match(name)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
    new_map = {n: s for n, s in weight_map.items() if not _PER_EXPERT.match(n)}
    out_tensors = {n: t for n, t in tensors.items() if not _PER_EXPERT.match(n)}
    for module, experts in groups.items():
        order = range(len(experts))
        gate_up = torch.stack([torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in order])
        down = torch.stack([experts[e]["down_proj"] for e in order])
        if transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        out_tensors[f"{module}.gate_up_proj"] = gate_up.contiguous()
        out_tensors[f"{module}.down_proj"] = down.contiguous()
        new_map[f"{module}.gate_up_proj"] = weight_map[f"{module}.0.gate_proj.weight"]
        new_map[f"{module}.down_proj"] = weight_map[f"{module}.0.down_proj.weight"]
    shards = {shard: {n: out_tensors[n] for n in sorted(new_map) if new_map[n] == shard}
              for shard in sorted(set(new_map.values()))}
    write_checkpoint(dst, shards)
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX:
            shutil.copy2(p, dst / p.name)
    return dst


def build_fused_adapter(base: Path, out: Path, *, seed: int, r: int = 4, alpha: float = 8,
                        target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
                        target_modules=("q_proj", "v_proj", "gate")) -> Path:
    """A real PEFT target_parameters adapter on the transformers-5 model (random non-zero A and B).

    PEFT moves the "gate" target (the router, not a Linear in transformers 5) into target_parameters
    as "gate.weight"."""
    return build_peft_adapter(base, out, dict(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                                              target_parameters=list(target_parameters)), seed=seed)


def swap_nesting(key: str) -> str:
    """Swap the inner (``experts.base_layer.lora_*``) and outer (``experts.lora_*``) wrapper keys: the file a
    model class registering ``down_proj`` before ``gate_up_proj`` would have written."""
    if ".experts.base_layer.lora_" in key:
        return key.replace(".experts.base_layer.lora_", ".experts.lora_")
    return key.replace(".experts.lora_", ".experts.base_layer.lora_")


def write_expert_linear_adapter(out: Path, *, layers: int, experts: int, hidden: int, moe_intermediate: int,
                                r: int, alpha: float, seed: int, attention: bool = True, router: bool = True,
                                dtype: torch.dtype = torch.float32) -> Path:
    """Per-expert Linear LoRA as transformers 4.x / unsloth trainings save it (no target_parameters):
    ``mlp.experts.<e>.{gate,up,down}_proj``, plus ``mlp.gate`` (the router, a Linear in 4.x) and
    ``self_attn.{q,o}_proj``."""
    g = torch.Generator().manual_seed(seed)
    h, i = hidden, moe_intermediate
    q = TINY["heads"] * TINY["head_dim"]
    factors = {}

    def pair(module: str, out_f: int, in_f: int) -> None:
        factors[module] = ((torch.randn(r, in_f, generator=g) / math.sqrt(in_f)).to(dtype),
                           (torch.randn(out_f, r, generator=g) * 0.05).to(dtype))

    targets = ["gate_proj", "up_proj", "down_proj"]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for e in range(experts):
            pair(f"{p}mlp.experts.{e}.gate_proj", i, h)
            pair(f"{p}mlp.experts.{e}.up_proj", i, h)
            pair(f"{p}mlp.experts.{e}.down_proj", h, i)
        if router:
            pair(f"{p}mlp.gate", experts, h)
        if attention:
            pair(f"{p}self_attn.q_proj", q, h)
            pair(f"{p}self_attn.o_proj", h, q)
    if router:
        targets.append("gate")
    if attention:
        targets += ["q_proj", "o_proj"]
    return write_lora_adapter(out, factors, dict(LORA_DEFAULTS, r=r, lora_alpha=alpha, target_modules=targets,
                                                 target_parameters=None))


def plain_scale(adapter: Path) -> float:
    """alpha/r of an adapter without rank/alpha patterns or rsLoRA."""
    cfg = json.loads((Path(adapter) / ADAPTER_CFG).read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and not cfg.get("use_rslora")
    return cfg["lora_alpha"] / cfg["r"]


def expert_delta_loop(a: torch.Tensor, b: torch.Tensor, experts: int, rank: int, scale: float
                      ) -> list[torch.Tensor]:
    """[ΔW_e (out, in) in float64] from fused factors, by explicit index arithmetic (spec §3.5)."""
    a64, b64 = a.double(), b.double()
    deltas = []
    for e in range(experts):
        a_e = torch.stack([a64[e * rank + k] for k in range(rank)])  # (r, in): rows expert-major
        b_e = torch.stack([b64[:, k * experts + e] for k in range(rank)], dim=1)  # (out, r): cols rank-major
        deltas.append(scale * (b_e @ a_e))
    return deltas


def fused_reference_deltas(adapter: Path, *, hidden: int, moe_intermediate: int, experts: int, rank: int
                           ) -> dict[str, torch.Tensor]:
    """On-disk per-expert tensor name -> float64 ΔW, for every target_parameters pair of the adapter.

    Pairs are assigned by shape (A width H and B height 2I: gate_up_proj; A width I and B height H:
    down_proj); gate = rows [:I] of gate_up, up = rows [I:]. The router (``mlp.gate``, 2-D) is a plain
    Linear delta. Attention pairs are included as plain Linear deltas too."""
    tensors = adapter_tensors(adapter)
    scale = plain_scale(adapter)
    h, i = hidden, moe_intermediate
    out: dict[str, torch.Tensor] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[:-len(".lora_A.weight")]
        b = tensors[module + ".lora_B.weight"]
        owner = module.replace(".base_layer", "")
        if owner.endswith(".mlp.experts"):
            assert a.shape[0] == experts * rank and b.shape[1] == experts * rank
            deltas = expert_delta_loop(a, b, experts, rank, scale)
            if (a.shape[1], b.shape[0]) == (h, 2 * i):
                for e, d in enumerate(deltas):
                    out[f"{owner}.{e}.gate_proj.weight"] = d[:i]
                    out[f"{owner}.{e}.up_proj.weight"] = d[i:]
            elif (a.shape[1], b.shape[0]) == (i, h):
                for e, d in enumerate(deltas):
                    out[f"{owner}.{e}.down_proj.weight"] = d
            else:
                raise AssertionError(f"fixture: {module} fits neither expert parameter")
        else:
            out[f"{owner}.weight"] = scale * (b.double() @ a.double())
    return out


def linear_reference_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Per-module Linear LoRA: base tensor name -> float64 ΔW = s · B @ A."""
    tensors = adapter_tensors(adapter)
    scale = plain_scale(adapter)
    return {k[:-len(".lora_A.weight")] + ".weight": scale * (tensors[k[:-len("A.weight")] + "B.weight"].double()
                                                              @ a.double())
            for k, a in tensors.items() if k.endswith(".lora_A.weight")}


@dataclass(frozen=True)
class SynthSpec:
    """A Qwen3-MoE-shaped checkpoint written straight to safetensors (no transformers), at any size."""

    layers: int = 48
    experts: int = 128
    hidden: int = 128
    moe_intermediate: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    vocab: int = 4096
    shards: int = 16
    seed: int = 0

    def tensor_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order of the official Qwen3-30B-A3B index (embed, per layer, norm, head)."""
        h, i, d = self.hidden, self.moe_intermediate, self.head_dim
        specs = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            specs.append((p + "input_layernorm.weight", (h,)))
            for e in range(self.experts):
                specs += [(f"{p}mlp.experts.{e}.down_proj.weight", (h, i)),
                          (f"{p}mlp.experts.{e}.gate_proj.weight", (i, h)),
                          (f"{p}mlp.experts.{e}.up_proj.weight", (i, h))]
            specs += [(p + "mlp.gate.weight", (self.experts, h)),
                      (p + "post_attention_layernorm.weight", (h,)),
                      (p + "self_attn.k_norm.weight", (d,)),
                      (p + "self_attn.k_proj.weight", (self.kv_heads * d, h)),
                      (p + "self_attn.o_proj.weight", (h, self.heads * d)),
                      (p + "self_attn.q_norm.weight", (d,)),
                      (p + "self_attn.q_proj.weight", (self.heads * d, h)),
                      (p + "self_attn.v_proj.weight", (self.kv_heads * d, h))]
        specs += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return specs

    def attention_shapes(self) -> dict[str, tuple[int, int]]:
        h, d = self.hidden, self.head_dim
        return {"q_proj": (self.heads * d, h), "k_proj": (self.kv_heads * d, h),
                "v_proj": (self.kv_heads * d, h), "o_proj": (h, self.heads * d)}

    def hf_config(self) -> dict:
        return {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "torch_dtype": "bfloat16",
            "hidden_size": self.hidden, "intermediate_size": 6 * self.hidden,
            "moe_intermediate_size": self.moe_intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab, "num_experts": self.experts, "num_experts_per_tok": 8,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096, "rope_theta": 1000000.0, "tie_word_embeddings": False,
            "hidden_act": "silu", "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
        }


class _Pool:
    """Random values cut from one pre-generated pool (fast for tens of thousands of small tensors)."""

    def __init__(self, seed: int, std: float, dtype: torch.dtype, size: int = 1 << 22) -> None:
        g = torch.Generator().manual_seed(seed)
        self.values = (torch.randn(size, generator=g) * std).to(dtype)
        self.bytes = memoryview(self.values.view(torch.uint8).numpy()).cast("B")
        self.itemsize, self.size, self.g = self.values.element_size(), size, g
        self.dtype = TORCH_TO_ST[dtype]

    def take(self, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], object]:
        """A tensor of `shape` for :func:`write_safetensors`; one larger than the pool repeats it, streamed."""
        n = math.prod(shape)
        if n > self.size:
            whole, rest = divmod(n, self.size)
            chunks = [self.bytes] * whole + [self.bytes[:rest * self.itemsize]]
            return Streamed(self.dtype, shape, chunks)
        start = int(torch.randint(0, self.size - n + 1, (1,), generator=self.g))
        return self.dtype, shape, self.bytes[start * self.itemsize:(start + n) * self.itemsize]


def write_synthetic_moe(out: Path, spec: SynthSpec) -> Path:
    """A bf16 Qwen3-MoE-shaped checkpoint: spec.shards shards of about equal size, index, config."""
    specs = spec.tensor_specs()
    pool = _Pool(spec.seed, 0.02, torch.bfloat16)
    ones = memoryview(torch.ones(1 << 12, dtype=torch.bfloat16).view(torch.uint8).numpy()).cast("B")
    total = sum(2 * math.prod(s) for _, s in specs)
    per_shard = total / spec.shards
    names = [f"model-{k:05d}-of-{spec.shards:05d}.safetensors" for k in range(1, spec.shards + 1)]
    shards: dict[str, dict] = {name: {} for name in names}
    acc, shard_no = 0, 1
    for name, shape in specs:
        n = math.prod(shape)
        shards[names[shard_no - 1]][name] = ("BF16", shape, ones[:2 * n]) if len(shape) == 1 else pool.take(shape)
        acc += 2 * n
        if acc >= per_shard * shard_no and shard_no < spec.shards:
            shard_no += 1
    assert shard_no == spec.shards and all(shards.values()), (shard_no, spec.shards)
    write_checkpoint(out, shards, spec.hf_config())
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))
    return out


def write_synthetic_fused_adapter(out: Path, spec: SynthSpec, *, r: int = 8, alpha: float = 16,
                                  attention=("q_proj", "v_proj"), layers: int | None = None,
                                  seed: int = 1) -> Path:
    """A target_parameters LoRA on every layer's experts in PEFT's key format (fp32):
    ``experts.base_layer.lora_A/B`` = gate_up_proj ((E·r, H), (2I, E·r)) and ``experts.lora_A/B`` =
    down_proj ((E·r, I), (H, E·r)); plus Linear LoRA on the attention projections in ``attention``."""
    e, h, i = spec.experts, spec.hidden, spec.moe_intermediate
    a_pool, b_pool = _Pool(seed, 1 / math.sqrt(h), torch.float32), _Pool(seed + 1, 0.01, torch.float32)
    factors = {}
    for layer in range(spec.layers if layers is None else layers):
        p = f"model.layers.{layer}."
        factors[p + "mlp.experts.base_layer"] = (a_pool.take((e * r, h)), b_pool.take((2 * i, e * r)))
        factors[p + "mlp.experts"] = (a_pool.take((e * r, i)), b_pool.take((h, e * r)))
        for proj in attention:
            o, inp = spec.attention_shapes()[proj]
            factors[p + "self_attn." + proj] = (a_pool.take((r, inp)), b_pool.take((o, r)))
    return write_lora_adapter(out, factors, dict(
        LORA_DEFAULTS, r=r, lora_alpha=alpha, target_modules=list(attention), init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))


def write_synthetic_linear_adapter(out: Path, spec: SynthSpec, *, r: int = 8, alpha: float = 16,
                                   targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed: int = 2) -> Path:
    """A Linear LoRA on the attention projections of every layer, in PEFT's key format (fp32)."""
    a_pool, b_pool = _Pool(seed, 1 / math.sqrt(spec.hidden), torch.float32), _Pool(seed + 1, 0.01, torch.float32)
    factors = {}
    for layer in range(spec.layers):
        for proj in targets:
            o, inp = spec.attention_shapes()[proj]
            factors[f"model.layers.{layer}.self_attn.{proj}"] = (a_pool.take((r, inp)), b_pool.take((o, r)))
    return write_lora_adapter(out, factors, dict(LORA_DEFAULTS, r=r, lora_alpha=alpha, target_modules=list(targets)))


# --------------------------------------------------------------------------------------------------
# References from the real libraries


def load_base_model(base_dir: Path, resize: int | None = None, dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    if resize:
        torch.manual_seed(0)  # the new rows are overwritten by the adapter's full copies
        model.resize_token_embeddings(resize)
    return model


def peft_unmerged(base_dir: Path, adapter_dir: Path, resize: int | None = None, dtype: torch.dtype = torch.bfloat16):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base_model(base_dir, resize, dtype), adapter_dir).eval()


def peft_merged_state_dict(base_dir: Path, adapter_dir: Path, resize: int | None = None,
                           dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The reference: PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict() (defaults)."""
    merged = peft_unmerged(base_dir, adapter_dir, resize, dtype).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def peft_untied_twin_state_dict(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge on the same weights with the tie cut (lm_head an independent copy of the embedding).

    In the un-merged PeftModel of a tied base each side gets only its own delta, so for the adapters
    without ensure_weight_tying / tied trainable tokens this is what a correct merge must contain,
    computed by PEFT itself (the embedding still with PEFT's double rounding)."""
    from peft import PeftModel

    model = load_base_model(base_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def random_ids(vocab: int, seed: int = 1234, shape: tuple[int, int] = (2, 16)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def input_ids(vocab: int = VOCAB) -> torch.Tensor:
    """Token ids for table 2: they include the trainable-token rows (and the new rows of a resized vocabulary)."""
    ids = random_ids(vocab, seed=4321, shape=(2, 24))
    ids[0, :8] = torch.tensor([3, 7, 200, 5, 250, 10, 0, 1]) % vocab  # the trainable-token rows
    if vocab > VOCAB:
        ids[1, :4] = torch.tensor([256, 257, 258, 259])
    return ids


def logits(model, inputs) -> torch.Tensor:
    """fp32 logits of the model in eval mode; `inputs` are token ids or a dict of model inputs."""
    inputs = inputs if isinstance(inputs, dict) else {"input_ids": inputs}
    with torch.no_grad():
        return model.eval()(**inputs).logits.float()


def check_like_unmerged(label: str, ours: torch.Tensor, unmerged: torch.Tensor, base: torch.Tensor, *,
                        min_effect: float, mean_share: float = 0.03, max_share: float = 0.25
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged model computes what the un-merged PeftModel computes, measured against the adapter's own
    effect |unmerged - base|: mean |ours - unmerged| <= mean_share of the mean effect and max <= max_share of
    the max effect (and the effect is real: mean > min_effect). Returns (effect, diff)."""
    effect, diff = (unmerged - base).abs(), (ours - unmerged).abs()
    print(f"\n[{label}] |merged-unmerged| mean {diff.mean():.5f} max {diff.max():.5f} "
          f"({diff.mean() / effect.mean():.4f} / {diff.max() / effect.max():.4f} of the effect); "
          f"effect mean {effect.mean():.4f} max {effect.max():.4f}")
    assert effect.mean() > min_effect, "fixture error: the adapter barely changes the logits"
    assert diff.mean() <= mean_share * effect.mean(), (diff.mean(), effect.mean())
    assert diff.max() <= max_share * effect.max(), (diff.max(), effect.max())
    return effect, diff


# --------------------------------------------------------------------------------------------------
# Expectations derived from the adapter file and its config (independent of qwen_merge)


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed without the base_model.model. prefix."""
    from safetensors.torch import load_file

    raw = load_file(Path(adapter_dir) / ADAPTER_ST)
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}


def adapter_modules(adapter_dir: Path) -> dict[str, int]:
    """module path (without base_model.model.) -> rank, from the lora_A tensors in the file."""
    out = {}
    for name, entry in tensor_entries(Path(adapter_dir) / ADAPTER_ST):
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_A\.weight", name)
        if m:
            out[m.group(1)] = entry["shape"][0]
    return out


def expected_rank_alpha_scale(adapter_dir: Path, module: str) -> tuple[int, float, float]:
    """rank, alpha and scale for a module, with PEFT's own get_pattern_key (peft >= 0.15 rule)."""
    from peft.utils.other import get_pattern_key

    cfg = json.loads((Path(adapter_dir) / ADAPTER_CFG).read_text())
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rp.get(get_pattern_key(rp.keys(), module), cfg["r"])
    alpha = ap.get(get_pattern_key(ap.keys(), module), cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, alpha, scale


def scale_of(adapter_dir: Path, module: str) -> float:
    """alpha/r (or alpha/sqrt(r)) for `module`, with PEFT's own get_pattern_key."""
    return expected_rank_alpha_scale(adapter_dir, module)[2]


def embedding_operands(adapter_dir: Path, module: str = "model.embed_tokens") -> tuple[torch.Tensor, torch.Tensor]:
    """(W, ΔW) of an embedding LoRA from the adapter file alone: W is the saved full base copy (which
    replaces the base first), ΔW = (B @ A)^T * s in fp32."""
    a = adapter_tensors(adapter_dir)
    W = a[module + ".base_layer.weight"]
    A, B = a[module + ".lora_embedding_A"].float(), a[module + ".lora_embedding_B"].float()
    return W, (B @ A).T * fl32(scale_of(adapter_dir, module))


def expected_ops(adapter_dir: Path) -> dict[str, str]:
    """base tensor -> how the adapter changes it: linear, embedding, dora, replace, rows, bias_add.

    Full base copies (`*.base_layer.weight`) only *start* a tensor (its op is its delta's); the
    redundant `original_module` / `modules_to_save` copies are ignored (spec §1.3).
    """
    ops: dict[str, str] = {}
    starts: set[str] = set()  # tensors whose saved full copy replaces the base first
    for key in adapter_tensors(adapter_dir):
        def mod(suffix, key=key):
            return key[: -len(suffix)]

        if key.endswith(".lora_A.weight"):
            name = mod(".lora_A.weight") + ".weight"
            ops[name] = "dora" if ops.get(name) == "dora" else "linear"
        elif key.endswith(".lora_embedding_A"):
            name = mod(".lora_embedding_A") + ".weight"
            ops[name] = "dora" if ops.get(name) == "dora" else "embedding"
        elif key.endswith(".lora_magnitude_vector"):
            ops[mod(".lora_magnitude_vector") + ".weight"] = "dora"
        elif key.endswith(".lora_B.bias"):
            ops[mod(".lora_B.bias") + ".bias"] = "bias_add"
        elif key.endswith(".token_adapter.trainable_tokens_delta"):
            ops[mod(".token_adapter.trainable_tokens_delta") + ".weight"] = "rows"
        elif key.endswith(".token_adapter.base_layer.weight"):
            starts.add(mod(".token_adapter.base_layer.weight") + ".weight")
        elif key.endswith(".base_layer.bias"):
            ops[mod(".base_layer.bias") + ".bias"] = "replace"
        elif key.endswith(".base_layer.weight"):
            starts.add(mod(".base_layer.weight") + ".weight")
        elif key.endswith((".lora_B.weight", ".lora_embedding_B")) or ".original_module." in key \
                or ".modules_to_save." in key:
            continue
        else:  # <N>.weight / <N>.bias: modules_to_save, bias="all", resized vocabulary
            ops[key] = "replace"
    for name in starts:  # the delta (if any) decides the op of a tensor whose base copy was saved
        ops.setdefault(name, "replace")
    return ops


# --------------------------------------------------------------------------------------------------
# Real tokenizers beside bases and adapters (test_tokenizer.py)

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
NEW_TOKENS = ("<tool>", "</tool>", "<think>", "</think>")


def build_tokenizer(folder: Path, *, vocab: int = VOCAB) -> Path:
    """A real byte-level BPE tokenizer of exactly `vocab` tokens (4 special ones first), trained with
    `tokenizers` on seeded pseudo-words, saved into `folder` with transformers' save_pretrained (with
    :data:`CHAT_TEMPLATE`): tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    syllables = [a + b for a in "bdfghjklmnpqrstvz" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    text = [" ".join(rng.choice(words) for _ in range(20)) for _ in range(300)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                      show_progress=False, initial_alphabet=[]))
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(folder)
    return Path(folder)


def build_added_tokens_adapter(base: Path, out: Path, *, seed: int, new_tokens: tuple[str, ...] = NEW_TOKENS
                               ) -> Path:
    """The resized-vocabulary adapter as a user makes it: the base's tokenizer loaded with AutoTokenizer,
    `add_tokens(new_tokens)`, `resize_token_embeddings(len(tokenizer))`, a PEFT LoRA with the embedding
    and lm_head in modules_to_save (trained), and the adapter and the tokenizer saved into `out`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    assert tokenizer.add_tokens(list(new_tokens)) == len(new_tokens)
    build_peft_adapter(base, out, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       modules_to_save=["embed_tokens", "lm_head"]),
                       seed=seed, resize=len(tokenizer), trained=True)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# ulp statistics, printed at the end of the session (conftest.pytest_terminal_summary)

ULP_STATS: dict[str, dict[str, tuple | str]] = {}


def record(section: str, case: str, n_diff: int, n_total: int, worst: float) -> None:
    """Add a comparison to `section`: elements that differ, elements compared, largest difference in ulp."""
    rows = ULP_STATS.setdefault(section, {})
    old = rows.get(case, (0, 0, 0))
    rows[case] = (old[0] + n_diff, old[1] + n_total, max(old[2], worst))


def note(section: str, case: str, text: str) -> None:
    ULP_STATS.setdefault(section, {})[case] = text


def stats_lines(section: str) -> list[str]:
    lines = []
    for case, value in sorted(ULP_STATS.get(section, {}).items()):
        if isinstance(value, str):
            lines.append(f"{case}: {value}")
            continue
        n_diff, n, worst = value
        worst = f"{worst:.2f}" if isinstance(worst, float) else str(worst)
        lines.append(f"{case:>72}: {n_diff:6d} / {n:7d} differ ({n_diff / max(n, 1):7.3%}), max {worst} ulp")
    return lines
