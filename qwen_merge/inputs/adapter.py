"""A PEFT LoRA adapter on disk, headers only: its config, and every tensor sorted into what it does —
LoRA factors (Linear or Embedding, with DoRA magnitude and LoRA bias), full replacement tensors
(modules_to_save, trained biases, saved embedding copies), trainable-token rows, or redundant copies.

Anything this version cannot merge exactly is refused here, naming the key or the config field — an
adapter tensor is never skipped. Scaling follows PEFT: `s = alpha_M / r_M`
(or `/ sqrt(r_M)` with rsLoRA), with per-module `rank_pattern` / `alpha_pattern` resolved by PEFT >= 0.15's
`get_pattern_key`. Names here are in-model names (the prefix `base_model.model.` removed).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..dtypes import MERGEABLE_FLOATS
from ..errors import AdapterError, MismatchError
from ..files import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS, MODEL_CONFIG, read_json
from .checkpoint import HubOrigin, no_such_path
from .tensorfile import TensorEntry, TensorFile, read_header

PREFIX = "base_model.model."
PICKLE_NAMES = (ADAPTER_PICKLE, "adapter_model.pt")
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

# Config fields whose presence changes what a merge must compute; each is refused until supported.
UNSUPPORTED_FIELDS = {
    "layer_replication": "layer_replication is not supported yet: PEFT's own merge adds every replica's delta "
                         "into the one base layer the replicas share, so it is wrong; "
                         "merge into a base whose layers were replicated first",
    "use_qalora": "QALoRA cannot be merged (PEFT refuses it too); merge into the unquantized base instead",
    "alora_invocation_tokens": "aLoRA is applied only after its invocation tokens and cannot be merged; "
                               "serve it as an adapter",
    "arrow_config": "Arrow routes between adapters per token and cannot be merged; serve it as an adapter",
    "use_bdlora": "BD-LoRA block-diagonal factors are not supported yet",
    "kasa_config": "KaSA rewrites the base weights and is not supported",
    "monteclora_config": "MonteCLoRA has its own merge and is not supported",
}


class Kind(str, Enum):
    """The layer a LoRA pair adapts, which decides the shape of its delta."""

    LINEAR = "linear"        # A (r, in), B (out, r): ΔW = s·B@A
    EMBEDDING = "embedding"  # A (r, V), B (d, r): ΔW = s·(B@A)ᵀ
    CONV = "conv"            # A (r, in, *kernel), B (out, r, 1, ...): ΔW of the (out, in·prod(kernel)) view
    EXPERTS = "experts"      # a target_parameters pair (PEFT's ParamWrapper), split per expert


# Key suffixes (after the module path) and what they are. VeLoRA's projection is used by its training
# forward only (PEFT merges a VeLoRA layer as plain LoRA): it is checked and accounted for, not merged.
FACTOR_SUFFIXES = {
    ".lora_A.weight": (Kind.LINEAR, "A"), ".lora_B.weight": (Kind.LINEAR, "B"),
    ".lora_embedding_A": (Kind.EMBEDDING, "A"), ".lora_embedding_B": (Kind.EMBEDDING, "B"),
    ".lora_magnitude_vector": (None, "magnitude"), ".lora_B.bias": (None, "bias"),
    ".lora_velora_embed": (None, "velora"),
}
# PEFT's LoRA for nn.MultiheadAttention wraps `<M>` (in_proj_weight) and puts a second LoRA layer on the
# out_proj inside it, saved as `<M>.base_layer.out_proj.lora_*`.
MHA_OUT_PROJ = ".base_layer.out_proj"
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
# Saved full tensors whose key is not the base tensor's name: suffix -> suffix of the base tensor.
REPLACEMENT_SUFFIXES = {".token_adapter.base_layer.weight": ".weight", ".base_layer.weight": ".weight",
                        ".base_layer.bias": ".bias"}
REDUNDANT_INFIXES = (".original_module.", ".modules_to_save.")


@dataclass(frozen=True, slots=True)
class LoraPair:
    """The factors of one adapted module `module` (an in-model path such as `model.layers.0.mlp.up_proj`).

    `kind` is LINEAR, EMBEDDING or CONV (see `Kind`);
    `magnitude` is DoRA's trained magnitude, `bias` the LoRA bias (`lora_bias=True`)."""

    module: str
    kind: Kind
    a: TensorEntry
    b: TensorEntry
    rank: int
    alpha: float
    scale: float
    magnitude: TensorEntry | None = None
    bias: TensorEntry | None = None


@dataclass(frozen=True, slots=True)
class ParamPair:
    """`target_parameters` LoRA factors on module `module` (e.g. `model.layers.0.mlp.experts`), saved
    `depth` `.base_layer.` levels deep. Which parameter they belong to is decided by shape in the plan:
    PEFT nests one wrapper per targeted parameter in registration order, which the file does not record."""

    module: str
    depth: int
    a: TensorEntry
    b: TensorEntry


@dataclass(frozen=True, slots=True)
class ExpertPair:
    """The part of a fused-expert LoRA that lands on one output tensor (PEFT's ParamWrapper).

    `a` is (E·r, in) with rows expert-major (e·r + k); `b` is (out, E·r) with columns rank-major (k·E + e).
    For one expert's on-disk tensor, `expert` is its index and `rows` the slice of ΔW[e]'s rows it holds
    (gate = [0, I), up = [I, 2I) of gate_up_proj). For a fused 3-D tensor on disk, `expert` is None and
    `transposed` says whether it is stored (E, in, out)."""

    module: str
    param: str
    a: TensorEntry
    b: TensorEntry
    experts: int
    rank: int
    alpha: float
    scale: float
    expert: int | None = None
    rows: tuple[int, int] | None = None
    transposed: bool = False
    kind: Kind = Kind.EXPERTS
    magnitude: None = None
    bias: None = None


@dataclass(frozen=True, slots=True)
class TokenRows:
    """Trainable tokens: rows `indices` of `module`.weight are replaced by the rows of `values`."""

    module: str
    indices: tuple[int, ...]
    values: TensorEntry


@dataclass(frozen=True, slots=True)
class Adapter:
    """A parsed adapter. `replacements` maps in-model tensor names to the adapter tensor that replaces
    them wholesale; `redundant` lists keys that only duplicate a replacement (PEFT saves both)."""

    root: Path
    config: dict
    file: TensorFile
    pairs: tuple[LoraPair, ...]
    replacements: dict[str, TensorEntry]
    tokens: tuple[TokenRows, ...]
    redundant: tuple[str, ...]
    param_pairs: tuple[ParamPair, ...] = ()
    # Factors on a module that a bare target_parameters entry names by suffix: a Linear layer's LoRA or a
    # parameter's, which only the base can tell (`settle_parameters`). Module -> its tensors by role.
    undecided: dict[str, dict[str, TensorEntry]] = dataclasses.field(default_factory=dict)
    hub: HubOrigin | None = None  # set when the adapter comes from the Hub (its files are in the cache)


def open_adapter(adapter: str | os.PathLike, *, weights: str | os.PathLike | None = None) -> Adapter:
    """Read `adapter_config.json` and the header of `adapter_model.safetensors`; no tensor data.

    Args:
        adapter: the adapter folder.
        weights: read tensors from this safetensors file instead (used for a converted pickle).

    Raises:
        AdapterError: unsupported adapter kind, config field or tensor.
        MismatchError: the factors of a module disagree with each other or with the config's rank.
        FormatError: unreadable JSON or safetensors header.
    """
    path = config_path(adapter)
    root = path.parent
    config = read_json(path, ADAPTER_CONFIG)
    _check_config(path, config)
    file = read_header(weights if weights is not None else weights_path(root))
    return _sort_tensors(root, config, file)


def adapter_from_header(root: Path, config: dict, file: TensorFile) -> Adapter:
    """The adapter of folder `root` from its config and weights header already in memory: the checks and
    sorting of `open_adapter`, for a caller that read (or wrote) them itself; nothing is opened.

    Raises:
        AdapterError, MismatchError: as `open_adapter`.
    """
    _check_config(root / ADAPTER_CONFIG, config)
    return _sort_tensors(root, config, file)


def config_path(adapter: str | os.PathLike) -> Path:
    """The adapter_config.json of an adapter folder (or of the folder holding the adapter file given).

    Raises:
        AdapterError: no such folder, or no adapter_config.json in it (with a hint for the usual mix-ups).
    """
    root = Path(adapter)
    if root.is_file() and root.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        root = root.parent
    if not root.exists():
        raise AdapterError(f"{root}: adapter folder not found: {no_such_path(root)}")
    if not root.is_dir():
        raise AdapterError(f"{root}: adapter folder not found (expected a folder with {ADAPTER_CONFIG})")
    if not (root / ADAPTER_CONFIG).is_file():
        raise _missing_config(root)
    return root / ADAPTER_CONFIG


def _missing_config(root: Path) -> AdapterError:
    """The error for a folder without adapter_config.json, with a hint for the two usual mix-ups: a model
    folder given as ADAPTER, and a trainer's output folder whose adapters lie in checkpoint-<step>/."""
    if (root / MODEL_CONFIG).is_file() and _has_model_weights(root):
        return AdapterError(f"{root}: expected a PEFT adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}), found a model "
                            f"folder (config.json and model weights); BASE and ADAPTER look swapped: give the base "
                            f"model first, the adapter second (BASE ADAPTER [OUT])")
    found = sorted((p for p in root.glob("checkpoint-*") if (p / ADAPTER_CONFIG).is_file()), key=_step)
    if found:
        names = [p.name for p in found]
        shown = names if len(names) <= 5 else names[:2] + ["..."] + names[-2:]  # one line, whatever the count
        return AdapterError(f"{root}: {ADAPTER_CONFIG} is missing, but {len(names)} trainer checkpoint folder(s) "
                            f"here hold an adapter ({', '.join(shown)}); pass one of them as ADAPTER, "
                            f"e.g. the last: {found[-1]}")
    return AdapterError(f"{root}: {ADAPTER_CONFIG} is missing; it holds the rank and alpha the merge needs")


def _has_model_weights(root: Path) -> bool:
    """Model weights other than an adapter's own file (adapter_config.json alone may be what is missing)."""
    return any(root.glob("*.safetensors.index.json")) or any(p.name != ADAPTER_WEIGHTS for p in root.glob("*.safetensors"))


def _step(folder: Path) -> tuple[int, int, str]:
    """Sort key of checkpoint-<step>: by the step as a number (500 before 1000); other names after, by name."""
    tail = folder.name[len("checkpoint-"):]
    return (0, int(tail), "") if tail.isdecimal() else (1, 0, tail)


def weights_path(root: Path) -> Path:
    """The adapter's safetensors file; a pickle is named in the error, never opened."""
    path = root / ADAPTER_WEIGHTS
    if path.is_file():
        return path
    pickle = pickle_path(root)
    if pickle is not None:
        raise AdapterError(f"{pickle}: adapter weights are a pickle, which is not loaded unless you allow it "
                           f"(allow_pickle=True / --allow-pickle, read with torch.load(weights_only=True)); "
                           f"or convert them to {ADAPTER_WEIGHTS}")
    raise AdapterError(f"{root}: {ADAPTER_WEIGHTS} is missing")


def pickle_path(root: Path) -> Path | None:
    """The pickled adapter weights, when the folder has them and no safetensors file."""
    if (root / ADAPTER_WEIGHTS).is_file():
        return None
    return next((root / n for n in PICKLE_NAMES if (root / n).is_file()), None)


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
                raise AdapterError(f"{path}: {field} key {key!r} is not a valid regular expression: {e}") from e


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


def _sort_tensors(root: Path, config: dict, file: TensorFile) -> Adapter:
    factors: dict[str, dict[str, TensorEntry]] = {}
    params: dict[tuple[str, int], dict[str, TensorEntry]] = {}
    kinds: dict[str, Kind] = {}
    replacements, tokens, redundant = {}, {}, []
    for entry in file.entries:
        if not entry.name.startswith(PREFIX):
            raise AdapterError(f"{file.path}: tensor {entry.name!r} does not start with {PREFIX!r}; "
                               f"not a PEFT adapter key")
        key = entry.name[len(PREFIX):]
        factor = next(((key[:-len(sfx)], kr) for sfx, kr in FACTOR_SUFFIXES.items() if key.endswith(sfx)), None)
        if factor is not None:
            module, (kind, role) = factor
            module, depth = _unnest(module)
            if _targets_parameter(config, module) and kind == Kind.LINEAR:
                params.setdefault((module, depth), {})[role] = entry
                continue
            _check_lora_key(file.path, entry.name, module, depth)
            factors.setdefault(module, {})[role] = entry
            if kind:
                kinds[module] = kind
        elif key.endswith(TOKENS_SUFFIX):
            tokens[key[:-len(TOKENS_SUFFIX)]] = entry
        elif any(infix in key for infix in REDUNDANT_INFIXES):
            redundant.append(entry.name)
        else:
            _add_replacement(file.path, entry, key, replacements)
    undecided = {m: {**factors.pop(m, {}), **parts} for (m, d), parts in list(params.items()) if d == 0}
    pairs = tuple(_pair(file.path, m, parts, kinds.get(m), config) for m, parts in factors.items())
    token_rows = tuple(_token_rows(file.path, m, e, config) for m, e in tokens.items())
    _check_redundant(file.path, redundant, replacements)
    param_pairs = tuple(_param_pair(file.path, m, d, parts) for (m, d), parts in params.items() if d > 0)
    return Adapter(root, config, file, pairs, replacements, token_rows, tuple(redundant), param_pairs, undecided)


def _add_replacement(path: Path, entry: TensorEntry, key: str, replacements: dict[str, TensorEntry]) -> None:
    """A saved full tensor (modules_to_save, trained bias, embedding copy) that replaces a base tensor."""
    if ".lora_" in key:  # not a whole tensor of the base: a LoRA variant's own factor, unknown here
        raise AdapterError(f"{path}: tensor {entry.name!r} belongs to a LoRA variant this version does not merge "
                           f"(not lora_A/lora_B, lora_embedding_A/B, lora_magnitude_vector or lora_B.bias); "
                           f"a merge without it would be wrong")
    sfx = next((s for s in REPLACEMENT_SUFFIXES if key.endswith(s)), None)
    target = key[:-len(sfx)] + REPLACEMENT_SUFFIXES[sfx] if sfx else key
    if target in replacements:
        raise AdapterError(f"{path}: tensors {replacements[target].name!r} and {entry.name!r} both replace {target!r}")
    replacements[target] = entry


def settle_parameters(adapter: Adapter, holds: Callable[[str], Collection[str]]) -> Adapter:
    """Sort the undecided factors the way PEFT injected them.

    PEFT matches a `target_parameters` entry against `<module>.<parameter>` for the parameters a module
    owns, so a bare entry such as "down_proj" selects `mlp.experts.down_proj` (a fused expert parameter)
    but not the Linear layer `mlp.shared_expert.down_proj`, whose only parameters are weight and bias.
    `holds(module)` names the parameters a module (in-model name) owns, as read from the base.
    """
    pairs, params = list(adapter.pairs), list(adapter.param_pairs)
    path = adapter.file.path
    for module, parts in adapter.undecided.items():
        if set(targeted_parameters(adapter.config, module)) & set(holds(module)):
            params.append(_param_pair(path, module, 0, parts))
        else:
            kind = Kind.LINEAR if "A" in parts else None
            pairs.append(_pair(path, module, parts, kind, adapter.config))
    return dataclasses.replace(adapter, pairs=tuple(pairs), param_pairs=tuple(params), undecided={})


def _unnest(module: str) -> tuple[str, int]:
    """Strip trailing `.base_layer` levels (nested ParamWrappers): (owner module, depth)."""
    depth = 0
    while module.endswith(".base_layer"):
        module, depth = module[:-len(".base_layer")], depth + 1
    return module, depth


def targeted_parameters(config: dict, module: str) -> list[str]:
    """Parameter names that `target_parameters` selects on `module` by name (exact or dot-suffix match of
    `<module>.<parameter>`); whether the module really owns such a parameter only the base can tell."""
    entries = config.get("target_parameters") or []
    found = []
    for entry in entries:
        param = entry.rsplit(".", 1)[-1]
        full = f"{module}.{param}"
        if (full == entry or full.endswith("." + entry)) and param not in found:
            found.append(param)
    return found


def _targets_parameter(config: dict, module: str) -> bool:
    return bool(config.get("target_parameters")) and bool(targeted_parameters(config, module))


def _param_pair(path: Path, module: str, depth: int, parts: dict[str, TensorEntry]) -> ParamPair:
    if set(parts) != {"A", "B"}:
        have = next(iter(parts.values())).name
        raise AdapterError(f"{path}: {have!r} has no lora_A/lora_B partner")
    for e in parts.values():
        if e.dtype not in MERGEABLE_FLOATS or len(e.shape) != 2:
            raise AdapterError(f"{path}: tensor {e.name!r} is {e.dtype} {list(e.shape)}; expected a 2-D float factor")
    return ParamPair(module, depth, parts["A"], parts["B"])


def _check_lora_key(path: Path, key: str, module: str, depth: int) -> None:
    if ".lora_" in module or depth:
        raise AdapterError(f"{path}: tensor {key!r} is a nested LoRA factor, but the config's target_parameters "
                           f"does not name a parameter of {module!r}")


def _check_redundant(path: Path, redundant: list[str], replacements: dict[str, TensorEntry]) -> None:
    """`<N>.original_module.*` / `<N>.modules_to_save.*` are only copies PEFT writes beside `<N>.*`."""
    for key in redundant:
        plain = key[len(PREFIX):]
        for infix in REDUNDANT_INFIXES:
            plain = plain.replace(infix, ".")
        if plain not in replacements and ".original_module." not in key:
            raise AdapterError(f"{path}: tensor {key!r} is a modules_to_save copy without the plain "
                               f"{PREFIX}{plain!r} tensor PEFT saves beside it; cannot tell which to use")


def _pair(path: Path, module: str, parts: dict[str, TensorEntry], kind: Kind | None, config: dict) -> LoraPair:
    _refuse_nested_layer(path, module, next(iter(parts.values())).name)
    if "A" not in parts or "B" not in parts:
        have = next(iter(parts.values())).name
        raise AdapterError(f"{path}: {have!r} has no lora_A/lora_B partner for module {module!r}")
    a, b = parts["A"], parts["B"]
    for e in (a, b, parts.get("magnitude"), parts.get("bias"), parts.get("velora")):
        if e is not None and e.dtype not in MERGEABLE_FLOATS:
            raise AdapterError(f"{path}: tensor {e.name!r} has dtype {e.dtype}; expected F32, BF16 or F16")
    kind = _factor_kind(path, module, a, b, kind)
    if a.shape[0] != b.shape[1]:
        raise MismatchError(f"{path}: module {module!r}: lora_A {list(a.shape)} has rank {a.shape[0]} but "
                            f"lora_B {list(b.shape)} has rank {b.shape[1]}")
    rank, alpha, scale = module_scale(config, module)
    if a.shape[0] != rank:
        raise MismatchError(f"{path}: module {module!r}: tensors have rank {a.shape[0]} but the config says "
                            f"r={rank} (r / rank_pattern); the scale alpha/r would be wrong")
    if "bias" in parts and kind == Kind.EMBEDDING:
        raise AdapterError(f"{path}: {parts['bias'].name!r}: a LoRA bias on an embedding does not exist in PEFT")
    if config.get("use_dora") and "magnitude" not in parts:
        raise AdapterError(f"{path}: use_dora is set but module {module!r} has no lora_magnitude_vector; "
                           f"without it the DoRA merge is undefined")
    if "magnitude" in parts and not config.get("use_dora"):
        raise AdapterError(f"{path}: {parts['magnitude'].name!r} is a DoRA magnitude but the config's use_dora "
                           f"is false; cannot tell which the adapter was trained with")
    if "bias" in parts and "magnitude" in parts:
        raise AdapterError(f"{path}: module {module!r} has both DoRA and a LoRA bias, which PEFT cannot merge")
    if "velora" in parts and not config.get("velora_config"):
        raise AdapterError(f"{path}: {parts['velora'].name!r} is a VeLoRA projection but the config has no "
                           f"velora_config; cannot tell what the adapter was trained with")
    return LoraPair(module, kind, a, b, rank, float(alpha), scale, parts.get("magnitude"), parts.get("bias"))


def _refuse_nested_layer(path: Path, module: str, key: str) -> None:
    """Factors inside another LoRA layer's `base_layer` come from PEFT's nn.MultiheadAttention LoRA, whose
    out_proj delta PEFT applies twice (its forward and its merge agree on W_out + 2·s·B@A), so mapping
    these keys onto plain weights would merge a different model."""
    if ".base_layer." not in module:
        return
    owner = module.split(".base_layer.")[0]
    if module == owner + MHA_OUT_PROJ:
        raise AdapterError(f"{path}: {key!r}: module {owner!r} has nn.MultiheadAttention LoRA (in_proj_weight "
                           f"and out_proj), which is not supported: PEFT adds its out_proj delta twice, which no "
                           f"merge of these keys onto the base weights reproduces; serve it as an adapter")
    raise AdapterError(f"{path}: {key!r} lies inside the LoRA layer of {owner!r} (its base_layer); "
                       f"this nesting is not a LoRA layout this version merges")


def _factor_kind(path: Path, module: str, a: TensorEntry, b: TensorEntry, kind: Kind | None) -> Kind:
    """LINEAR or EMBEDDING for 2-D factors; CONV for a convolution's A (r, in, *kernel) and
    B (out, r, 1, ...). A grouped convolution's B has r / groups columns; PEFT cannot merge it either."""
    if len(a.shape) == 2 and len(b.shape) == 2:
        return kind or Kind.LINEAR
    conv = kind != Kind.EMBEDDING and len(a.shape) == len(b.shape) >= 3 and all(d == 1 for d in b.shape[2:])
    if not conv:
        raise AdapterError(f"{path}: module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are "
                           f"neither 2-D (Linear, Embedding) nor convolution factors (r, in, *kernel) and "
                           f"(out, r, 1, ...)")
    if b.shape[1] < a.shape[0] and b.shape[1] > 0 and a.shape[0] % b.shape[1] == 0:
        raise AdapterError(f"{path}: module {module!r} is a convolution with groups={a.shape[0] // b.shape[1]} "
                           f"(lora_B {list(b.shape)} has r/groups columns for r={a.shape[0]}); PEFT cannot merge "
                           f"LoRA on grouped convolutions either; serve it as an adapter")
    return Kind.CONV


def _token_rows(path: Path, module: str, values: TensorEntry, config: dict) -> TokenRows:
    spec = config.get("trainable_token_indices")
    if isinstance(spec, dict):
        keys = [k for k in spec if module == k or module.endswith("." + k)]
        indices = spec[keys[0]] if len(keys) == 1 else None
    else:
        indices = spec
    where = f"{path.parent / ADAPTER_CONFIG}: trainable_token_indices for {module!r}"
    if not isinstance(indices, list) or not all(type(i) is int for i in indices):
        raise AdapterError(f"{where}: expected a list of token ids, found {indices!r}")
    dup = next((i for i in indices if indices.count(i) > 1), None)
    if dup is not None:
        raise AdapterError(f"{where}: token id {dup} is listed twice; PEFT's row copy would be nondeterministic")
    if len(values.shape) != 2 or values.shape[0] != len(indices):
        raise MismatchError(f"{path}: {values.name!r} has shape {list(values.shape)} but the config lists "
                            f"{len(indices)} token ids")
    return TokenRows(module, tuple(indices), values)


class TargetMatcher:
    """PEFT's test of a module name against target_modules, exclude_modules, modules_to_save and
    layers_to_transform, prepared once for a config so that thousands of names are cheap to test."""

    def __init__(self, config: dict) -> None:
        self.exclude = _Spec(config.get("exclude_modules"))
        self.saved = _Spec(config.get("modules_to_save"))
        target = config.get("target_modules")
        self.all_linear = target == "all-linear"
        self.target = _Spec(None if self.all_linear else target)
        layers = config.get("layers_to_transform")
        self.layers = None if layers is None else set(layers if isinstance(layers, list) else [layers])
        self.layers_pattern = config.get("layers_pattern")

    def __call__(self, module: str) -> bool:
        if self.all_linear:
            hit = not module.endswith(("lm_head", "embed_tokens", "wte", "wpe"))
        else:
            hit = self.target.matches(module)
        if not hit or self.exclude.matches(module) or self.saved.matches(module):
            return False
        if self.layers is not None:
            index = _layer_index(module, self.layers_pattern)
            return index is not None and index in self.layers
        return True


class _Spec:
    """A list of names (a module matches by its whole name or a dot-aligned suffix) or one regex (full
    match), as PEFT reads target_modules and exclude_modules."""

    def __init__(self, spec: object) -> None:
        self.regex = re.compile(spec) if isinstance(spec, str) else None
        self.names = frozenset(spec) if isinstance(spec, list) else frozenset()
        self.last_parts = frozenset(n.rpartition(".")[2] for n in self.names)

    def matches(self, module: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(module) is not None
        if module[module.rfind(".") + 1:] not in self.last_parts:  # no name can end the same way
            return False
        if module in self.names:
            return True
        dot = module.find(".")
        while dot != -1:  # `module.endswith("." + name)` for any name, as a lookup per suffix
            if module[dot + 1:] in self.names:
                return True
            dot = module.find(".", dot + 1)
        return False


def _layer_index(module: str, pattern: object) -> int | None:
    patterns = pattern if isinstance(pattern, list) else [pattern] if pattern else [r"[^.]+"]
    for p in patterns:
        found = re.search(rf"\.{p}\.(\d+)\.", "." + module)
        if found:
            return int(found.group(1))
    return None
