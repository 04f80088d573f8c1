"""A PEFT LoRA adapter on disk: its config and the (A, B) pair of every adapted module, headers only.

Anything in the adapter that this version cannot merge exactly is refused here, naming the key or the
config field — an adapter tensor is never skipped. Scaling follows PEFT (spec peft-semantics.md §2):
`s = alpha_M / r_M` (or `/ sqrt(r_M)` with rsLoRA), with per-module `rank_pattern` / `alpha_pattern`
resolved by PEFT >= 0.15's `get_pattern_key`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import read_json
from .errors import AdapterError, MismatchError
from .tensorfile import FLOAT_DTYPES, TensorEntry, TensorFile, read_header

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt")
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

# Config fields whose presence changes what a merge must compute; each is refused until supported.
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora) is not supported yet",
    "target_parameters": "target_parameters (LoRA on nn.Parameter, e.g. fused MoE experts) is not supported yet",
    "layer_replication": "layer_replication is not supported yet (PEFT's own merge of it is wrong, spec E6)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) are not supported yet",
    "use_qalora": "QALoRA cannot be merged (PEFT refuses it too)",
    "alora_invocation_tokens": "aLoRA is token-selective and cannot be merged",
    "arrow_config": "Arrow routing cannot be merged",
    "use_bdlora": "BD-LoRA block-diagonal factors are not supported yet",
    "kasa_config": "KaSA rewrites the base weights and is not supported",
    "monteclora_config": "MonteCLoRA has its own merge and is not supported",
}

# Adapter key suffixes that are not plain Linear LoRA factors, with the reason each is refused.
UNSUPPORTED_KEYS = (
    (".lora_embedding_A", "embedding LoRA factor (lora_embedding_A/B)"),
    (".lora_embedding_B", "embedding LoRA factor (lora_embedding_A/B)"),
    (".lora_magnitude_vector", "DoRA magnitude vector"),
    (".lora_B.bias", "LoRA bias (lora_bias=True)"),
    (".trainable_tokens_delta", "trainable-tokens delta"),
    (".base_layer.weight", "full copy of a base weight (saved embedding layer)"),
    (".base_layer.bias", "trained bias (bias='all' or 'lora_only')"),
)


@dataclass(frozen=True, slots=True)
class LoraPair:
    """The factors of one adapted module `module` (an in-model path such as `model.layers.0.mlp.up_proj`)."""

    module: str
    a: TensorEntry
    b: TensorEntry
    rank: int
    alpha: float
    scale: float


@dataclass(frozen=True, slots=True)
class Adapter:
    """A parsed adapter: its folder, config, safetensors header and one LoraPair per adapted module."""

    root: Path
    config: dict
    file: TensorFile
    pairs: tuple[LoraPair, ...]


def open_adapter(adapter: str | os.PathLike) -> Adapter:
    """Read `adapter_config.json` and the header of `adapter_model.safetensors`; no tensor data.

    Raises:
        AdapterError: unsupported adapter kind, config field or tensor.
        MismatchError: the factors of a module disagree with each other or with the config's rank.
        FormatError: unreadable JSON or safetensors header.
    """
    root = Path(adapter)
    if root.is_file() and root.name in (CONFIG_NAME, WEIGHTS_NAME):
        root = root.parent
    if not root.is_dir():
        raise AdapterError(f"{root}: adapter folder not found (expected a folder with {CONFIG_NAME})")
    if not (root / CONFIG_NAME).is_file():
        raise AdapterError(f"{root}: {CONFIG_NAME} is missing; it holds the rank and alpha the merge needs")
    config = read_json(root / CONFIG_NAME, CONFIG_NAME)
    _check_config(root / CONFIG_NAME, config)
    file = read_header(_weights_path(root))
    return Adapter(root, config, file, _pairs(file, config))


def _weights_path(root: Path) -> Path:
    path = root / WEIGHTS_NAME
    if path.is_file():
        return path
    pickles = [n for n in PICKLE_NAMES if (root / n).is_file()]
    if pickles:
        raise AdapterError(f"{root / pickles[0]}: adapter weights are a pickle, which is never loaded; convert "
                           f"them to {WEIGHTS_NAME} (PeftModel.from_pretrained(...).save_pretrained(...))")
    raise AdapterError(f"{root}: {WEIGHTS_NAME} is missing")


def _check_config(path: Path, config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; expected 'LORA'")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if type(r) is not int or r <= 0:
        raise AdapterError(f"{path}: 'r' must be a positive integer, found {r!r}")
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: 'lora_alpha' must be a finite number, found {alpha!r}")
    for field, reason in UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise AdapterError(f"{path}: {reason} (field {field!r} = {config[field]!r})")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_MUTATING_INITS):
        raise AdapterError(f"{path}: init_lora_weights={init!r} rewrites the base at load time, so W + s*B@A is "
                           f"wrong; save it with path_initial_model_for_weight_conversion to get a plain LoRA")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{path}: {field!r} must be an object of pattern -> number, found {patterns!r}")
        for key in patterns:
            try:
                re.compile(key)
            except re.error as e:
                raise AdapterError(f"{path}: {field} key {key!r} is not a valid regular expression: {e}") from None


def pattern_key(patterns: dict, name: str) -> str:
    """PEFT >= 0.15 `get_pattern_key`: the first key (in file order) that matches a dot-aligned suffix of `name`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def module_scale(config: dict, module: str) -> tuple[int, float, float]:
    """Return (rank, alpha, scale) for `module` under the config's rank/alpha patterns and rsLoRA flag."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank = rank_pattern.get(pattern_key(rank_pattern, module), config["r"])
    alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, alpha, scale


def _pairs(file: TensorFile, config: dict) -> tuple[LoraPair, ...]:
    factors: dict[str, dict[str, TensorEntry]] = {}
    for entry in file.entries:
        module, which = _classify(file.path, entry.name)
        factors.setdefault(module, {})[which] = entry
    return tuple(_pair(file.path, module, parts, config) for module, parts in factors.items())


def _classify(path: Path, key: str) -> tuple[str, str]:
    """Split `base_model.model.<M>.lora_A.weight` into (M, "A"); refuse every other kind of key."""
    if not key.startswith(PREFIX):
        raise AdapterError(f"{path}: tensor {key!r} does not start with {PREFIX!r}; not a PEFT adapter key")
    for suffix, which in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
        if key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], which
    for suffix, what in UNSUPPORTED_KEYS:
        if key.endswith(suffix) or f"{suffix}." in key:
            raise AdapterError(f"{path}: tensor {key!r} is a {what}, which this version does not merge yet")
    raise AdapterError(f"{path}: tensor {key!r} is a full replacement tensor (modules_to_save, bias='all' or a "
                       f"resized vocabulary), which this version does not merge yet")


def _pair(path: Path, module: str, parts: dict[str, TensorEntry], config: dict) -> LoraPair:
    if set(parts) != {"A", "B"}:
        have, lack = next(iter(parts)), "B" if "A" in parts else "A"
        raise AdapterError(f"{path}: {PREFIX}{module}.lora_{have}.weight has no lora_{lack}.weight partner")
    a, b = parts["A"], parts["B"]
    for e in (a, b):
        if e.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{path}: tensor {e.name!r} has dtype {e.dtype}; expected F32, BF16 or F16")
        if len(e.shape) != 2:
            raise AdapterError(f"{path}: tensor {e.name!r} has shape {list(e.shape)}; only 2-D (Linear) LoRA "
                               f"factors are supported, convolution LoRA is not")
    if a.shape[0] != b.shape[1]:
        raise MismatchError(f"{path}: module {module!r}: lora_A {list(a.shape)} has rank {a.shape[0]} but "
                            f"lora_B {list(b.shape)} has rank {b.shape[1]}")
    rank, alpha, scale = module_scale(config, module)
    if a.shape[0] != rank:
        raise MismatchError(f"{path}: module {module!r}: tensors have rank {a.shape[0]} but the config says "
                            f"r={rank} (r / rank_pattern); the scale alpha/r would be wrong")
    return LoraPair(module, a, b, rank, float(alpha), scale)
