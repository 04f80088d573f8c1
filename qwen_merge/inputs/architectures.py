"""What the merge must know about an architecture that neither the adapter nor the shard headers say.

Adapters name tensors as the model holds them in memory; checkpoints name them as transformers writes
them to disk. For most models the two are the same. Where they differ, transformers 5 converts on load
and reverts on save with its per-model "checkpoint conversion mapping"; the tables below are the renames
and fusions that mapping performs for each Qwen model type of transformers 5.24 (the test suite checks
them against transformers itself: tests/test_architectures.py).

Renames are (in-memory prefix, on-disk prefix) pairs. A model type may have several sets, one per way of
loading it: a vision-language checkpoint read by its ConditionalGeneration class keeps its own layout,
read by `AutoModelForCausalLM` (text-only fine-tuning) it is `model.*` in memory and
`model.language_model.*` on disk.
"""

from __future__ import annotations

import re

RenameSet = tuple[tuple[str, str], ...]

# Qwen2-VL and Qwen2.5-VL checkpoints on the Hub: the language model at the top level, the vision tower
# beside it. transformers 5 nests both under `model.` in memory.
_VL_LEGACY: RenameSet = (("model.language_model.", "model."), ("model.visual.", "visual."))
# Omni thinkers (Qwen2.5-Omni, Qwen3-Omni-MoE) add an audio tower beside the vision tower.
_THINKER: RenameSet = _VL_LEGACY + (("model.audio_tower.", "audio_tower."),)
# Qwen2-Audio keeps the language model (with its head) under `language_model.` on disk.
_AUDIO: RenameSet = (("lm_head.", "language_model.lm_head."), ("model.language_model.", "language_model.model."),
                     ("model.audio_tower.", "audio_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."))
# A text-only model class (`*ForCausalLM`) loaded from a vision-language checkpoint.
_TEXT_IN_VL: RenameSet = (("model.", "model.language_model."),)

RENAME_SETS: dict[str, tuple[RenameSet, ...]] = {
    "qwen2_vl": (_VL_LEGACY,),
    "qwen2_5_vl": (_VL_LEGACY,),
    "qwen2_audio": (_AUDIO,),
    "qwen2_5_omni_thinker": (_THINKER,),
    "qwen3_omni_moe_thinker": (_THINKER,),
    "qwen3_5": (_TEXT_IN_VL,),
    "qwen3_5_moe": (_TEXT_IN_VL,),
    "qwen4_exp": (_TEXT_IN_VL,),
}

# Model types whose per-expert tensors on disk (`mlp.experts.<e>.{gate,up,down}_proj.weight`) are fused
# parameters in memory (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`): there is no per-expert
# module PEFT could wrap. transformers 5 fuses every model of the Qwen2-MoE and Mixtral families.
FUSED_EXPERT_MODEL_TYPES = frozenset({
    "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_vl_moe",
    "qwen3_vl_moe_text", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text", "qwen4_exp",
    "qwen4_exp_text", "mixtral", "minimax", "deepseek_v2", "deepseek_v3", "glm4_moe", "olmoe", "dots1",
    "ernie4_5_moe", "hunyuan_v1_moe", "flex_olmo",
})
PER_EXPERT_TENSOR = re.compile(r".+\.experts\.\d+\.[^.]+\.weight$")


def model_types(config: dict | None) -> tuple[str, ...]:
    """The model type of a config.json and of its nested text config, outermost first."""
    config = config or {}
    found = [config.get("model_type")]
    for key in ("text_config", "thinker_config"):
        if isinstance(config.get(key), dict):
            found.append(config[key].get("model_type"))
    return tuple(t for t in found if isinstance(t, str))


def rename_sets(config: dict | None) -> tuple[RenameSet, ...]:
    """The rename sets the base's architecture is known to need, most specific first."""
    return tuple(s for t in model_types(config) for s in RENAME_SETS.get(t, ()))


def all_rename_sets() -> tuple[RenameSet, ...]:
    """Every known set, for checkpoints whose config does not say which architecture they are."""
    unique: dict[RenameSet, None] = {}
    for sets in RENAME_SETS.values():
        unique.update(dict.fromkeys(sets))
    return tuple(unique)


def fuses_experts(config: dict | None) -> bool:
    """Whether transformers holds this model's experts as fused parameters rather than per-expert modules."""
    return any(t in FUSED_EXPERT_MODEL_TYPES for t in model_types(config))


def is_module_in_memory(tensor: str, config: dict | None) -> bool:
    """False for on-disk tensors of modules that do not exist in the model transformers builds (the
    per-expert Linear layers of fused-expert models), so PEFT cannot have targeted them."""
    return not (PER_EXPERT_TENSOR.match(tensor) and fuses_experts(config))
