"""Where the adapter's tensors land, in in-model names, and which modules PEFT itself would have wrapped.

`wanted` lists every in-model name the adapter writes to (for choosing renames); the checks refuse what
PEFT would merge differently from the file: LoRA on nn.MultiheadAttention, and modules the config targets
but the file has no factors for while PEFT's initialisation of them is not a zero delta.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import AdapterError
from ..files import ADAPTER_CONFIG
from ..inputs.adapter import PREFIX, Adapter, TargetMatcher, targeted_parameters
from ..inputs.architectures import is_module_in_memory
from ..inputs.tensorfile import TensorEntry
from .experts import HeldParameters


def wanted(adapter: Adapter) -> dict[str, str]:
    """In-model target name -> the adapter key behind it (for messages). Modules owning targeted
    parameters (or that might) are targets too: the module must exist, whatever it holds."""
    found = {t: PREFIX + e.name[len(PREFIX):] for t, e in adapter.replacements.items()}
    for pair in adapter.pairs:
        found[f"{pair.module}.weight"] = pair.a.name
        if pair.bias is not None:
            found[f"{pair.module}.bias"] = pair.bias.name
    for rows in adapter.tokens:
        found[f"{rows.module}.weight"] = rows.values.name
    for pp in adapter.param_pairs:
        found[pp.module] = pp.a.name
    for module, parts in adapter.undecided.items():
        found[module] = next(iter(parts.values())).name
    return found


def refuse_multihead_attention(adapter: Adapter, entries: dict[str, TensorEntry]) -> None:
    """LoRA on an nn.MultiheadAttention lands on its `in_proj_weight` (and on `out_proj`, which the adapter
    check refuses); a renamed Linear merge of it would be wrong, so no rename may be suggested for it."""
    for pair in adapter.pairs:
        if f"{pair.module}.weight" not in entries and f"{pair.module}.in_proj_weight" in entries:
            raise AdapterError(f"{adapter.file.path}: {pair.a.name!r}: module {pair.module!r} is an "
                               f"nn.MultiheadAttention (the base has {pair.module}.in_proj_weight); LoRA on it is "
                               f"not supported, serve it as an adapter")


def check_untrained_targets(adapter: Adapter, to_disk: Callable[[str], str], to_memory: Callable[[str], str],
                            entries: dict[str, TensorEntry], holds: HeldParameters, base_config: dict | None) -> None:
    """PEFT injects by config: a targeted module without tensors in the file keeps its initialisation,
    which is a non-zero delta with init_lora_weights=false or DoRA. Refuse those.

    Which modules PEFT targets is decided the way PEFT decides it: on the model transformers builds in
    memory, so on-disk names are mapped back to in-model names, and tensors of modules that do not exist
    in memory (the per-expert layers of models whose experts transformers fuses) are not candidates."""
    config = adapter.config
    if config.get("init_lora_weights", True) is not False and not config.get("use_dora"):
        return
    trained = {to_disk(p.module) for p in (*adapter.pairs, *adapter.param_pairs)}
    missing = sorted(_peft_wrapped(config, to_memory, entries, holds, base_config) - trained)
    if missing:
        why = "init_lora_weights=false" if config.get("init_lora_weights", True) is False else "use_dora=true"
        raise AdapterError(f"{adapter.root / ADAPTER_CONFIG}: the config targets {missing[0]!r} "
                           f"({len(missing)} such modules) but the file has no factors for it; with {why} PEFT "
                           f"would add a random or non-zero delta there")


def _peft_wrapped(config: dict, to_memory: Callable[[str], str], entries: dict[str, TensorEntry],
                  holds: HeldParameters, base_config: dict | None) -> set[str]:
    """The on-disk modules PEFT wraps: layers matched by target_modules, and modules owning a parameter
    matched by target_parameters."""
    matcher = TargetMatcher(config)
    wrapped = {name[:-len(".weight")] for name, weight in entries.items()
               if name.endswith(".weight") and matcher(to_memory(name[:-len(".weight")]))
               and _is_layer(weight, config, base_config)}
    for param in {entry.rpartition(".")[2] for entry in config.get("target_parameters") or ()}:
        wrapped |= {m for m in holds.owners(param) if param in targeted_parameters(config, to_memory(m))}
    return wrapped


def _is_layer(weight: TensorEntry, config: dict, base_config: dict | None) -> bool:
    """A weight of a layer PEFT could wrap: at least 2-D (exactly 2-D for a literal "all-linear", which
    means Linear layers only), and of a module that exists in memory."""
    dims = len(weight.shape)
    wanted_dims = dims == 2 if config.get("target_modules") == "all-linear" else dims >= 2
    return wanted_dims and is_module_in_memory(weight.name, base_config)
