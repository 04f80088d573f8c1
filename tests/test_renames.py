"""Issue 3, item 8: adapter (in-model) names vs on-disk base names.

An adapter trained on a vision-language wrapper says ``model.language_model.*`` where a text-only
checkpoint says ``model.*``; a VLM checkpoint on disk says ``model.language_model.*`` where a text-only
adapter says ``model.*``. Both are real adapters / bases rewritten on the byte level
(builders, table 2: "vlm_emb", "vlm_mts", "untied_vlm"); the merge must be byte-identical to the
plain pair (renamed accordingly) and the plan must show the rename. Other prefixes need an explicit
key_map / --map; a situation where two renames fit is refused.
"""

from __future__ import annotations

import pytest
from builders import EMBED, checkpoint_tensors, rewrite_adapter, run_cli, tensor_bytes, tree_hash

from qwen_merge import MismatchError, iter_merged, merge_shards, plan_merge
from qwen_merge.report import render

FORWARD = ("model.language_model.", "model.")
REVERSE = ("model.", "model.language_model.")


def _payloads(folder, rename=None):
    """name -> (shard, dtype, shape, bytes), names optionally mapped through a prefix rename."""
    out = {}
    for name, v in checkpoint_tensors(folder).items():
        if rename and name.startswith(rename[0]):
            name = rename[1] + name[len(rename[0]):]
        out[name] = v
    return out


@pytest.mark.parametrize("vlm,plain", [("vlm_emb", "emb"), ("vlm_mts", "mts_head")])
def test_vlm_adapter_on_text_base(arts, vlm, plain):
    plan = plan_merge(arts.base("untied"), arts.adapter(vlm))
    assert tuple(plan.renames) == (FORWARD,), plan.renames
    text = render(plan)
    assert "model.language_model." in text, "render() does not show the rename"
    ours = checkpoint_tensors(arts.merged(vlm).out)
    expected = checkpoint_tensors(arts.merged(plain).out)
    assert list(ours) == list(expected)
    for name in ours:
        assert ours[name] == expected[name], f"{name} differs from the merge of the un-renamed adapter"


@pytest.mark.parametrize("plain", ["emb", "mts_head"])
def test_text_adapter_on_vlm_base(arts, plain):
    plan = plan_merge(arts.base("untied_vlm"), arts.adapter(plain))
    assert tuple(plan.renames) == (REVERSE,), plan.renames
    assert "model.language_model." in render(plan)
    ours = _payloads(arts.merged(plain, base="untied_vlm").out, rename=("model.language_model.", "model."))
    expected = checkpoint_tensors(arts.merged(plain).out)
    assert sorted(ours) == sorted(expected)
    assert "lm_head.weight" in ours  # not under model.: must not be renamed
    for name in ours:
        assert ours[name][1:] == expected[name][1:], f"{name} differs from the merge on the text-only base"


def test_matching_names_need_no_rename(arts):
    assert tuple(plan_merge(arts.base("untied"), arts.adapter("emb")).renames) == ()
    assert tuple(plan_merge(arts.base("untied_vlm"), arts.adapter("vlm_emb")).renames) == ()


def test_explicit_key_map(arts):
    key_map = {"backbone.": "model."}
    plan = plan_merge(arts.base("untied"), arts.adapter("custom_emb"), key_map=key_map)
    assert tuple(plan.renames) == (("backbone.", "model."),), plan.renames
    assert "backbone." in render(plan)
    ours = checkpoint_tensors(arts.merged("custom_emb", key_map=key_map).out)
    expected = checkpoint_tensors(arts.merged("emb").out)
    assert ours == expected
    streamed = {name: tensor_bytes(t) for name, t in iter_merged(arts.base("untied"), arts.adapter("custom_emb"),
                                                                  key_map=key_map)}
    assert streamed == {name: v[3] for name, v in expected.items()}


def test_unknown_prefix_without_key_map_is_refused(arts, tmp_path):
    base, adapter = arts.base("untied"), arts.adapter("custom_emb")
    before = (tree_hash(base), tree_hash(adapter))
    with pytest.raises(MismatchError) as info:
        merge_shards(base, adapter, tmp_path / "out", progress=False)
    msg = str(info.value)
    assert "\n" not in msg.strip() and "backbone." in msg, msg
    assert "key_map" in msg or "--map" in msg, f"no hint at key_map / --map: {msg}"
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert (tree_hash(base), tree_hash(adapter)) == before


def test_cli_map(arts, tmp_path):
    base, adapter = arts.base("untied"), arts.adapter("custom_emb")
    proc = run_cli("merge", base, adapter, tmp_path / "out", "--map", "backbone.=model.", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert checkpoint_tensors(tmp_path / "out") == checkpoint_tensors(arts.merged("emb").out)
    proc = run_cli("merge", base, adapter, tmp_path / "out2", "--quiet", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out2").exists()


def test_ambiguous_rename_is_refused(arts, tmp_path):
    """The base holds model.* and model.language_model.language_model.*: the VLM adapter's
    model.language_model.* lands under model.language_model. -> model. AND under model. ->
    model.language_model. Guessing would merge into the wrong copy."""
    base, adapter = arts.base("untied_ambiguous"), arts.adapter("vlm_emb")
    before = (tree_hash(base), tree_hash(adapter))
    for call in (lambda: plan_merge(base, adapter),
                 lambda: merge_shards(base, adapter, tmp_path / "out", progress=False)):
        with pytest.raises(MismatchError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg.strip(), msg
        assert "model.language_model." in msg, msg
        assert "key_map" in msg or "--map" in msg, f"no hint at key_map / --map: {msg}"
    assert list(tmp_path.iterdir()) == []
    assert (tree_hash(base), tree_hash(adapter)) == before


def test_key_map_resolves_the_ambiguity(arts, tmp_path):
    """With key_map the adapter lands on the model.* copy. (The config is switched to the default init:
    with init_lora_weights=false PEFT would put random deltas on the second copy's modules, which the
    config's target_modules also match, and that is refused on its own; see test_refusals.)"""
    def default_init(cfg: dict) -> None:
        assert cfg["init_lora_weights"] is False
        cfg["init_lora_weights"] = True

    adapter = rewrite_adapter(arts.adapter("vlm_emb"), tmp_path / "adapter", config=default_init)
    key_map = {"model.language_model.": "model."}
    report = merge_shards(arts.base("untied_ambiguous"), adapter, tmp_path / "out", progress=False, key_map=key_map)
    assert tuple(report.plan.renames) == (FORWARD,)
    ours = checkpoint_tensors(tmp_path / "out")
    base = checkpoint_tensors(arts.base("untied_ambiguous"))
    expected = checkpoint_tensors(arts.merged("emb").out)
    assert sorted(ours) == sorted(base)
    for name, v in ours.items():
        if name.startswith("model.language_model.language_model."):
            assert v[3] == base[name][3], f"{name}: the other copy was changed"
        else:
            assert v[1:] == expected[name][1:], f"{name} differs from the plain merge"
    assert ours[EMBED][3] != base[EMBED][3]
