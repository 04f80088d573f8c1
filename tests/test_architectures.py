"""Every Qwen model type of transformers 5.24, with the adapters users make for it, against real PEFT.

For each case (fixtures_arch.py) the merge must keep the base's tensor names, shards and dtypes; change
exactly the tensors PEFT's merge changes, each within 1 ulp of PEFT's once-rounded value (PEFT's merge
done in fp32 and rounded once: where PEFT itself rounds twice, target_parameters experts, its bf16 output
can be thousands of ulp off near cancellations); load with transformers with
no missing or unexpected keys; and give logits (with an image for vision-language types) within
1.5x + 1e-3 of the error PEFT's own merged model has against the unmerged model.
"""

from __future__ import annotations

import json

import pytest
from builders import checkpoint_tensors, logits, to_tensor, ulp_distance
from fixtures_arch import ARCHS, ArchZoo, all_cases, load, saved_config

from qwen_merge import merge_shards, plan_merge
from qwen_merge.inputs import architectures
from qwen_merge.planning.names import NameMap
from qwen_merge.report import render

# Adapters PEFT 0.21.2 itself cannot build, with the start of its error. If PEFT starts building one, the
# test fails so the case gets merged and checked instead.
PEFT_CANNOT = {
    ("qwen3_omni_moe", "all_linear_false"): "Target module Qwen3OmniMoeAudioEncoderLayer",
    ("qwen3_omni_moe", "all_linear_seeded_b"): "Target module Qwen3OmniMoeAudioEncoderLayer",
}


@pytest.fixture(scope="session")
def arch_zoo(tmp_path_factory) -> ArchZoo:
    return ArchZoo(tmp_path_factory.mktemp("arch"))


@pytest.fixture(scope="session")
def merged_cases(arch_zoo):
    """(model type, adapter kind) -> (Case, our output folder), merged once per session."""
    return arch_zoo.merged


def _ulps(dtype: str, shape: tuple[int, ...], a: bytes, b: bytes) -> int:
    return int(ulp_distance(to_tensor(dtype, shape, a), to_tensor(dtype, shape, b)).max())


@pytest.mark.parametrize("model_type,kind", all_cases())
def test_merge_matches_peft(merged_cases, model_type, kind):
    case, out = merged_cases(model_type, kind)
    if (model_type, kind) in PEFT_CANNOT:
        assert case.error is not None and PEFT_CANNOT[(model_type, kind)] in case.error, \
            f"PEFT now builds this adapter ({case.error=}); merge it and check it like the others"
        return
    assert case.error is None, f"PEFT could not build the adapter: {case.error}"
    base, ours, peft, once = (checkpoint_tensors(f) for f in (case.base, out, case.peft_merged, case.peft_once))
    assert {n: v[:3] for n, v in ours.items()} == {n: v[:3] for n, v in base.items()}, \
        "names, dtypes, shapes or shard assignment differ from the base"
    changed_ours = {n for n in base if ours[n][3] != base[n][3]}
    # A text-only model class saves no vision tower: what it does not save, its merge did not change.
    changed_peft = {n for n in base if n in peft and peft[n][3] != base[n][3]}
    assert changed_ours == changed_peft, (sorted(changed_ours - changed_peft)[:5],
                                          sorted(changed_peft - changed_ours)[:5])
    assert changed_ours, "the adapter changed nothing"
    worst = max(_ulps(*ours[n][1:3], ours[n][3], once[n][3]) for n in changed_ours)
    assert worst <= 1, f"a merged tensor differs from PEFT's once-rounded value by {worst} ulp"


MERGEABLE = [c for c in all_cases() if c not in PEFT_CANNOT]


@pytest.mark.parametrize("model_type,kind", MERGEABLE)
def test_merged_model_loads_and_matches_unmerged_logits(arch_zoo, merged_cases, model_type, kind):
    case, out = merged_cases(model_type, kind)
    model, info = load(case.arch, out, case.kind.causal_lm)
    base_info = arch_zoo.base_loading_info(model_type, case.kind.causal_lm)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert sorted(info[key]) == sorted(base_info[key]), f"{key}: {info[key]}"
    ours = logits(model, case.inputs)
    err_ours = float((ours - case.logits_unmerged).abs().max())
    err_peft = float((case.logits_peft - case.logits_unmerged).abs().max())
    assert err_ours <= 1.5 * err_peft + 1e-3, f"logit error {err_ours:.4g} vs PEFT's merged model {err_peft:.4g}"


@pytest.mark.parametrize("model_type,kind", [c for c in MERGEABLE if "all_linear" in c[1] or "experts" in c[1]])
def test_peft_rounding_reproduces_peft(merged_cases, tmp_path, model_type, kind):
    """rounding="peft" rounds ΔW to the weight's dtype first where PEFT does (target_parameters experts):
    then every tensor equals PEFT's own bf16 merge_and_unload() output."""
    case, _ = merged_cases(model_type, kind)
    if not json.loads((case.adapter / "adapter_config.json").read_text()).get("target_parameters"):
        return  # no parameter LoRA: both roundings give the same bytes, checked above
    merge_shards(case.base, case.adapter, tmp_path / "out", progress=False, rounding="peft")
    ours, peft = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(case.peft_merged)
    worst = max(_ulps(*ours[n][1:3], ours[n][3], peft[n][3]) for n in peft if ours[n][3] != peft[n][3]) \
        if any(ours[n][3] != peft[n][3] for n in peft) else 0
    assert worst <= 1, f"rounding='peft' differs from PEFT's merge by {worst} ulp"


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_rename_and_fusion_tables_match_transformers(arch_zoo, model_type):
    """The rename sets and the fused-expert list in qwen_merge.inputs.architectures are what transformers does:
    under the set the merge picks, every in-memory parameter (experts aside) is a tensor on disk."""
    arch, base = ARCHS[model_type], arch_zoo.base(model_type)
    disk = set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"])
    config = saved_config(base)
    views = [False, True] if arch.causal_lm else [False]
    for causal_lm in views:
        memory = [n for n, _ in arch_zoo.base_model(model_type, causal_lm).named_parameters()]
        fused = [n for n in memory if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
        plain = [n for n in memory if n not in fused and ".ngram_embedding." not in n]
        candidates = [NameMap(())] + [NameMap(s) for s in architectures.rename_sets(config)]
        fitting = [c for c in candidates if all(c(n) in disk for n in plain)]
        assert fitting, f"no known rename set maps {model_type} (causal_lm={causal_lm}) to its checkpoint"
        per_expert_on_disk = any(architectures.PER_EXPERT_TENSOR.match(n) for n in disk)
        assert architectures.fuses_experts(config) == bool(fused), "fused-expert table disagrees"
        if fused and per_expert_on_disk:
            assert not any(architectures.is_module_in_memory(n, config) for n in disk
                           if architectures.PER_EXPERT_TENSOR.match(n))


@pytest.mark.slow  # builds transformers models
@pytest.mark.parametrize("model_type", [t for t, a in ARCHS.items() if a.vision and not a.causal_lm])
def test_text_only_view_is_not_offered_by_transformers(model_type):
    """Text-only fine-tuners load Qwen3.5, Qwen3.5-MoE and Qwen4-Exp through AutoModelForCausalLM (tested
    above); transformers 5.24 has no such class for the other vision-language types, so there is no such
    adapter to merge."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_config(ARCHS[model_type].make_config())


def test_plan_shows_the_renames(arch_zoo, merged_cases):
    case, _ = merged_cases("qwen2_audio", "all_linear_false")
    text = render(plan_merge(case.base, case.adapter))
    for old, new in architectures.RENAME_SETS["qwen2_audio"][0]:
        assert f"{old}* -> base names {new}*" in text
