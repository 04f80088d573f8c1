"""`qwen-merge demo`: the whole job on a tiny Qwen3-shaped model built locally, then checked.

Builds a 3-shard bf16 checkpoint with Qwen3 tensor names, config and a byte-level tokenizer, and a
PEFT-format LoRA adapter (r=8, alpha=16, all seven projections, non-zero B) — with safetensors and torch
only, no network and no transformers. Merges it with `merge_shards`, then recomputes every merged tensor
directly from the inputs (whole tensor at once, fp32, one rounding) and compares.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CONFIG
from .merge import MergeReport, merge_shards

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 4, 512, 4, 2, 16
PROJECTIONS = {
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER),
}
RANK, ALPHA = 8, 16


def build_base(folder: Path, generator: torch.Generator) -> None:
    """A 3-shard Qwen3-shaped bf16 checkpoint with config.json and generation_config.json."""
    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.05).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "lm_head.weight": rand(VOCAB, HIDDEN),
               "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        tensors.update({p + name + ".weight": rand(*shape) for name, shape in PROJECTIONS.items()})
        for norm, size in (("input_layernorm", HIDDEN), ("post_attention_layernorm", HIDDEN),
                           ("self_attn.q_norm", HEAD_DIM), ("self_attn.k_norm", HEAD_DIM)):
            tensors[p + norm + ".weight"] = torch.ones(size, dtype=torch.bfloat16)
    names = list(tensors)
    groups = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in group}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _json(folder / MODEL_CONFIG, _config())
    _json(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    _write_tokenizer(folder)


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer in Qwen's format (tokenizer.json and tokenizer_config.json): one token per
    byte, no merges, Qwen's three special tokens after them and a ChatML template. Enough to load with
    transformers and to write a GGUF file; the model's other ids up to VOCAB are unused, as in Qwen's."""
    vocab = {char: i for i, char in enumerate(_byte_chars())}
    added = [{"id": len(vocab) + i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, token in enumerate(SPECIAL_TOKENS)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    _json(folder / "tokenizer.json", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []}})
    _json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "model_max_length": 256, "chat_template": CHAT_TEMPLATE})


def _byte_chars() -> list[str]:
    """The printable character byte-level BPE writes for each byte 0..255: the byte itself where it is a
    visible Latin-1 character, else the next unused code point from 256 on."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 256
    for byte in range(256):
        if byte in visible:
            chars[byte] = chr(byte)
        else:
            chars[byte], extra = chr(extra), extra + 1
    return [chars[b] for b in range(256)]


def _config() -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}


def build_adapter(folder: Path, generator: torch.Generator) -> None:
    """A PEFT-format LoRA adapter (fp32 factors, as PEFT saves them) on all seven projections, naming the
    folder `base` beside it as its base model."""
    tensors = {}
    for layer in range(LAYERS):
        for name, (out, inp) in PROJECTIONS.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[key + ".lora_A.weight"] = torch.randn(RANK, inp, generator=generator) * 0.1
            tensors[key + ".lora_B.weight"] = torch.randn(out, RANK, generator=generator) * 0.1
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    _json(folder / ADAPTER_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "use_rslora": False,
        "target_modules": [n.split(".")[-1] for n in PROJECTIONS], "bias": "none", "fan_in_fan_out": False,
        "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "init_lora_weights": False, "base_model_name_or_path": "base"})


def check(base: Path, adapter: Path, out: Path) -> tuple[int, int, int]:
    """Recompute every tensor from the inputs; return (merged equal, copied identical, elements 1 ulp off)."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(adapter / ADAPTER_WEIGHTS, "pt") as f:
        factors = {k: f.get_tensor(k) for k in f.keys()}
    merged = copied = off = 0
    for name, shard in index["weight_map"].items():
        with safe_open(base / shard, "pt") as b, safe_open(out / shard, "pt") as o:
            w, got = b.get_tensor(name), o.get_tensor(name)
        key = "base_model.model." + name.removesuffix(".weight")
        if key + ".lora_A.weight" not in factors:
            if not torch.equal(w.view(torch.int16), got.view(torch.int16)):
                raise AssertionError(f"{name}: untouched tensor changed")
            copied += 1
            continue
        delta = (factors[key + ".lora_B.weight"] @ factors[key + ".lora_A.weight"]) * (ALPHA / RANK)
        want = (w.float() + delta).to(torch.bfloat16)
        ulps = (want.view(torch.int16).int() - got.view(torch.int16).int()).abs()
        if int(ulps.max()) > 1:
            raise AssertionError(f"{name}: merged tensor differs from W + s*B@A by {int(ulps.max())} ulp")
        off += int((ulps == 1).sum())
        merged += 1
    return merged, copied, off


def run_demo(folder: Path, progress: bool = True) -> tuple[MergeReport, tuple[int, int, int]]:
    """Build inputs in `folder`/base and `folder`/adapter, merge to `folder`/merged, and check the result."""
    generator = torch.Generator().manual_seed(0)
    base, adapter, out = folder / "base", folder / "adapter", folder / "merged"
    base.mkdir(parents=True)
    adapter.mkdir()
    build_base(base, generator)
    build_adapter(adapter, generator)
    report = merge_shards(base, adapter, out, progress=progress)
    return report, check(base, adapter, out)


def _json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
