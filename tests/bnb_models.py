"""bitsandbytes 4-bit (QLoRA) bases for the tests, made the way users get them: a tiny random Qwen3 or
Qwen3-MoE model saved with transformers, loaded back with `BitsAndBytesConfig(load_in_4bit=True, ...)` on
the CPU (bitsandbytes quantizes it) and saved again with `save_pretrained`. Their references come from
bitsandbytes itself: each weight dequantized with `bitsandbytes.functional.dequantize_4bit` from the
saved tensors (`QuantState.from_dict`), into a plain model of the compute dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from builders import build_peft_adapter, build_tiny_base, shard_files
from safetensors import safe_open

STATE_MARK = ".quant_state.bitsandbytes__"


@dataclass(frozen=True)
class Bnb4Spec:
    """One 4-bit base: its architecture, and the BitsAndBytesConfig it was quantized with."""

    name: str
    quant_type: str = "nf4"
    double: bool = True
    compute: torch.dtype = torch.bfloat16
    storage: torch.dtype = torch.uint8
    skip: tuple[str, ...] | None = None  # llm_int8_skip_modules (None: transformers' default, lm_head)
    moe: bool = False
    max_shard_size: str | None = "40KB"
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    lora: dict = field(default_factory=lambda: {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})


SPECS = {
    # NF4, double quantization, bf16 compute, uint8 storage, several shards
    "nf4_double": Bnb4Spec("nf4_double", lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj",
                                                                                          "down_proj"]}),
    # FP4 without double quantization, fp16 compute, codes stored as bf16, v_proj left unquantized
    "fp4_bf16_storage": Bnb4Spec("fp4_bf16_storage", "fp4", False, torch.float16, torch.bfloat16,
                                 ("lm_head", "v_proj"), max_shard_size=None,
                                 lora={"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj",
                                                                                   "down_proj"]}),
    # Qwen3-MoE: attention quantized, the experts and the router left as they are by transformers
    "moe_nf4": Bnb4Spec("moe_nf4", "nf4", False, torch.bfloat16, moe=True,
                        lora={"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "o_proj"]}),
}
# One layer whose MLP weights are 16M values each (64 MiB in fp32), for the memory test.
LARGE = Bnb4Spec("large", max_shard_size=None, hidden=1024, intermediate=16384, layers=1,
                 lora={"r": 16, "lora_alpha": 32, "target_modules": ["up_proj", "down_proj"]})


def model_config(spec: Bnb4Spec):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=320, hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)
    if spec.moe:
        return Qwen3MoeConfig(intermediate_size=spec.intermediate, moe_intermediate_size=64, num_experts=4,
                              num_experts_per_tok=2, **common)
    return Qwen3Config(intermediate_size=spec.intermediate, **common)


def build_bnb4_base(spec: Bnb4Spec, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(the 4-bit checkpoint, the bf16 model it was quantized from), both saved by transformers."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    plain = build_tiny_base(model_config(spec), root / f"{spec.name}-plain", seed=seed, max_shard_size=None)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                               bnb_4bit_use_double_quant=spec.double, bnb_4bit_compute_dtype=spec.compute,
                               bnb_4bit_quant_storage=spec.storage,
                               **({} if spec.skip is None else {"llm_int8_skip_modules": list(spec.skip)}))
    model = AutoModelForCausalLM.from_pretrained(plain, quantization_config=quant, device_map="cpu")
    out = root / spec.name
    model.save_pretrained(out, **({} if spec.max_shard_size is None else {"max_shard_size": spec.max_shard_size}))
    if spec.max_shard_size is not None:
        assert len(shard_files(out)) >= 2, shard_files(out)
    return out, plain


def build_adapter(spec: Bnb4Spec, plain: Path, out: Path, seed: int = 1) -> Path:
    """A PEFT LoRA adapter with random non-zero factors (as trained) for the model's modules."""
    return build_peft_adapter(plain, out, spec.lora, seed=seed)


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, as stored."""
    tensors = {}
    for shard in shard_files(folder):
        with safe_open(folder / shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def quantized_weights(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.partition(STATE_MARK)[0] for k in tensors if STATE_MARK in k)


def bnb_dequantized(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """weight name -> bitsandbytes' `dequantize_4bit` of it in `dtype`, from the stored tensors."""
    import bitsandbytes.functional as F

    out = {}
    for weight in quantized_weights(tensors):
        companions = {k[len(weight) + 1:]: v for k, v in tensors.items() if k.startswith(weight + ".")}
        state = F.QuantState.from_dict(companions, device=torch.device("cpu"))
        state.dtype = dtype
        out[weight] = F.dequantize_4bit(tensors[weight].view(torch.uint8), state)
    return out


def plain_state(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The 4-bit checkpoint as a plain state dict: quantized weights dequantized by bitsandbytes in `dtype`,
    the companion tensors left out, every other tensor as stored."""
    tensors = stored_tensors(folder)
    weights = bnb_dequantized(tensors, dtype)
    companions = {k for w in weights for k in tensors if k.startswith(w + ".")}
    return {k: weights.get(k, v) for k, v in tensors.items() if k not in companions}


def write_dequantized(folder: Path, out: Path, dtype: torch.dtype) -> Path:
    """`plain_state` saved as a plain checkpoint (config.json without quantization_config)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in plain_state(folder, dtype).items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return out


def dequantized_model_factory(plain: Path, dtype: torch.dtype):
    """A function building the model of the plain checkpoint `plain` (`write_dequantized`) in `dtype`."""
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(plain, dtype=dtype)
