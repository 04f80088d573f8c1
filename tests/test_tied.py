"""Issue 3, tied embeddings (spec §7 table): the merged checkpoint must behave like the UN-merged PEFT
model, which PEFT's own merge_and_unload does not do for several rows.

Every row of the table is a real adapter built on a tied tiny Qwen3 base (builders, table 2):
LoRA on embed_tokens only, on lm_head only, on both (without and with ensure_weight_tying),
modules_to_save lm_head (without and with ensure_weight_tying) and trainable tokens, plus the
ensure_weight_tying adapter after three real SGD steps (PEFT 0.21.2 creates lm_head's factors as copies
of the embedding's, so training moves them apart and each side then has its own delta). Each runs on
a base whose checkpoint has no lm_head.weight (what transformers v5 writes) and on one that stores it.

Expected tensors come from the libraries: "twin" is PEFT's merge on the same weights with the tie
cut (lm_head an independent copy), which is what the un-merged tied model computes for the rows
without ensure_weight_tying; "peft" is PEFT's own merge where it is right; "file:" is a tensor of the
adapter; "base" the base embedding; "formula" the single-rounded W + ΔW of each side's own factors.
If the two matrices end up different, lm_head.weight must be written and tie_word_embeddings set to
false; if equal, the checkpoint stays tied and stores the matrix once (a base that stored lm_head may
keep an identical copy).
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import (EMBED, HEAD, adapter_tensors, check_index, check_like_unmerged, checkpoint_tensors, copy_tree,
                      disk_tensors, edit_json, embedding_operands, expected_ops, fl32, input_ids, load_base_model,
                      logits, operand_ulps, peft_unmerged, record, scale_of, single_rounding, tensor_bytes, ulp_count)

from qwen_merge import merge_shards, plan_merge
from qwen_merge.planning.ties import Tie, TieDecision
from qwen_merge.report import render

# adapter -> (stays tied, expected embedding, expected lm_head)
ROWS = {
    "t_emb": (False, "twin", "base"),
    "t_head": (False, "base", "twin"),
    "t_both": (False, "twin", "twin"),
    "t_both_ewt": (True, "twin", "embed"),
    "t_both_ewt_trained": (False, "formula", "formula"),
    "t_mts": (False, "base", "file:lm_head.weight"),
    "t_mts_ewt": (True, "file:model.embed_tokens.weight", "embed"),
    "t_tt": (True, "peft", "embed"),
}
CASES = [(name, base) for name in ROWS for base in ("tied", "tied_stored")]
# the same questions on the tied base with attention biases (bias="all" + embedding LoRA; a control)
EXTRA = {"t_emb_bias": (False, "twin", "base"), "t_q": (True, "base", "embed")}
ALL = {**ROWS, **EXTRA}
ALL_CASES = CASES + [(name, "tied_bias") for name in EXTRA]
STATS = "tied embeddings: merged elements that differ from the expectation"


def _expected(arts, name, base_name, what, which):
    """The expected merged tensor `which` (EMBED or HEAD) for an expectation that is not "twin"."""
    base = disk_tensors(arts.base(base_name))
    if what == "base":
        return base[EMBED]
    if what == "twin":
        return None  # caller picks the tensor from the twin state dict
    if what == "peft":
        return arts.reference(name, base_name)[EMBED]
    if what == "formula":  # single-rounded W + ΔW from the adapter file alone, each side with its own factors
        a = adapter_tensors(arts.adapter(name))
        if which == EMBED:
            W, delta = embedding_operands(arts.adapter(name))
        else:
            W = a["lm_head.base_layer.weight"]
            delta = (a["lm_head.lora_B.weight"].float() @ a["lm_head.lora_A.weight"].float()) \
                * fl32(scale_of(arts.adapter(name), "lm_head"))
        return single_rounding(W, delta)
    if what.startswith("file:"):
        return adapter_tensors(arts.adapter(name))[what[5:]]
    raise AssertionError(what)


def _check(case, got, expected, kind, operands=()):
    if kind == "embedding":  # our single rounding vs PEFT's W + rnd(ΔW): 1 ulp of the larger operand
        n, ratio = operand_ulps(got, expected, *operands)
        record(STATS, f"{case} (ulps of the larger operand)", n, got.numel(), ratio)
        assert ratio <= 1, f"{case}: {ratio:.2f} ulp (of the larger operand) from PEFT's embedding merge"
        return
    n, worst = ulp_count(got, expected)
    record(STATS, f"{case}", n, got.numel(), worst)
    if kind == "exact":
        assert n == 0, f"{case}: {n}/{got.numel()} elements differ (max {worst} ulp); expected bit-identical"
    else:  # linear
        assert worst <= 1 and n <= 1e-3 * got.numel() + 1, f"{case}: {n} elements differ, max {worst} ulp"


@pytest.mark.parametrize("name,base_name", ALL_CASES)
def test_tied_merge_tensors_and_config(arts, name, base_name):
    stays_tied, embed_from, head_from = ALL[name]
    res = arts.merged(name, base=base_name)
    base_dir = arts.base(base_name)
    base = disk_tensors(base_dir)
    ours = disk_tensors(res.out)
    head_in_base = HEAD in base
    assert head_in_base == (base_name == "tied_stored")

    cfg_in = json.loads((base_dir / "config.json").read_text())
    cfg_out = json.loads((res.out / "config.json").read_text())
    assert cfg_in["tie_word_embeddings"] is True
    assert cfg_out["tie_word_embeddings"] is stays_tied, f"tie_word_embeddings={cfg_out['tie_word_embeddings']}"
    assert {k: v for k, v in cfg_out.items() if k != "tie_word_embeddings"} == \
        {k: v for k, v in cfg_in.items() if k != "tie_word_embeddings"}, "config.json changed beyond the tie flag"
    check_index(res.out)

    # which tensors are stored
    if stays_tied:
        extra = set(ours) - set(base)
        assert not extra, f"tensors added to a checkpoint that stays tied: {sorted(extra)}"
        if not head_in_base:
            assert HEAD not in ours, "the tied matrix is stored twice"
        missing = set(base) - set(ours) - {HEAD}
        assert not missing, f"tensors dropped: {sorted(missing)}"
        if HEAD in ours:  # a stored copy must not go stale: loaders that ignore the flag read it
            assert tensor_bytes(ours[HEAD]) == tensor_bytes(ours[EMBED]), "stored lm_head differs from the embedding"
    else:
        assert set(ours) == set(base) | {HEAD}, sorted(set(ours) ^ (set(base) | {HEAD}))

    # the embedding
    twin = arts.twin(name, base_name) if "twin" in (embed_from, head_from) else None
    exp = twin[EMBED] if embed_from == "twin" else _expected(arts, name, base_name, embed_from, EMBED)
    kind = "embedding" if embed_from in ("twin", "formula") else "exact"
    operands = embedding_operands(arts.adapter(name)) if kind == "embedding" else ()
    _check(f"{name}@{base_name}:embed vs {embed_from}", ours[EMBED], exp, kind, operands)
    # lm_head
    if not stays_tied:
        if head_from == "twin":
            exp = twin[HEAD]
            kind = "linear"
        else:
            exp = _expected(arts, name, base_name, head_from, HEAD)
            kind = "linear" if head_from == "formula" else "exact"
        _check(f"{name}@{base_name}:lm_head vs {head_from}", ours[HEAD], exp, kind)
        assert not torch.equal(ours[HEAD], ours[EMBED]), "untied, yet both matrices are equal"

    # every other tensor: as PEFT merges it (PEFT is right away from the embeddings)
    ref = arts.reference(name, base_name)
    ops = expected_ops(arts.adapter(name))
    for tname, t in ours.items():
        if tname in (EMBED, HEAD):
            continue
        kind = ops.get(tname)
        if kind is None:
            assert tensor_bytes(t) == tensor_bytes(base[tname]), f"{tname}: untouched tensor changed"
        else:
            _check(f"{name}@{base_name}:{kind}", t, ref[tname], "linear" if kind == "linear" else "exact")


@pytest.mark.parametrize("name,base_name", ALL_CASES)
def test_tied_merge_behaves_like_unmerged_peft(arts, name, base_name):
    from transformers import AutoModelForCausalLM

    stays_tied = ALL[name][0]
    res = arts.merged(name, base=base_name)
    ids = input_ids()
    model = AutoModelForCausalLM.from_pretrained(res.out, dtype=torch.bfloat16)
    assert model.config.tie_word_embeddings is stays_tied
    shared = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shared is stays_tied
    if not stays_tied:  # the stored lm_head is what the model uses
        assert torch.equal(model.lm_head.weight, disk_tensors(res.out)[HEAD])
    ours = logits(model, ids)
    base_logits = logits(load_base_model(arts.base(base_name)), ids)
    unmerged = logits(peft_unmerged(arts.base(base_name), arts.adapter(name)), ids)
    check_like_unmerged(f"{name}@{base_name}", ours, unmerged, base_logits, min_effect=0.01)


@pytest.mark.parametrize("name", ["t_emb", "t_head", "t_both", "t_both_ewt"])
def test_peft_own_merge_fails_the_same_check(arts, tmp_path, name):
    """The reason for all this: PEFT's merge_and_unload(), saved and reloaded, does NOT behave like the
    un-merged model on these rows (lm_head changed, or the delta applied twice)."""
    from transformers import AutoModelForCausalLM

    base, adapter = arts.pair(name)
    ids = input_ids()
    unmerged_model = peft_unmerged(base, adapter)
    unmerged = logits(unmerged_model, ids)
    unmerged_model.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    peft_merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "peft_merged", dtype=torch.bfloat16), ids)
    base_logits = logits(load_base_model(base), ids)
    effect, diff = (unmerged - base_logits).abs(), (peft_merged - unmerged).abs()
    print(f"\n[{name}] PEFT merged: |merged-unmerged| mean {diff.mean() / effect.mean():.3f} of the effect")
    assert diff.mean() > 0.5 * effect.mean(), "PEFT's own merge passes the check; the table row is obsolete"


def test_ensure_weight_tying_applies_the_delta_once(arts):
    a = adapter_tensors(arts.adapter("t_both_ewt"))
    eA, eB = a["model.embed_tokens.lora_embedding_A"], a["model.embed_tokens.lora_embedding_B"]
    # the ensure_weight_tying signature: lm_head's factors are the embedding's, transposed
    assert torch.equal(a["lm_head.lora_A.weight"], eB.T) and torch.equal(a["lm_head.lora_B.weight"], eA.T)
    E0, delta = embedding_operands(arts.adapter("t_both_ewt"))
    assert torch.equal(E0, disk_tensors(arts.base("tied"))[EMBED])
    once = single_rounding(E0, delta)
    twice = (E0.float() + 2 * delta).to(E0.dtype)
    for base_name in ("tied", "tied_stored"):
        ours = disk_tensors(arts.merged("t_both_ewt", base=base_name).out)[EMBED]
        n, ratio = operand_ulps(ours, once, E0, delta)
        assert ratio <= 1 and n <= 1e-3 * ours.numel(), f"{base_name}: {n} elements differ from rnd(E0 + Δ)"
        assert ulp_count(ours, twice)[0] > 0.5 * ours.numel()
    # PEFT's own merge is E0 + 2Δ (the spec's table row), so it cannot serve as the reference here
    peft = arts.reference("t_both_ewt")[EMBED]
    assert operand_ulps(peft, twice, E0, 2 * delta)[1] <= 2 and ulp_count(peft, once)[0] > 0.5 * peft.numel()


def test_ensure_weight_tying_after_real_training(arts):
    """Guard for the t_both_ewt_trained row: after real training the file's lm_head factors are no longer
    the embedding's transposes, and PEFT's un-merged model (loaded from the file) uses lm_head's own
    factors. So 'apply the embedding's delta once and keep tied' would be wrong for this adapter: the
    tying signature is the values, not the shapes (spec §7)."""
    a = adapter_tensors(arts.adapter("t_both_ewt_trained"))
    cfg = json.loads((arts.adapter("t_both_ewt_trained") / "adapter_config.json").read_text())
    assert cfg["ensure_weight_tying"] is True
    eA, eB = a["model.embed_tokens.lora_embedding_A"], a["model.embed_tokens.lora_embedding_B"]
    hA, hB = a["lm_head.lora_A.weight"], a["lm_head.lora_B.weight"]
    assert hA.shape == eB.T.shape and hB.shape == eA.T.shape
    assert not torch.equal(hA, eB.T) and not torch.equal(hB, eA.T)
    model = peft_unmerged(arts.base("tied"), arts.adapter("t_both_ewt_trained"))
    head = model.base_model.model.lm_head
    assert torch.equal(head.lora_A["default"].weight, hA) and torch.equal(head.lora_B["default"].weight, hB)


def test_tied_rounding_peft(arts):
    """rounding='peft' reproduces PEFT's double-rounded embedding bit for bit, also when untying."""
    for base_name in ("tied", "tied_stored"):
        ours = disk_tensors(arts.merged("t_emb", base=base_name, rounding="peft").out)
        twin = arts.twin("t_emb", base_name)
        assert ulp_count(ours[EMBED], twin[EMBED])[0] == 0
        assert tensor_bytes(ours[HEAD]) == tensor_bytes(disk_tensors(arts.base(base_name))[EMBED])


@pytest.mark.parametrize("name,base_name", ALL_CASES)
def test_plan_says_what_it_decided_for_the_tie(arts, name, base_name):
    stays_tied = ALL[name][0]
    plan = plan_merge(arts.base(base_name), arts.adapter(name))
    if name == "t_q":  # nothing touches the embeddings: a note is optional, but it must not untie
        assert plan.tie is None or plan.tie.tie is Tie.KEPT
        return
    assert isinstance(plan.tie, TieDecision), plan.tie
    text = str(plan.tie).lower()
    if stays_tied:
        assert "kept tied" in text, plan.tie
    else:
        assert "untied" in text and "kept tied" not in text, plan.tie
    assert str(plan.tie) in render(plan), "render() does not show the tie decision"


def test_untying_updates_nested_text_config(arts, tmp_path):
    base = copy_tree(arts.base("tied"), tmp_path / "base")
    edit_json(base / "config.json", {"text_config": {"model_type": "qwen3", "tie_word_embeddings": True,
                                                     "vocab_size": 256}})
    merge_shards(base, arts.adapter("t_emb"), tmp_path / "out", progress=False)
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["tie_word_embeddings"] is False
    assert out_cfg["text_config"]["tie_word_embeddings"] is False
    assert out_cfg["text_config"]["vocab_size"] == 256
    assert HEAD in checkpoint_tensors(tmp_path / "out")
