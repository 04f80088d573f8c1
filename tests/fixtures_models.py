"""Tiny real checkpoints and real PEFT adapters for the end-to-end tests, plus byte-level helpers.

Everything here is built with the real libraries: transformers writes the base checkpoints with
``save_pretrained(max_shard_size=...)`` and PEFT writes the adapters with ``save_pretrained`` from
``get_peft_model(..., LoraConfig(init_lora_weights=False))``, so ``lora_B`` is non-zero.

The :class:`Zoo` builds each base and adapter on first use (under a pytest ``tmp_path_factory``
folder) and caches it for the whole session. The tables :data:`BASES` and :data:`ADAPTERS` are the
variant table used by the parametrized tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

QWEN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
PREFIX = "base_model.model."

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}

# Files that are not weights and that a merge must copy unchanged (the tokenizer ones are written by us).
EXTRA_BASE_FILES = {
    "tokenizer_config.json": '{"model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}\n',
    "special_tokens_map.json": '{"eos_token": "<|endoftext|>"}\n',
}


# --------------------------------------------------------------------------------------------------
# Variant tables


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
    "basic": AdapterSpec("qwen_bf16", dict(_BASIC)),
    "basic_tied": AdapterSpec("qwen_bf16_tied", dict(_BASIC), seed=11),
    "basic_single": AdapterSpec("qwen_bf16_single", dict(_BASIC), seed=12),
    "basic_nometa": AdapterSpec("qwen_bf16_nometa", dict(_BASIC), seed=23),
    "basic_fp16_base": AdapterSpec("qwen_fp16", dict(_BASIC), seed=13),
    "basic_fp32_base": AdapterSpec("qwen_fp32", dict(_BASIC), seed=14),
    "file_bf16": AdapterSpec("qwen_bf16", dict(_BASIC), file_dtype="bf16", seed=15),
    "file_fp16": AdapterSpec("qwen_bf16", dict(_BASIC), file_dtype="fp16", seed=16),
    "rslora": AdapterSpec("qwen_bf16", dict(_BASIC, lora_alpha=13, use_rslora=True), seed=17),
    "patterns": AdapterSpec(
        "qwen12_bf16",
        dict(_BASIC, rank_pattern=dict(RANK_PATTERN), alpha_pattern=dict(ALPHA_PATTERN)),
        seed=18,
        keep_pattern_order=True,
    ),
    # the same patterns exactly as PEFT saves them (keys sorted alphabetically)
    "patterns_sorted": AdapterSpec(
        "qwen12_bf16",
        dict(_BASIC, rank_pattern=dict(RANK_PATTERN), alpha_pattern=dict(ALPHA_PATTERN)),
        seed=22,
    ),
    "layers02": AdapterSpec("qwen_bf16", dict(_BASIC, layers_to_transform=[0, 2]), seed=19),
    "gpt2": AdapterSpec(
        "gpt2_bf16", dict(r=4, lora_alpha=12, target_modules=list(GPT2_TARGETS), fan_in_fan_out=True), seed=20
    ),
    # Only for refusal tests (not a mergeable adapter):
    "dora": AdapterSpec("qwen_bf16", dict(_BASIC, use_dora=True), seed=21),
}

# Variants compared against PEFT in test_against_peft.py.
MERGE_VARIANTS = [name for name in ADAPTERS if name != "dora"]


# --------------------------------------------------------------------------------------------------
# Builders


def _model_config(spec: BaseSpec):
    if spec.arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=spec.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=256,
            max_position_embeddings=128,
            tie_word_embeddings=spec.tie,
        )
    if spec.arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(n_embd=64, n_layer=spec.layers, n_head=4, vocab_size=256, n_positions=64)
    raise ValueError(spec.arch)


def build_base(spec: BaseSpec, out: Path) -> Path:
    """Random-initialised tiny model saved with transformers' save_pretrained."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(_model_config(spec), dtype=DTYPES[spec.dtype])
    kwargs = {} if spec.max_shard_size is None else {"max_shard_size": spec.max_shard_size}
    model.save_pretrained(out, **kwargs)
    for name, text in EXTRA_BASE_FILES.items():
        (out / name).write_text(text)
    if spec.strip_metadata:
        from safetensors.torch import load_file, save_file

        for shard in out.glob("*.safetensors"):
            save_file(load_file(shard), shard, metadata=None)
            assert "__metadata__" not in read_header(shard)[1]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    if spec.max_shard_size is None:
        assert shards == ["model.safetensors"], shards
        assert not (out / "model.safetensors.index.json").exists()
    else:
        assert len(shards) >= 3, f"wanted >= 3 shards, got {shards}"
        assert (out / "model.safetensors.index.json").exists()
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    return out


def build_adapter(spec: AdapterSpec, base_spec: BaseSpec, base_dir: Path, out: Path) -> Path:
    """A real PEFT LoRA adapter with random (non-zero) A and B, saved with PeftModel.save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=DTYPES[base_spec.dtype])
    torch.manual_seed(spec.seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **spec.lora))
    peft_model.save_pretrained(out)
    if spec.file_dtype is not None:
        recast_adapter_file(out, DTYPES[spec.file_dtype])
    if spec.keep_pattern_order:
        cfg_path = out / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["rank_pattern"] = dict(spec.lora.get("rank_pattern", {}))
        cfg["alpha_pattern"] = dict(spec.lora.get("alpha_pattern", {}))
        cfg_path.write_text(json.dumps(cfg, indent=2))
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    return out


def recast_adapter_file(adapter_dir: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v.to(dtype).contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


class Zoo:
    """Builds bases/adapters on demand, once per session."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._bases: dict[str, Path] = {}
        self._adapters: dict[str, Path] = {}

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


# --------------------------------------------------------------------------------------------------
# Byte-level helpers (no qwen_merge code involved)


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
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).glob("*.safetensors"))


def checkpoint_tensors(folder: Path) -> dict[str, tuple[str, str, tuple[int, ...], bytes]]:
    """name -> (shard file name, dtype, shape, bytes) over all shards, in checkpoint order."""
    out = {}
    for shard in shard_files(folder):
        for name, (dtype, shape, payload) in raw_tensors(Path(folder) / shard).items():
            assert name not in out, f"{name} stored twice"
            out[name] = (shard, dtype, shape, payload)
    return out


def tree_hash(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and a marker for each directory) under folder."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + "/"] = "dir"
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


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


# --------------------------------------------------------------------------------------------------
# Expectations derived from the adapter file and the config (independent of qwen_merge)


def adapter_modules(adapter_dir: Path) -> dict[str, int]:
    """module path (without base_model.model.) -> rank, from the lora_A tensors in the file."""
    out = {}
    for name, (_, shape, _) in raw_tensors(Path(adapter_dir) / "adapter_model.safetensors").items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_A\.weight", name)
        if m:
            out[m.group(1)] = shape[0]
    return out


def expected_rank_alpha_scale(adapter_dir: Path, module: str) -> tuple[int, float, float]:
    """rank, alpha and scale for a module, with PEFT's own get_pattern_key (peft >= 0.15 rule)."""
    from peft.utils.other import get_pattern_key

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rp.get(get_pattern_key(rp.keys(), module), cfg["r"])
    alpha = ap.get(get_pattern_key(ap.keys(), module), cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, alpha, scale


def peft_merged_state_dict(base_dir: Path, adapter_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Reference: transformers model + PeftModel.from_pretrained + merge_and_unload (defaults)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
