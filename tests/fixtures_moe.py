"""Tiny Qwen3-MoE checkpoints and adapters for test_moe.py, plus references computed without qwen_merge.

Bases are written by transformers 5 (``save_pretrained``), which holds the experts fused in memory but
writes one tensor per expert (``mlp.experts.<e>.{gate,up,down}_proj.weight``), like the official hub
repos. :func:`fuse_checkpoint` rewrites such a base with fused 3-D expert tensors on disk, either as
transformers holds them (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``) or transposed
(``(E, H, 2I)`` / ``(E, I, H)``, GPT-OSS style).

Adapters:
* fused ``target_parameters`` LoRA: real PEFT (``get_peft_model`` + ``save_pretrained``) on the
  transformers-5 model, with attention and router targets in the same adapter;
* per-expert Linear LoRA (transformers 4.x / unsloth style): written by hand in PEFT's key format,
  because transformers 5 no longer has per-expert Linear modules to inject into.

:func:`write_synthetic_moe` writes a Qwen3-MoE-shaped checkpoint straight to safetensors, without
transformers, at any layer/expert count (the many-expert plan test and benchmarks/bench_moe.py use it).

References are computed here from the raw adapter file with explicit per-expert loops (no reshapes
shared with the library): ``ΔW[e] = s · B_e @ A_e`` with ``A_e[k] = lora_A[e·r + k]`` and
``B_e[:, k] = lora_B[:, k·E + e]`` (peft-semantics.md §3.5).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from fixtures_models import EXTRA_BASE_FILES, PREFIX, checkpoint_tensors, read_header, to_tensor

# The tiny model of every MoE test: hidden 32, moe_intermediate 16, 2 layers, 6 experts, vocab 128.
# Note 2·I == H: gate_up_proj (E, 32, 32) is square, so its orientation cannot be read from its shape.
TINY = dict(hidden=32, moe_intermediate=16, layers=2, experts=6, vocab=128, heads=4, kv_heads=2, head_dim=8)
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
ST_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


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


# --------------------------------------------------------------------------------------------------
# Bases


def build_moe_base(out: Path, *, seed: int = 0, max_shard_size: str = "20KB", **dims) -> Path:
    """Random tiny Qwen3-MoE (bf16) saved by transformers: per-expert tensors, several shards."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(**dims), dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    for name, text in EXTRA_BASE_FILES.items():
        (out / name).write_text(text)
    names = set(checkpoint_tensors(out))
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in names, sorted(names)[:20]
    assert not any(n.endswith("gate_up_proj") for n in names), "transformers saved fused experts"
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


def fuse_checkpoint(src: Path, dst: Path, *, transposed: bool = False) -> Path:
    """Rewrite a per-expert base with fused 3-D expert tensors on disk.

    ``gate_up_proj[e] = cat([gate_e, up_e])`` (E, 2I, H) and ``down_proj[e] = down_e`` (E, H, I); with
    ``transposed``: (E, H, 2I) and (E, I, H). Each fused tensor goes into the shard that held expert 0's
    first part; other tensors keep their shard; the index is rewritten."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(src / shard))
    pattern = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        m = pattern.match(name)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
    new_map = {n: s for n, s in weight_map.items() if not pattern.match(n)}
    out_tensors = {n: t for n, t in tensors.items() if not pattern.match(n)}
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
    total = 0
    for shard in sorted(set(new_map.values())):
        part = {n: out_tensors[n] for n, s in new_map.items() if s == shard}
        save_file(part, dst / shard, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            shutil.copy2(p, dst / p.name)
    return dst


# --------------------------------------------------------------------------------------------------
# Adapters


def build_fused_adapter(base: Path, out: Path, *, seed: int, r: int = 4, alpha: float = 8,
                        target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
                        target_modules=("q_proj", "v_proj", "gate")) -> Path:
    """A real PEFT target_parameters adapter on the transformers-5 model (random non-zero A and B).

    PEFT moves the "gate" target (the router, not a Linear in transformers 5) into target_parameters
    as "gate.weight"."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                        target_parameters=list(target_parameters), init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def rewrite_adapter(src: Path, dst: Path, *, rename=None, transform=None, config=None) -> Path:
    """Copy an adapter, renaming keys (``rename(key) -> key``), changing tensors
    (``transform(key, tensor) -> tensor or None to drop``) and updating adapter_config.json fields."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    tensors = {}
    for key, t in load_file(src / "adapter_model.safetensors").items():
        if transform is not None:
            t = transform(key, t)
            if t is None:
                continue
        tensors[rename(key) if rename else key] = t.contiguous()
    save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


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
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    h, i = hidden, moe_intermediate
    q = TINY["heads"] * TINY["head_dim"]
    tensors = {}

    def pair(module: str, out_f: int, in_f: int) -> None:
        tensors[f"{PREFIX}{module}.lora_A.weight"] = (torch.randn(r, in_f, generator=g) / math.sqrt(in_f)).to(dtype)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = (torch.randn(out_f, r, generator=g) * 0.05).to(dtype)

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
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = dict(peft_type="LORA", r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=True,
                  lora_dropout=0.0, bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False,
                  task_type="CAUSAL_LM", base_model_name_or_path=None, target_parameters=None)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


# --------------------------------------------------------------------------------------------------
# References (no qwen_merge code)


def load_adapter_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k[len(PREFIX):]: v for k, v in load_file(Path(adapter) / "adapter_model.safetensors").items()}


def adapter_scale(adapter: Path) -> float:
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
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
    tensors = load_adapter_tensors(adapter)
    scale = adapter_scale(adapter)
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
    tensors = load_adapter_tensors(adapter)
    scale = adapter_scale(adapter)
    return {k[:-len(".lora_A.weight")] + ".weight": scale * (tensors[k[:-len("A.weight")] + "B.weight"].double()
                                                              @ a.double())
            for k, a in tensors.items() if k.endswith(".lora_A.weight")}


def single_rounding(w: torch.Tensor, delta64: torch.Tensor) -> torch.Tensor:
    """rnd_W(fp32(W) + fl32(ΔW)): PEFT's Linear recipe (one rounding to W's dtype), from a float64 ΔW."""
    return (w.float() + delta64.float()).to(w.dtype)


def double_rounding(w: torch.Tensor, delta64: torch.Tensor) -> torch.Tensor:
    """rnd_W(W + rnd_W(ΔW)): PEFT's ParamWrapper recipe (ΔW cast to W's dtype, then added)."""
    return (w.float() + delta64.float().to(w.dtype).float()).to(w.dtype)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 values at |x| (float64): 2^(floor(log2|x|) - 7), and the subnormal step at 0."""
    x = x.double().abs()
    _, exp = torch.frexp(x)  # x = m · 2^exp with m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(x), (exp - 8).to(torch.int32))
    return torch.where(x > 0, ulp, torch.full_like(x, 2.0 ** -133)).clamp_min(2.0 ** -133)


def disk_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """name -> tensor, read byte for byte from every shard (no qwen_merge, no transformers)."""
    return {n: to_tensor(dt, shape, payload) for n, (_, dt, shape, payload) in checkpoint_tensors(folder).items()}


# --------------------------------------------------------------------------------------------------
# Synthetic Qwen3-MoE-shaped checkpoints at any size (no transformers), and adapters for them


@dataclass(frozen=True)
class SynthSpec:
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


def _write_safetensors(path: Path, items: list[tuple[str, str, tuple[int, ...], bytes | memoryview]],
                       metadata: dict | None = None) -> int:
    """A safetensors file with the tensors in the given order (header padded to 8 bytes)."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, data in items:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for *_, data in items:
            f.write(data)
    return offset


class _Pool:
    """Random values cut from one pre-generated pool (fast for tens of thousands of small tensors)."""

    def __init__(self, seed: int, std: float, dtype: torch.dtype, size: int = 1 << 22) -> None:
        g = torch.Generator().manual_seed(seed)
        self.values = (torch.randn(size, generator=g) * std).to(dtype)
        self.bytes = memoryview(self.values.view(torch.uint8).numpy()).cast("B")
        self.itemsize, self.size, self.g = self.values.element_size(), size, g

    def take(self, n: int) -> memoryview:
        assert n <= self.size
        start = int(torch.randint(0, self.size - n + 1, (1,), generator=self.g))
        return self.bytes[start * self.itemsize:(start + n) * self.itemsize]


def write_synthetic_moe(out: Path, spec: SynthSpec) -> Path:
    """A bf16 Qwen3-MoE-shaped checkpoint: spec.shards shards of about equal size, index, config."""
    out.mkdir(parents=True)
    specs = spec.tensor_specs()
    pool = _Pool(spec.seed, 0.02, torch.bfloat16)
    one = torch.ones(1 << 12, dtype=torch.bfloat16)
    ones = memoryview(one.view(torch.uint8).numpy()).cast("B")
    total = sum(2 * math.prod(s) for _, s in specs)
    per_shard = total / spec.shards
    weight_map, acc, shard_items, shard_no = {}, 0, [], 1
    names = [f"model-{k:05d}-of-{spec.shards:05d}.safetensors" for k in range(1, spec.shards + 1)]

    def flush():
        nonlocal shard_items, shard_no
        _write_safetensors(out / names[shard_no - 1], shard_items, {"format": "pt"})
        for n, *_ in shard_items:
            weight_map[n] = names[shard_no - 1]
        shard_items, shard_no = [], shard_no + 1

    for name, shape in specs:
        n = math.prod(shape)
        data = ones[:2 * n] if len(shape) == 1 else pool.take(n)
        shard_items.append((name, "BF16", shape, data))
        acc += 2 * n
        if acc >= per_shard * shard_no and shard_no < spec.shards:
            flush()
    flush()
    assert shard_no - 1 == spec.shards, (shard_no, spec.shards)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(spec.hf_config(), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))
    return out


def write_synthetic_fused_adapter(out: Path, spec: SynthSpec, *, r: int = 8, alpha: float = 16,
                                  attention=("q_proj", "v_proj"), layers: int | None = None,
                                  seed: int = 1) -> Path:
    """A target_parameters LoRA on every layer's experts in PEFT's key format (fp32):
    ``experts.base_layer.lora_A/B`` = gate_up_proj ((E·r, H), (2I, E·r)) and ``experts.lora_A/B`` =
    down_proj ((E·r, I), (H, E·r)); plus Linear LoRA on the attention projections in ``attention``."""
    out.mkdir(parents=True)
    e, h, i, d = spec.experts, spec.hidden, spec.moe_intermediate, spec.head_dim
    a_pool, b_pool = _Pool(seed, 1 / math.sqrt(h), torch.float32), _Pool(seed + 1, 0.01, torch.float32)
    attn_shapes = {"q_proj": (spec.heads * d, h), "k_proj": (spec.kv_heads * d, h),
                   "v_proj": (spec.kv_heads * d, h), "o_proj": (h, spec.heads * d)}
    items = []

    def pair(key: str, a_shape, b_shape) -> None:
        items.append((f"{PREFIX}{key}.lora_A.weight", "F32", a_shape, a_pool.take(math.prod(a_shape))))
        items.append((f"{PREFIX}{key}.lora_B.weight", "F32", b_shape, b_pool.take(math.prod(b_shape))))

    for layer in range(spec.layers if layers is None else layers):
        p = f"model.layers.{layer}."
        pair(p + "mlp.experts.base_layer", (e * r, h), (2 * i, e * r))
        pair(p + "mlp.experts", (e * r, i), (h, e * r))
        for proj in attention:
            o, inp = attn_shapes[proj]
            pair(p + "self_attn." + proj, (r, inp), (o, r))
    _write_safetensors(out / "adapter_model.safetensors", items, {"format": "pt"})
    config = dict(peft_type="LORA", r=r, lora_alpha=alpha, target_modules=list(attention),
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                  init_lora_weights=False, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                  use_rslora=False, use_dora=False, task_type="CAUSAL_LM", base_model_name_or_path=None)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def write_synthetic_linear_adapter(out: Path, spec: SynthSpec, *, r: int = 8, alpha: float = 16,
                                   targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed: int = 2) -> Path:
    """A Linear LoRA on the attention projections of every layer, in PEFT's key format (fp32)."""
    out.mkdir(parents=True)
    h, d = spec.hidden, spec.head_dim
    shapes = {"q_proj": (spec.heads * d, h), "k_proj": (spec.kv_heads * d, h),
              "v_proj": (spec.kv_heads * d, h), "o_proj": (h, spec.heads * d)}
    a_pool, b_pool = _Pool(seed, 1 / math.sqrt(h), torch.float32), _Pool(seed + 1, 0.01, torch.float32)
    items = []
    for layer in range(spec.layers):
        for proj in targets:
            o, inp = shapes[proj]
            key = f"{PREFIX}model.layers.{layer}.self_attn.{proj}"
            items.append((key + ".lora_A.weight", "F32", (r, inp), a_pool.take(r * inp)))
            items.append((key + ".lora_B.weight", "F32", (o, r), b_pool.take(o * r)))
    _write_safetensors(out / "adapter_model.safetensors", items, {"format": "pt"})
    config = dict(peft_type="LORA", r=r, lora_alpha=alpha, target_modules=list(targets),
                  init_lora_weights=True, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                  use_rslora=False, use_dora=False, task_type="CAUSAL_LM", base_model_name_or_path=None)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def header_names(folder: Path) -> list[str]:
    """Tensor names over all shards of a folder, from the headers only."""
    names = []
    for shard in sorted(Path(folder).glob("*.safetensors")):
        names += [k for k in read_header(shard)[1] if k != "__metadata__"]
    return names
