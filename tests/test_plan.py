"""The planner on its own: base headers and adapters stated as plain Python values (`planbuild`), planned
without files and without torch. Each case says which tensor changes how, where each output tensor is
stored, or the one line that refuses the inputs. The end-to-end tests merge real models; these pin the
decisions one at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
from builders import run_python
from planbuild import (ADAPTER_FILE, BASE, adapter, always_same, checkpoint, dtypes, embedding_pair, expert_slices,
                       files, landings, lora_pair, plan, scales, sources, steps)

from qwen_merge.errors import MismatchError, OptionError
from qwen_merge.inputs.adapter import Adapter
from qwen_merge.inputs.checkpoint import Checkpoint
from qwen_merge.planning.plan import MergePlan
from qwen_merge.planning.ties import Tie

EMBED, HEAD, NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
Q, K, UP, DOWN = (f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj",
                                                   "mlp.down_proj"))
SHAPES = {Q: (8, 8), K: (4, 8), UP: (12, 8), DOWN: (8, 12)}  # (out, in) of each Linear
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def qwen3(*, tied: bool = False, head: bool = True) -> Checkpoint:
    """A two-shard Qwen3-shaped base: one layer, hidden size 8, vocabulary 16; lm_head stored unless `head`
    is false (a tied model may store the matrix once)."""
    first = {EMBED: ("BF16", [16, 8]), f"{Q}.weight": ("BF16", [8, 8]), f"{K}.weight": ("BF16", [4, 8])}
    second = {f"{UP}.weight": ("BF16", [12, 8]), f"{DOWN}.weight": ("BF16", [8, 12]), NORM: ("BF16", [8])}
    if head:
        second[HEAD] = ("BF16", [16, 8])
    return checkpoint({SHARD1: first, SHARD2: second},
                      {"model_type": "qwen3", "vocab_size": 16, "tie_word_embeddings": tied})


def lora(*modules: str, r: int = 2, lora_alpha: float = 4, **config) -> Adapter:
    """LoRA of rank `r` on the base's Linear `modules`."""
    tensors = {key: spec for m in modules for key, spec in lora_pair(m, r, SHAPES[m]).items()}
    targets = [m.rpartition(".")[2] for m in modules]
    return adapter({"r": r, "lora_alpha": lora_alpha, "target_modules": targets, **config}, tensors)


# Where each pair lands, and how much of it


def test_each_pair_lands_on_its_modules_weight():
    merge = plan(qwen3(), lora(Q, UP))
    assert landings(merge) == {f"{Q}.weight": f"{Q}.lora_A.weight", f"{UP}.weight": f"{UP}.lora_A.weight"}
    assert steps(merge) == {f"{Q}.weight": "merge", f"{UP}.weight": "merge"}


def test_ops_are_counted_merges_and_copies():
    merge = plan(qwen3(), lora(Q, K, DOWN))
    assert (len(merge.merges), len(merge.ops), merge.copied) == (3, 3, 4)  # 7 tensors: embed, norm, head, up


def test_in_model_names_land_through_a_prefix_rename():
    inner = "model.language_model.layers.0.self_attn.q_proj"
    merge = plan(qwen3(), adapter({"r": 2, "lora_alpha": 4}, lora_pair(inner, 2, (8, 8))))
    assert merge.renames == (("model.language_model.", "model."),)
    assert landings(merge) == {f"{Q}.weight": f"{inner}.lora_A.weight"}


def test_embedding_lora_lands_on_the_embedding():
    merge = plan(qwen3(), adapter({"r": 2, "lora_alpha": 4}, embedding_pair("model.embed_tokens", 2, (16, 8))))
    assert steps(merge) == {EMBED: "merge"}


def test_lora_bias_lands_on_the_bias():
    base = checkpoint({"model.safetensors": {f"{Q}.weight": ("BF16", [8, 8]), f"{Q}.bias": ("BF16", [8])}})
    tensors = {**lora_pair(Q, 2, (8, 8)), f"{Q}.lora_B.bias": ("F32", [8])}
    merge = plan(base, adapter({"r": 2, "lora_alpha": 4, "lora_bias": True}, tensors))
    assert landings(merge) == {f"{Q}.weight": f"{Q}.lora_A.weight", f"{Q}.bias": f"{Q}.lora_A.weight"}


def test_scale_is_alpha_over_r():
    assert scales(plan(qwen3(), lora(Q, r=4, lora_alpha=8))) == {f"{Q}.weight": (4, 2.0)}


def test_rslora_scale_is_alpha_over_the_root_of_r():
    assert scales(plan(qwen3(), lora(Q, r=4, lora_alpha=8, use_rslora=True))) == {f"{Q}.weight": (4, 4.0)}


def test_rank_and_alpha_patterns_set_each_modules_scale():
    tensors = {**lora_pair(Q, 4, SHAPES[Q]), **lora_pair(UP, 2, SHAPES[UP])}
    config = {"r": 2, "lora_alpha": 4, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"up_proj": 16}}
    assert scales(plan(qwen3(), adapter(config, tensors))) == {f"{Q}.weight": (4, 1.0), f"{UP}.weight": (2, 8.0)}


# Replacements and tied embeddings


def test_modules_to_save_replaces_the_tensor():
    merge = plan(qwen3(), adapter({"r": 2, "lora_alpha": 4, "modules_to_save": ["norm"]}, {NORM: ("BF16", [8])}))
    assert (steps(merge), sources(merge)) == ({NORM: "replace"}, {NORM: f"adapter:{NORM}"})


def test_a_replacement_in_another_dtype_is_converted_to_the_base_dtype():
    merge = plan(qwen3(), adapter({"r": 2, "lora_alpha": 4, "modules_to_save": ["norm"]}, {NORM: ("F32", [8])}))
    assert steps(merge) == {NORM: "replace → BF16"}


def test_tied_embeddings_saved_equal_stay_tied_and_stored_once():
    saved = {EMBED: ("BF16", [16, 8]), HEAD: ("BF16", [16, 8])}
    merge = plan(qwen3(tied=True, head=False), adapter({"r": 2, "lora_alpha": 4}, saved), same_values=always_same)
    assert (merge.tie.tie, merge.tie.stored_once, merge.config) == (Tie.KEPT, True, None)
    assert steps(merge) == {EMBED: "replace"} and HEAD not in dtypes(merge)


def test_tied_embeddings_saved_different_are_untied():
    saved = {EMBED: ("BF16", [16, 8]), HEAD: ("BF16", [16, 8])}
    merge = plan(qwen3(tied=True, head=False), adapter({"r": 2, "lora_alpha": 4}, saved))
    assert merge.tie.tie is Tie.UNTIED and merge.config["tie_word_embeddings"] is False
    assert sources(merge) == {EMBED: f"adapter:{EMBED}", HEAD: f"adapter:{HEAD}"}


def test_embedding_lora_unties_and_places_the_new_lm_head_beside_the_embedding():
    lora_on_embed = adapter({"r": 2, "lora_alpha": 4}, embedding_pair("model.embed_tokens", 2, (16, 8)))
    merge = plan(qwen3(tied=True, head=False), lora_on_embed)
    assert sources(merge) == {EMBED: f"base:{EMBED}", HEAD: f"base:{EMBED}"}  # lm_head: the base matrix, no delta
    assert files(merge)[SHARD1] == [HEAD, EMBED, f"{K}.weight", f"{Q}.weight"]  # in the embedding's shard
    assert merge.config == {"model_type": "qwen3", "vocab_size": 16, "tie_word_embeddings": False}


# Experts


def plan_expert_lora(base: Checkpoint) -> MergePlan:
    """The plan of a target_parameters LoRA (r=2) on layer 0's 2 experts: gate_up_proj (in 8, out 12) and
    down_proj (in 6, out 8), one pair per parameter, A with 2·r rows and B with 2·r columns."""
    m = "model.layers.0.mlp.experts"
    tensors = {f"{m}.base_layer.lora_A.weight": ("F32", [4, 8]), f"{m}.base_layer.lora_B.weight": ("F32", [12, 4]),
               f"{m}.lora_A.weight": ("F32", [4, 6]), f"{m}.lora_B.weight": ("F32", [8, 4])}
    config = {"r": 2, "lora_alpha": 4, "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
    return plan(base, adapter(config, tensors))


def test_fused_expert_lora_lands_on_the_fused_tensors_by_shape():
    m = "model.layers.0.mlp.experts"
    base = checkpoint({"model.safetensors": {f"{m}.gate_up_proj": ("BF16", [2, 12, 8]),
                                             f"{m}.down_proj": ("BF16", [2, 8, 6])}})
    assert landings(plan_expert_lora(base)) == {f"{m}.gate_up_proj": f"{m}.base_layer.lora_A.weight",
                                           f"{m}.down_proj": f"{m}.lora_A.weight"}


def test_fused_expert_lora_is_split_over_per_expert_tensors():
    m = "model.layers.0.mlp.experts"
    base = checkpoint({"model.safetensors": {f"{m}.{e}.{p}.weight": ("BF16", shape) for e in range(2)
                                             for p, shape in (("gate_proj", [6, 8]), ("up_proj", [6, 8]),
                                                              ("down_proj", [8, 6]))}})
    merge = plan_expert_lora(base)
    assert expert_slices(merge) == {
        f"{m}.0.gate_proj.weight": (0, (0, 6)), f"{m}.0.up_proj.weight": (0, (6, 12)),
        f"{m}.0.down_proj.weight": (0, (0, 8)),
        f"{m}.1.gate_proj.weight": (1, (0, 6)), f"{m}.1.up_proj.weight": (1, (6, 12)),
        f"{m}.1.down_proj.weight": (1, (0, 8)),
    }


# The output's files


def test_the_base_shards_are_kept_with_their_headers():
    base = qwen3()
    merge = plan(base, lora(Q, UP))
    assert [(s.name, s.header) for s in merge.shards] == [(f.path.name, f.header) for f in base.shards]
    assert merge.index_name == INDEX and merge.index_document()["metadata"] == {"total_size": 1104}


def test_max_shard_size_reshards_in_checkpoint_order():
    merge = plan(qwen3(), lora(Q), max_shard_size=448)
    assert files(merge) == {
        "model-00001-of-00003.safetensors": [EMBED, f"{K}.weight", f"{Q}.weight"],  # 256 + 64 + 128: exactly full
        "model-00002-of-00003.safetensors": [f"{DOWN}.weight", f"{UP}.weight", NORM],  # 192 + 192 + 16
        "model-00003-of-00003.safetensors": [HEAD],  # 256 more would pass 448
    }
    assert merge.index_document() == {"metadata": {"total_size": 1104}, "weight_map": {
        EMBED: "model-00001-of-00003.safetensors", f"{Q}.weight": "model-00001-of-00003.safetensors",
        f"{K}.weight": "model-00001-of-00003.safetensors", f"{UP}.weight": "model-00002-of-00003.safetensors",
        f"{DOWN}.weight": "model-00002-of-00003.safetensors", NORM: "model-00002-of-00003.safetensors",
        HEAD: "model-00003-of-00003.safetensors"}}


def test_an_output_that_fits_one_shard_is_one_file_without_an_index():
    merge = plan(qwen3(), lora(Q), max_shard_size=10_000)
    assert (list(files(merge)), merge.index_name, merge.index_json) == (["model.safetensors"], None, b"")


# The output dtype and FP8


def test_dtype_converts_other_floats_and_copies_integers_and_its_own_dtype():
    base = checkpoint({"model.safetensors": {f"{Q}.weight": ("F32", [8, 8]), NORM: ("BF16", [8]),
                                             "model.position_ids": ("I64", [1, 16])}}, {"torch_dtype": "float32"})
    merge = plan(base, lora(Q), dtype="bfloat16")
    assert steps(merge) == {f"{Q}.weight": "merge → BF16"}  # NORM is BF16 already, position ids are integers
    assert dtypes(merge) == {f"{Q}.weight": "BF16", NORM: "BF16", "model.position_ids": "I64"}
    assert merge.config == {"torch_dtype": "bfloat16"}


def test_dtype_conversion_changes_the_index_total_size():
    merge = plan(qwen3(), lora(Q), dtype="float32")
    assert steps(merge)[NORM] == "→ F32" and merge.copied == 0
    assert merge.index_document()["metadata"] == {"total_size": 2 * 1104}


def fp8_base() -> Checkpoint:
    """One FP8 weight with its block scale (one 128x128 block covers it), and a BF16 norm."""
    return checkpoint({"model.safetensors": {f"{Q}.weight": ("F8_E4M3", [8, 8]),
                                             f"{Q}.weight_scale_inv": ("F32", [1, 1]), NORM: ("BF16", [8])}},
                      {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})


def test_lora_on_fp8_is_requantized_and_its_new_scales_are_written_after_it():
    merge = plan(fp8_base(), lora(Q))
    assert steps(merge) == {f"{Q}.weight": "dequant → merge → requant",
                            f"{Q}.weight_scale_inv": f"new block scales of {Q}.weight"}
    assert files(merge) == {"model.safetensors": [f"{Q}.weight", NORM, f"{Q}.weight_scale_inv"]}


def test_dtype_dequantizes_fp8_and_drops_the_block_scales():
    merge = plan(fp8_base(), adapter({"r": 2, "lora_alpha": 4}, {NORM: ("BF16", [8])}), dtype="bfloat16")
    assert steps(merge) == {f"{Q}.weight": "dequant → BF16", NORM: "replace"}
    assert (merge.dropped, dtypes(merge)) == ((f"{Q}.weight_scale_inv",), {f"{Q}.weight": "BF16", NORM: "BF16"})
    assert merge.config == {"dtype": "bfloat16"}  # quantization_config is gone


# Refusals: one line each


def refusal(error: type[Exception], make) -> str:
    """The message of the `error` that `make()` raises, checked to be one line."""
    with pytest.raises(error) as raised:
        make()
    assert "\n" not in str(raised.value)
    return str(raised.value)


def test_a_pair_without_a_base_tensor_is_refused():
    missing = "model.layers.1.self_attn.q_proj"
    assert refusal(MismatchError, lambda: plan(qwen3(), adapter({"r": 2, "lora_alpha": 4},
                                                               lora_pair(missing, 2, (8, 8))))) == (
        f"{ADAPTER_FILE}: base_model.model.{missing}.lora_A.weight targets '{missing}.weight', which is not in "
        f"the base model (nearest base tensors: {Q}.weight, {K}.weight, {UP}.weight); if the names differ by a "
        f"prefix, pass key_map / --map FROM=TO")


def test_a_pair_of_another_shape_is_refused_naming_both_shapes():
    assert refusal(MismatchError, lambda: plan(qwen3(), adapter({"r": 2, "lora_alpha": 4},
                                                               lora_pair(Q, 2, (8, 6))))) == (
        f"{ADAPTER_FILE}: {Q}.weight: shape [8, 8] does not fit lora_B [8, 2] @ lora_A [2, 6] (expected [8, 6]); "
        f"is the adapter for another model?")


def test_a_replacement_of_another_width_is_refused():
    assert refusal(MismatchError, lambda: plan(qwen3(), adapter({"r": 2, "lora_alpha": 4},
                                                               {EMBED: ("BF16", [16, 6])}))) == (
        f"{ADAPTER_FILE}: {EMBED}: adapter tensor 'base_model.model.{EMBED}' has shape [16, 6], the base has "
        f"[16, 8]; only the row count (vocabulary) may change")


def test_lora_on_an_integer_tensor_is_refused():
    base = checkpoint({"model.safetensors": {f"{Q}.weight": ("I8", [8, 8])}})
    assert refusal(MismatchError, lambda: plan(base, lora(Q))).startswith(
        f"{ADAPTER_FILE}: {Q}.weight cannot take a LoRA delta: its dtype is I8. Supported: plain BF16/F16/F32 ")


def test_dtype_on_a_base_quantized_otherwise_than_fp8_is_refused():
    base = checkpoint({"model.safetensors": {f"{Q}.weight": ("BF16", [8, 8])}},
                      {"quantization_config": {"quant_method": "bitsandbytes"}})
    assert refusal(OptionError, lambda: plan(base, lora(Q), dtype="bfloat16")) == (
        f"dtype: bfloat16 cannot convert {BASE}, a checkpoint quantized with quant_method 'bitsandbytes'; only "
        f"block-wise FP8 (\"fp8\") and bitsandbytes 4-bit bases can be dequantized")


# Without torch

NO_TORCH = """
import sys
sys.path.insert(0, sys.argv[1])
import qwen_merge.planning.plan
from planbuild import adapter, checkpoint, embedding_pair, lora_pair, plan
q = "model.layers.0.self_attn.q_proj"
tensors = {"model.embed_tokens.weight": ("BF16", [16, 8]), q + ".weight": ("F32", [8, 8])}
base = checkpoint({"model.safetensors": tensors}, {"tie_word_embeddings": True})
lora = adapter({"r": 2, "lora_alpha": 4}, {**embedding_pair("model.embed_tokens", 2, (16, 8)),
                                           **lora_pair(q, 2, (8, 8))})
merge = plan(base, lora, dtype="bfloat16", max_shard_size=256)
print(len(merge.ops), sorted(m for m in sys.modules if m.partition(".")[0] == "torch"))
"""


def test_planning_never_imports_torch():
    """In a fresh interpreter: the test session itself has imported torch long before."""
    proc = run_python(NO_TORCH, Path(__file__).parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "[]"]  # the embedding, the lm_head it unties, q_proj
