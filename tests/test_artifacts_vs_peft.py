"""Issue 3: every LoRA artifact PEFT writes, merged into real shards and compared with real PEFT.

Adapters (builders.AADAPTERS) carry embedding LoRA with its saved base copy, DoRA on Linear
and Embedding, modules_to_save, trainable tokens (list and dict form), bias="all"/"lora_only",
lora_bias, and resized vocabularies; bases are bf16 tiny Qwen3 models with and without attention
biases. For each output tensor the expected operation is read from the adapter's keys (spec §1.3),
and the result is compared with ``PeftModel.from_pretrained(base, adapter).merge_and_unload()``:

* replacements, row copies and lora_bias additions: bit-identical;
* Linear LoRA (PEFT rounds once): bit-identical except rare 1-ulp GEMM-order differences;
* DoRA (fp32 norms, one rounding in PEFT too): at most 1 ulp, in at most 1 % of the elements;
* embedding LoRA (PEFT rounds twice, W + rnd(ΔW)): default rounding within 1 ulp of PEFT and equal to
  the single-rounded fp32 sum; rounding="peft" bit-identical to PEFT.
Then the merged folder is loaded with transformers and must compute what the *un-merged* PeftModel
computes. The ulp counts per case are printed at the end of the session.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import (AADAPTERS, EMBED, HEAD, PREFIX, VOCAB, adapter_tensors, check_index, check_like_unmerged,
                      checkpoint_tensors, copy_tree, disk_tensors, double_rounding, edit_json, embedding_operands,
                      expected_ops, fl32, input_ids, load_base_model, logits, operand_ulps, peft_merged_state_dict,
                      peft_unmerged, record, rewrite_adapter, run_cli, scale_of, single_rounding, tensor_bytes,
                      ulp_count)

from qwen_merge import QwenMergeError, iter_merged, merge_shards, plan_merge
from qwen_merge.report import render

# adapters on untied bases (the tied ones are in test_tied.py)
CASES = ["emb", "emb_rs", "dora", "dora_bias", "mts_head", "tt_list", "tt_dict", "bias_all", "bias_lora_only",
         "lora_bias", "rs_q", "rs_mts", "rs_tt"]
RESIZED = ["rs_q", "rs_mts", "rs_tt"]
# largest share of elements allowed to differ (each by at most 1 ulp) from PEFT, per operation
MAX_SHARE = {"linear": 1e-3, "dora": 1e-2}
EXACT = ("replace", "rows", "bias_add")
STATS = "merged elements that differ from PEFT merge_and_unload (artifacts)"


def _compare_with_peft(arts, name, out_dir, rounding):
    base = disk_tensors(arts.base(AADAPTERS[name].base))
    ours = disk_tensors(out_dir)
    ref = arts.reference(name)
    ops = expected_ops(arts.adapter(name))
    assert ops, "fixture error: adapter changes nothing"
    assert set(ours) == set(base), f"tensor names differ from the base: {sorted(set(ours) ^ set(base))}"
    assert set(ops) <= set(base), f"fixture error: ops on tensors the base lacks: {sorted(set(ops) - set(base))}"
    seen_kinds = set()
    for tname, t in ours.items():
        theirs = ref[tname]
        assert t.dtype == theirs.dtype == base[tname].dtype, tname
        assert t.shape == theirs.shape, f"{tname}: shape {tuple(t.shape)}, PEFT {tuple(theirs.shape)}"
        kind = ops.get(tname, "untouched")
        if kind == "untouched":
            assert tensor_bytes(t) == tensor_bytes(base[tname]), f"{tname}: untouched tensor changed"
            assert tensor_bytes(theirs) == tensor_bytes(base[tname]), f"fixture: PEFT changed {tname}"
            continue
        seen_kinds.add(kind)
        # the adapter really changes this tensor (so a merge that skips it cannot pass)
        assert theirs.shape != base[tname].shape or not torch.equal(theirs, base[tname]), \
            f"fixture error: {tname} ({kind}) is unchanged by PEFT"
        n_diff, worst = ulp_count(t, theirs)
        if kind == "embedding" and rounding == "single":
            # PEFT rounds twice: W + rnd(ΔW); one rounding may differ by 1 ulp of the larger operand
            W, delta = embedding_operands(arts.adapter(name), tname[: -len(".weight")])
            n_diff, ratio = operand_ulps(t, theirs, W, delta)
            record(STATS, f"{name}:{rounding}:{kind} (ulps of the larger operand)", n_diff, t.numel(), ratio)
            assert ratio <= 1, f"{tname}: {ratio:.2f} ulp (of the larger operand) from PEFT; double rounding allows 1"
            continue
        record(STATS, f"{name}:{rounding}:{kind}", n_diff, t.numel(), worst)
        if kind in EXACT or (kind == "embedding" and rounding == "peft"):
            assert n_diff == 0, f"{tname} ({kind}, rounding={rounding}): {n_diff}/{t.numel()} elements differ " \
                                f"from PEFT (max {worst} ulp); expected bit-identical"
        else:
            assert worst <= 1, f"{tname} ({kind}): an element is {worst} ulp from PEFT"
            assert n_diff <= MAX_SHARE[kind] * t.numel() + 1, \
                f"{tname} ({kind}): {n_diff}/{t.numel()} elements differ from PEFT"
    return seen_kinds


@pytest.mark.parametrize("rounding", ["single", "peft"])
@pytest.mark.parametrize("name", CASES)
def test_merged_tensors_match_peft(arts, name, rounding):
    kwargs = {} if rounding == "single" else {"rounding": "peft"}
    res = arts.merged(name, **kwargs)
    kinds = _compare_with_peft(arts, name, res.out, rounding)
    assert kinds, name


def test_every_artifact_kind_is_covered(arts):
    kinds = set()
    for name in CASES:
        kinds |= set(expected_ops(arts.adapter(name)).values())
    assert kinds == {"linear", "embedding", "dora", "replace", "rows", "bias_add"}, kinds


# ---------------------------------------------------------------------------------------------------
# 1 + 9. Embedding LoRA: one rounding by default, PEFT's double rounding on request


def _embedding_expectation(arts, name, module="model.embed_tokens"):
    W, delta = embedding_operands(arts.adapter(name), module)
    return W, delta, single_rounding(W, delta), double_rounding(W, delta)


@pytest.mark.parametrize("name", ["emb", "emb_rs", "t_emb_bias"])
def test_embedding_default_rounds_once(arts, name):
    W, delta, single, double = _embedding_expectation(arts, name)
    assert not torch.equal(W.float(), W.float() + delta), "fixture error: zero delta"
    ours = disk_tensors(arts.merged(name).out)[EMBED]
    # one rounding of the fp32 sum (rare 1-ulp GEMM-order differences allowed)
    n_single, ratio = operand_ulps(ours, single, W, delta)
    record(STATS, f"{name}:single:embed vs rnd(W + ΔW) (ulps of the larger operand)", n_single, ours.numel(), ratio)
    assert ratio <= 1 and n_single <= 1e-3 * ours.numel(), \
        f"default rounding: {n_single} elements differ from rnd(W + ΔW) ({ratio:.2f} ulp)"
    # PEFT's merge is W + rnd(ΔW): it differs from one rounding in many elements, by at most one ulp of
    # the larger operand
    n_double, ratio_double = operand_ulps(ours, double, W, delta)
    assert n_double > 0.05 * ours.numel(), f"only {n_double} elements differ from W + rnd(ΔW): not one rounding?"
    assert ratio_double <= 1, f"{ratio_double:.2f} ulp of the larger operand from W + rnd(ΔW)"


@pytest.mark.parametrize("name", ["emb", "emb_rs", "t_emb_bias"])
def test_embedding_rounding_peft_is_double_rounding(arts, name):
    _, _, _, double = _embedding_expectation(arts, name)
    ours = disk_tensors(arts.merged(name, rounding="peft").out)[EMBED]
    n, worst = ulp_count(ours, double)
    assert n == 0, f"rounding='peft': {n} elements differ from W + rnd(ΔW) (max {worst} ulp)"


def test_saved_base_copies_replace_the_base(arts, tmp_path):
    """PEFT loads `<emb>.base_layer.weight` / `lm_head.base_layer.weight` over the base before merging.
    In the fixtures they equal the base, so here they are edited (as when the adapter was trained on a
    different revision of the base): the merge must start from the copies, like PEFT."""
    g = torch.Generator().manual_seed(7)
    copies = (PREFIX + "model.embed_tokens.base_layer.weight", PREFIX + "lm_head.base_layer.weight")
    adapter = rewrite_adapter(arts.adapter("emb_rs"), tmp_path / "adapter", transform=lambda key, t: (
        (t.float() + 0.05 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) if key in copies else t))
    base = arts.base("untied_bias")
    merge_shards(base, adapter, tmp_path / "out", progress=False)
    ours, ref, base_t = disk_tensors(tmp_path / "out"), peft_merged_state_dict(base, adapter), disk_tensors(base)
    W, delta = embedding_operands(adapter)
    assert not torch.equal(W, base_t[EMBED])
    n, ratio = operand_ulps(ours[EMBED], ref[EMBED], W, delta)
    assert ratio <= 1, f"embedding: {ratio:.2f} ulp of the larger operand from PEFT"
    assert ulp_count(ours[EMBED], (base_t[EMBED].float() + delta).to(torch.bfloat16))[0] > 0.5 * W.numel(), \
        "the embedding was merged into the base tensor, not into the saved copy"
    n, worst = ulp_count(ours[HEAD], ref[HEAD])
    assert worst <= 1 and n <= 1e-3 * ours[HEAD].numel(), f"lm_head: {n} elements differ from PEFT ({worst} ulp)"


def test_rounding_peft_leaves_linear_single_rounded(arts):
    """PEFT's default (unsafe) Linear merge rounds once, so rounding='peft' must not change Linear tensors;
    only the embedding differs between the two modes."""
    one = checkpoint_tensors(arts.merged("emb_rs").out)
    two = checkpoint_tensors(arts.merged("emb_rs", rounding="peft").out)
    ops = expected_ops(arts.adapter("emb_rs"))
    assert list(one) == list(two)
    linear = [n for n, k in ops.items() if k == "linear"]
    assert HEAD in linear and len(linear) >= 9
    for tname in one:
        if tname == EMBED:
            assert one[tname][3] != two[tname][3], "rounding='peft' did not change the embedding"
        else:
            assert one[tname][3] == two[tname][3], f"{tname}: rounding='peft' changed a non-embedding tensor"


# ---------------------------------------------------------------------------------------------------
# 2. DoRA


def _dora_expectation(arts, name, module, base):
    a = adapter_tensors(arts.adapter(name))
    s = fl32(scale_of(arts.adapter(name), module))
    W = base[module + ".weight"].float()
    m = a[module + ".lora_magnitude_vector"].float()
    if module + ".lora_embedding_A" in a:
        A, B = a[module + ".lora_embedding_A"].float(), a[module + ".lora_embedding_B"].float()
        V = W + (B @ A).T * s
        return (m / torch.linalg.norm(V, dim=0)).view(1, -1) * V, V  # per embedding column
    A, B = a[module + ".lora_A.weight"].float(), a[module + ".lora_B.weight"].float()
    V = W + (B @ A) * s
    return (m / torch.linalg.norm(V, dim=1)).view(-1, 1) * V, V  # per output row


@pytest.mark.parametrize("name", ["dora", "dora_bias"])
def test_dora_formula(arts, name):
    base = disk_tensors(arts.base(AADAPTERS[name].base))
    ours = disk_tensors(arts.merged(name).out)
    dora = [t for t, k in expected_ops(arts.adapter(name)).items() if k == "dora"]
    assert len(dora) >= 8
    if name == "dora":
        assert EMBED in dora
    for tname in dora:
        expected, V = _dora_expectation(arts, name, tname[: -len(".weight")], base)
        got = ours[tname]
        n, worst = ulp_count(got, expected.to(got.dtype))
        record(STATS, f"{name}:single:dora vs formula", n, got.numel(), worst)
        assert worst <= 1 and n <= 1e-2 * got.numel() + 1, f"{tname}: {n} elements off the DoRA formula ({worst} ulp)"
        # the magnitude matters: a plain LoRA merge (W + ΔW) is far from the DoRA result
        plain = V.to(got.dtype)
        assert ulp_count(got, plain)[0] > 0.5 * got.numel(), f"{tname}: looks like W + ΔW, magnitude ignored"


def test_row_blocks_do_not_change_the_result(arts):
    """DoRA needs whole-row (Linear) or whole-column (Embedding) norms; tiny row blocks must give the same
    bytes as one block per tensor."""
    for name in ["dora", "emb", "rs_tt", "lora_bias"]:
        whole = checkpoint_tensors(arts.merged(name).out)
        small = checkpoint_tensors(arts.merged(name, block_bytes=512).out)
        assert list(whole) == list(small)
        for tname in whole:
            assert whole[tname][1:] == small[tname][1:], f"{name}: {tname} differs with 512-byte row blocks"


# ---------------------------------------------------------------------------------------------------
# 3 - 5. modules_to_save, trainable tokens, biases


def test_modules_to_save_replaces_lm_head(arts):
    ours = disk_tensors(arts.merged("mts_head").out)
    saved = adapter_tensors(arts.adapter("mts_head"))[HEAD]
    base = disk_tensors(arts.base("untied"))
    assert tensor_bytes(ours[HEAD]) == tensor_bytes(saved)
    assert not torch.equal(saved, base[HEAD]), "fixture error: the trained copy equals the base"


@pytest.mark.parametrize("name,indices", [("tt_list", [3, 7, 200]), ("tt_dict", [5, 250]), ("rs_tt", [256, 257, 10])])
def test_trainable_tokens_replace_rows(arts, name, indices):
    cfg = json.loads((arts.adapter(name) / "adapter_config.json").read_text())
    listed = cfg["trainable_token_indices"]
    assert (listed if isinstance(listed, list) else listed["embed_tokens"]) == indices
    a = adapter_tensors(arts.adapter(name))
    delta = a["model.embed_tokens.token_adapter.trainable_tokens_delta"]
    start = a.get("model.embed_tokens.token_adapter.base_layer.weight")
    if start is None:
        start = disk_tensors(arts.base(AADAPTERS[name].base))[EMBED]
    ours = disk_tensors(arts.merged(name).out)[EMBED]
    assert ours.shape == start.shape
    others = [i for i in range(start.shape[0]) if i not in indices]
    assert torch.equal(ours[others], start[others]), "rows outside trainable_token_indices changed"
    for j, i in enumerate(indices):
        assert torch.equal(ours[i], delta[j].to(ours.dtype)), f"row {i} is not trainable_tokens_delta[{j}]"
        assert not torch.equal(ours[i], start[i]), f"fixture error: row {i} was not trained"


@pytest.mark.parametrize("name", ["bias_all", "bias_lora_only"])
def test_saved_biases_replace_base_biases(arts, name):
    a = adapter_tensors(arts.adapter(name))
    saved = {k.replace(".base_layer.bias", ".bias"): v for k, v in a.items() if k.endswith(".bias")}
    assert len(saved) == (8 if name == "bias_all" else 4), sorted(saved)
    base = disk_tensors(arts.base("untied_bias"))
    ours = disk_tensors(arts.merged(name).out)
    for tname, v in saved.items():
        assert tensor_bytes(ours[tname]) == tensor_bytes(v), f"{tname} is not the saved bias"
        assert not torch.equal(v, base[tname]), f"fixture error: {tname} was not trained"
    for tname in base:
        if tname.endswith(".bias") and tname not in saved:
            assert tensor_bytes(ours[tname]) == tensor_bytes(base[tname]), tname


def test_lora_bias_is_added(arts):
    a = adapter_tensors(arts.adapter("lora_bias"))
    base = disk_tensors(arts.base("untied_bias"))
    ours = disk_tensors(arts.merged("lora_bias").out)
    keys = [k for k in a if k.endswith(".lora_B.bias")]
    assert len(keys) == 8
    for k in keys:
        module = k[: -len(".lora_B.bias")]
        b = base[module + ".bias"]
        expected = (b.float() + a[k].float() * fl32(scale_of(arts.adapter("lora_bias"), module))).to(b.dtype)
        assert not torch.equal(expected, b)
        n, worst = ulp_count(ours[module + ".bias"], expected)
        assert n == 0, f"{module}.bias: {n} elements differ from rnd(b + s*lora_B.bias) (max {worst} ulp)"


# ---------------------------------------------------------------------------------------------------
# 6. Resized vocabulary


@pytest.mark.parametrize("name", RESIZED)
def test_resized_vocabulary(arts, name):
    res = arts.merged(name)
    base_dir = arts.base("untied")
    cfg_in = json.loads((base_dir / "config.json").read_text())
    cfg_out = json.loads((res.out / "config.json").read_text())
    assert cfg_out["vocab_size"] == 260
    assert {k: v for k, v in cfg_out.items() if k != "vocab_size"} == \
        {k: v for k, v in cfg_in.items() if k != "vocab_size"}, "config.json changed beyond vocab_size"
    stored = checkpoint_tensors(res.out)
    assert stored[EMBED][2] == (260, 32) and stored[HEAD][2] == (260, 32)
    base_index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    index = check_index(res.out)
    assert index["weight_map"] == base_index["weight_map"], "tensor-to-shard assignment changed"
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"] + 2 * 4 * 32 * 2


def test_resized_modules_to_save_uses_the_trained_copy(arts):
    """The file also holds original_module / modules_to_save copies; <N>.weight is the trained one."""
    a = adapter_tensors(arts.adapter("rs_mts"))
    ours = disk_tensors(arts.merged("rs_mts").out)
    for n, tname in (("model.embed_tokens", EMBED), ("lm_head", HEAD)):
        assert torch.equal(a[tname], a[n + ".modules_to_save.weight"])
        assert not torch.equal(a[tname], a[n + ".original_module.weight"])
        assert tensor_bytes(ours[tname]) == tensor_bytes(a[tname]), tname


def test_resized_vocabulary_nested_text_config(arts, tmp_path):
    """A VLM-style config keeps the text model's vocab_size in text_config: it must follow too."""
    base = copy_tree(arts.base("untied"), tmp_path / "base")
    edit_json(base / "config.json", {"text_config": {"model_type": "qwen3", "vocab_size": VOCAB, "hidden_size": 32}})
    merge_shards(base, arts.adapter("rs_q"), tmp_path / "out", progress=False)
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["vocab_size"] == 260
    assert out_cfg["text_config"]["vocab_size"] == 260
    assert out_cfg["text_config"]["hidden_size"] == 32


# ---------------------------------------------------------------------------------------------------
# The merged folder behaves like the un-merged PeftModel


@pytest.mark.parametrize("name", CASES)
def test_merged_checkpoint_matches_unmerged_peft(arts, name):
    from transformers import AutoModelForCausalLM

    spec = AADAPTERS[name]
    res = arts.merged(name)
    ids = input_ids(spec.resize or VOCAB)
    model = AutoModelForCausalLM.from_pretrained(res.out, dtype=torch.bfloat16)
    if spec.resize:
        assert model.config.vocab_size == spec.resize
        assert model.model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == spec.resize
    ours = logits(model, ids)
    base_logits = logits(load_base_model(arts.base(spec.base), spec.resize), ids)
    unmerged = logits(peft_unmerged(arts.base(spec.base), arts.adapter(name), spec.resize), ids)
    check_like_unmerged(name, ours, unmerged, base_logits, min_effect=0.01)


# ---------------------------------------------------------------------------------------------------
# iter_merged and the CLI follow the same rules


@pytest.mark.parametrize("name,kwargs", [("emb", {}), ("emb", {"rounding": "peft"}), ("dora", {}), ("rs_tt", {}),
                                         ("bias_all", {}), ("t_emb", {})])
def test_iter_merged_matches_files(arts, name, kwargs):
    res = arts.merged(name, **kwargs)
    stored = checkpoint_tensors(res.out)
    got = []
    for tname, tensor in iter_merged(res.base, res.adapter, **kwargs):
        _, dtype, shape, payload = stored[tname]
        assert tuple(tensor.shape) == shape, tname
        assert tensor_bytes(tensor) == payload, f"{tname}: iter_merged bytes differ from the written file"
        got.append(tname)
    assert got == list(stored), "iter_merged must yield every tensor once, in checkpoint (shard, offset) order"


def test_cli_rounding_peft(arts, tmp_path):
    base, adapter = arts.pair("emb")
    proc = run_cli("merge", base, adapter, tmp_path / "out", "--rounding", "peft", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    api = checkpoint_tensors(arts.merged("emb", rounding="peft").out)
    assert checkpoint_tensors(tmp_path / "out") == api
    default = checkpoint_tensors(arts.merged("emb").out)
    assert default[EMBED] != api[EMBED]


def test_plan_accepts_rounding(arts):
    base, adapter = arts.pair("emb")
    for rounding in ("single", "peft"):
        plan = plan_merge(base, adapter, rounding=rounding)
        assert render(plan).strip()
    with pytest.raises((ValueError, QwenMergeError)) as info:
        plan_merge(base, adapter, rounding="double")
    assert "rounding" in str(info.value)
