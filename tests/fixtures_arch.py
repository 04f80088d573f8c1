"""A tiny random model of every Qwen model type in transformers 5.24, and the adapters users make for it.

Each base has every layer type its architecture has (linear-attention and full-attention layers, routed
and shared experts, vision and audio towers, Qwen4-Exp's per-layer embeddings and token indexer) and is
written by transformers' own ``save_pretrained`` in several shards, so the on-disk names and layouts are
the real ones (e.g. ``visual.*`` and ``model.layers.*`` for Qwen2-VL, per-expert tensors for Qwen3-MoE,
transposed fused experts for Qwen3-VL-MoE).

Adapters are made by real PEFT (``get_peft_model`` + ``save_pretrained``), the way users make them:
``target_modules="all-linear"`` with ``init_lora_weights=False``; ``all-linear`` with the default init
and a seeded non-zero ``lora_B``; a language-model-only regex; for MoE types ``target_parameters`` on the
experts; and for the vision-language types that ``AutoModelForCausalLM`` can load, adapters trained on
that text-only class. The PEFT reference for each is computed in the same step: logits of the unmerged
``PeftModel``, then ``merge_and_unload()``, its logits and its ``save_pretrained`` checkpoint, and the
same merge done in fp32 and rounded to bf16 once (PEFT's own arithmetic where it rounds twice).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from builders import MergeCache, build_tiny_base, logits

H, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 32, 4, 2, 8, 64, 256, 3
IMAGE, VIDEO, VISION_START, VISION_END, AUDIO, AUDIO_START, AUDIO_END = 250, 251, 252, 253, 254, 248, 249
PATCH, TEMPORAL_PATCH, MERGE = 4, 2, 2
IMAGE_GRID = (1, 4, 4)  # (t, h, w) in patches: 16 patches, merged 2x2 into 4 image tokens
SHARD_SIZE = "20KB"

_MOE = dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
_LINEAR_ATTENTION = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                         linear_num_key_heads=2, linear_num_value_heads=4,
                         layer_types=["linear_attention", "full_attention", "linear_attention"])
_MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2]}
_VISION_TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
                      vision_end_token_id=VISION_END)
_AUDIO_ENCODER = dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                      max_source_positions=64)


def _text(**overrides) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, **overrides)


def _vision(**overrides) -> dict:  # Qwen2.5-VL, Qwen3-VL and later vision towers
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE,
                temporal_patch_size=TEMPORAL_PATCH, out_hidden_size=H, **overrides)


def _qwen3_vision(**overrides) -> dict:
    return _vision(num_position_embeddings=64, **overrides)


def _thinker_audio(**overrides) -> dict:
    return dict(_AUDIO_ENCODER, n_window=8, output_dim=H, **overrides)


@dataclass(frozen=True)
class Arch:
    """One model type: how to configure it, which class loads it, and what it has."""

    model_type: str
    model_class: str
    config: dict
    config_class: str | None = None  # "module:Class" of a sub-config when the model is one part (omni thinkers)
    vision: bool = False
    moe: bool = False
    causal_lm: bool = False  # AutoModelForCausalLM can load the checkpoint (text-only fine-tuning)

    def make_config(self):
        import importlib

        from transformers import CONFIG_MAPPING

        if self.config_class:
            module, _, name = self.config_class.partition(":")
            cls = getattr(importlib.import_module(module), name)
        else:
            cls = CONFIG_MAPPING[self.model_type]
        return cls(**copy.deepcopy(self.config))


ARCHS: dict[str, Arch] = {a.model_type: a for a in [
    Arch("qwen2", "Qwen2ForCausalLM", _text()),
    Arch("qwen2_moe", "Qwen2MoeForCausalLM", _text(**_MOE, shared_expert_intermediate_size=32), moe=True),
    Arch("qwen2_vl", "Qwen2VLForConditionalGeneration", dict(
        text_config=_text(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=H, mlp_ratio=2, num_heads=4, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH), **_VISION_TOKENS),
        vision=True),
    Arch("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", dict(
        text_config=_text(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=_vision(window_size=16, fullatt_block_indexes=[1]), **_VISION_TOKENS), vision=True),
    Arch("qwen2_audio", "Qwen2AudioForConditionalGeneration", dict(
        text_config=dict(_text(), model_type="qwen2"),
        audio_config=dict(_AUDIO_ENCODER, model_type="qwen2_audio_encoder"),
        audio_token_index=AUDIO)),
    Arch("qwen2_5_omni", "Qwen2_5OmniThinkerForConditionalGeneration", dict(
        text_config=dict(_text(rope_scaling=_MROPE), model_type="qwen2_5_omni_text"),
        vision_config=_vision(window_size=16, fullatt_block_indexes=[1]), audio_config=_thinker_audio(),
        audio_token_index=AUDIO, image_token_index=IMAGE, video_token_index=VIDEO, audio_start_token_id=AUDIO_START,
        audio_end_token_id=AUDIO_END, user_token_id=3), vision=True,
        config_class="transformers.models.qwen2_5_omni.configuration_qwen2_5_omni:Qwen2_5OmniThinkerConfig"),
    Arch("qwen3", "Qwen3ForCausalLM", _text()),
    Arch("qwen3_moe", "Qwen3MoeForCausalLM", _text(**_MOE), moe=True),
    Arch("qwen3_next", "Qwen3NextForCausalLM", _text(**_MOE, shared_expert_intermediate_size=32, **_LINEAR_ATTENTION),
         moe=True),
    Arch("qwen3_vl", "Qwen3VLForConditionalGeneration", dict(
        text_config=_text(rope_scaling=_MROPE), vision_config=_qwen3_vision(deepstack_visual_indexes=[0, 1]),
        **_VISION_TOKENS), vision=True),
    Arch("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", dict(
        text_config=_text(**{k: v for k, v in _MOE.items() if k != "num_experts"}, num_local_experts=4,
                          rope_scaling=_MROPE),
        vision_config=_qwen3_vision(deepstack_visual_indexes=[0, 1]), **_VISION_TOKENS), vision=True, moe=True),
    Arch("qwen3_5", "Qwen3_5ForConditionalGeneration", dict(
        text_config=_text(**_LINEAR_ATTENTION), vision_config=_qwen3_vision(), **_VISION_TOKENS),
        vision=True, causal_lm=True),
    Arch("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", dict(
        text_config=_text(**_MOE, shared_expert_intermediate_size=32, **_LINEAR_ATTENTION),
        vision_config=_qwen3_vision(), **_VISION_TOKENS), vision=True, moe=True, causal_lm=True),
    Arch("qwen3_asr", "Qwen3ASRForConditionalGeneration", dict(
        text_config=dict(_text(), model_type="qwen3"),
        audio_config=dict(_AUDIO_ENCODER, model_type="qwen3_asr_encoder", n_window=8, output_dim=H,
                          downsample_hidden_size=16, n_window_infer=32, max_position_embeddings=13),
        audio_token_id=AUDIO, timestamp_token_id=247, pad_token_id=0, eos_token_id=2, tie_word_embeddings=False)),
    Arch("qwen3_omni_moe", "Qwen3OmniMoeThinkerForConditionalGeneration", dict(
        text_config=dict(_text(**_MOE, rope_scaling=_MROPE), model_type="qwen3_omni_moe_text"),
        vision_config=_qwen3_vision(deepstack_visual_indexes=[0, 1]),
        audio_config=_thinker_audio(downsample_hidden_size=16, n_window_infer=32, conv_chunksize=50),
        audio_token_id=AUDIO, image_token_id=IMAGE, video_token_id=VIDEO, audio_start_token_id=AUDIO_START,
        user_token_id=3), vision=True, moe=True,
        config_class="transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe:Qwen3OmniMoeThinkerConfig"),
    Arch("qwen4_exp", "Qwen4ExpForConditionalGeneration", dict(
        text_config=_text(**_MOE, shared_expert_intermediate_size=32, **_LINEAR_ATTENTION, hc_lowrank=8,
                          ple_layer_ids=[1], ple_embed_dim=32, heads_per_ngram=8, ngram_vocab_size_base=1000,
                          make_ngram_vocab_size_divisible_by=8, split_ngram_parts=4, indexer_n_heads=2,
                          indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=4),
        vision_config=_qwen3_vision(), **_VISION_TOKENS), vision=True, moe=True, causal_lm=True),
]}

EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LM_REGEX = r"model\.(language_model\.)?layers\.\d+\.(self_attn|mlp)\.(q_proj|v_proj|up_proj)"


@dataclass(frozen=True)
class AdapterKind:
    """A LoraConfig the way users write it; `seed_b`: default init, then a seeded non-zero lora_B;
    `causal_lm`: trained on the AutoModelForCausalLM view of a vision-language checkpoint."""

    name: str
    lora: dict
    seed_b: bool = False
    causal_lm: bool = False


def adapter_kinds(arch: Arch) -> list[AdapterKind]:
    kinds = [AdapterKind("all_linear_false", dict(target_modules="all-linear", init_lora_weights=False)),
             AdapterKind("all_linear_seeded_b", dict(target_modules="all-linear"), seed_b=True),
             AdapterKind("lm_regex", dict(target_modules=LM_REGEX, init_lora_weights=False))]
    if arch.moe:
        kinds.append(AdapterKind("experts", dict(target_modules=[], target_parameters=EXPERT_PARAMETERS,
                                                 init_lora_weights=False)))
    if arch.causal_lm:
        kinds.append(AdapterKind("causal_lm_all_linear", dict(target_modules="all-linear", init_lora_weights=False),
                                 causal_lm=True))
        if arch.moe:
            kinds.append(AdapterKind("causal_lm_experts", dict(target_modules=[], target_parameters=EXPERT_PARAMETERS,
                                                               init_lora_weights=False), causal_lm=True))
    return kinds


@dataclass
class Case:
    """A base and one adapter, with PEFT's reference: `error` is PEFT's own error when it cannot build it."""

    arch: Arch
    kind: AdapterKind
    base: Path
    adapter: Path | None = None
    peft_merged: Path | None = None  # merge_and_unload() of the bf16 model, as users run it
    peft_once: Path | None = None  # the same merge in fp32, rounded to bf16 once
    logits_unmerged: torch.Tensor | None = None
    logits_peft: torch.Tensor | None = None
    error: str | None = None
    inputs: dict = field(default_factory=dict)


def model_class(arch: Arch, causal_lm: bool):
    import transformers

    return transformers.AutoModelForCausalLM if causal_lm else getattr(transformers, arch.model_class)


def build_base(arch: Arch, folder: Path, seed: int = 0) -> Path:
    import transformers

    return build_tiny_base(arch.make_config(), folder, seed=seed, max_shard_size=SHARD_SIZE,
                           model_class=getattr(transformers, arch.model_class))


def load(arch: Arch, folder: Path, causal_lm: bool = False):
    model, info = model_class(arch, causal_lm).from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    return model.eval(), info


def model_inputs(arch: Arch, causal_lm: bool) -> dict:
    """Token ids (and an image for vision-language types), fixed by a seed."""
    g = torch.Generator().manual_seed(123)
    text = torch.randint(4, 240, (1, 12), generator=g)
    if not arch.vision or causal_lm:
        return {"input_ids": text}
    t, h, w = IMAGE_GRID
    tokens = t * h * w // (MERGE * MERGE)
    ids = torch.cat([torch.tensor([[VISION_START] + [IMAGE] * tokens + [VISION_END]]), text], dim=1)
    pixels = torch.randn(t * h * w, 3 * TEMPORAL_PATCH * PATCH * PATCH, generator=g)
    return {"input_ids": ids, "pixel_values": pixels.to(torch.bfloat16), "image_grid_thw": torch.tensor([IMAGE_GRID]),
            "mm_token_type_ids": (ids == IMAGE).int()}  # 1 marks image tokens, as the processors return it


def make_case(arch: Arch, kind: AdapterKind, base: Path, base_model, folder: Path) -> Case:
    """Make the adapter with PEFT, and PEFT's reference merge; PEFT's own failure is recorded, not raised."""
    from peft import LoraConfig, get_peft_model

    case = Case(arch, kind, base, inputs=model_inputs(arch, kind.causal_lm))
    torch.manual_seed(1)
    try:
        peft_model = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=4, lora_alpha=8, **kind.lora))
    except Exception as e:  # noqa: BLE001 - PEFT's refusal is the result being recorded
        case.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]} ... {str(e).splitlines()[-1][-200:]}"
        return case
    if kind.seed_b:
        g = torch.Generator().manual_seed(2)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)
    case.adapter = folder / "adapter"
    peft_model.save_pretrained(case.adapter)
    peft_model.eval()
    case.logits_unmerged = logits(peft_model, case.inputs)
    # PEFT's arithmetic with one rounding: merge in fp32 (bf16 weights are exact there), then round once.
    once = copy.deepcopy(peft_model).float().merge_and_unload().to(torch.bfloat16)
    case.peft_once = folder / "peft_merged_once"
    once.save_pretrained(case.peft_once, max_shard_size=SHARD_SIZE)
    merged = peft_model.merge_and_unload()
    case.logits_peft = logits(merged, case.inputs)
    case.peft_merged = folder / "peft_merged"
    merged.save_pretrained(case.peft_merged, max_shard_size=SHARD_SIZE)
    return case


class ArchZoo:
    """Bases and cases built on first use and kept for the session (read-only for tests)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._bases: dict[str, Path] = {}
        self._models: dict[tuple[str, bool], object] = {}
        self._cases: dict[tuple[str, str], Case] = {}
        self.merges = MergeCache(root / "merged")

    def base(self, model_type: str) -> Path:
        if model_type not in self._bases:
            folder = self.root / model_type / "base"
            shutil.rmtree(folder, ignore_errors=True)
            self._bases[model_type] = build_base(ARCHS[model_type], folder)
        return self._bases[model_type]

    def base_model(self, model_type: str, causal_lm: bool):
        return self._loaded(model_type, causal_lm)[0]

    def base_loading_info(self, model_type: str, causal_lm: bool) -> dict:
        """transformers' missing/unexpected keys when it loads the base itself (a text-only class skips
        the towers of a vision-language checkpoint)."""
        return self._loaded(model_type, causal_lm)[1]

    def _loaded(self, model_type: str, causal_lm: bool):
        key = (model_type, causal_lm)
        if key not in self._models:
            self._models[key] = load(ARCHS[model_type], self.base(model_type), causal_lm)
        return self._models[key]

    def case(self, model_type: str, kind_name: str) -> Case:
        key = (model_type, kind_name)
        if key not in self._cases:
            arch = ARCHS[model_type]
            kind = next(k for k in adapter_kinds(arch) if k.name == kind_name)
            folder = self.root / model_type / kind_name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            self._cases[key] = make_case(arch, kind, self.base(model_type), self.base_model(model_type, kind.causal_lm),
                                         folder)
        return self._cases[key]

    def merged(self, model_type: str, kind_name: str) -> tuple[Case, Path | None]:
        """The case and our merge of it (once per session); None where PEFT could not build the adapter."""
        case = self.case(model_type, kind_name)
        return case, None if case.error is not None else self.merges(case.base, case.adapter).out


def all_cases() -> list[tuple[str, str]]:
    return [(t, k.name) for t, arch in ARCHS.items() for k in adapter_kinds(arch)]


def saved_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
