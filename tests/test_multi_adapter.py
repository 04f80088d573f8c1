"""Several adapters merged in one pass: W' = round_once(W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ).

References, all from the real libraries (builders.py builds real PEFT adapters on tiny Qwen3 models):
* the arbiter: PEFT's own per-adapter deltas (`get_delta_weight`) of every adapter loaded into one PeftModel in
  float64, weighted and summed in float64 (`Float64Sum`); the merge must be that sum rounded once, up to a band
  derived from the arithmetic (fp32 for bf16 outputs; the exact float64 product for fp32 outputs);
* PEFT's `add_weighted_adapter(combination_type="cat")` then `merge_and_unload()`: the same sum with PEFT's extra
  roundings (wᵢ·sᵢ folded into Aᵢ in two fp32 roundings); and with an rsLoRA adapter listed first, PEFT scales
  the whole sum by that adapter's rsLoRA rule (shown, not followed);
* logits of the merged checkpoint against PEFT's unmerged "cat" adapter.
Refusals are one line each; plan, manifest, verify, resume, the CLI and Hub repo ids cover several adapters.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from builders import (DTYPES, TINY, build_fused_adapter, build_moe_base, build_peft_adapter, disk_tensors, edit_json,
                      edit_tensors, fuse_checkpoint, fused_reference_deltas, in_process_cli, in_process_error_line,
                      input_ids, load_base_model, logits, rewrite_adapter, tree_hash)
from reference import U32, U_WIDE, check_fp32, near_boundary

from qwen_merge import AdapterError, OptionError, merge_shards, plan_merge, verify_merge
from qwen_merge.report import render, to_dict

WEIGHTS = (0.7, -0.4, 1.5)  # a negative weight subtracts that adapter's task
# the third adapter: another rank, alpha and targets (lm_head only here), and per-module patterns
EXTRA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], rank_pattern={"v_proj": 2},
             alpha_pattern={"q_proj": 3})
FP32_RSLORA = dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"])
PREFIX = "base_model.model."


class Sums(NamedTuple):
    """Float64 sums by tensor name, the magnitudes of their terms, and the summed rank (`check_narrow`)."""

    values: dict[str, torch.Tensor]
    terms: dict[str, torch.Tensor]
    ranks: dict[str, int]


class Float64Sum:
    """W + Σ wᵢ·ΔWᵢ per adapted tensor, each ΔWᵢ PEFT's `get_delta_weight` in float64 (its scale, patterns and
    rsLoRA applied by PEFT), and the magnitudes |W| + Σ |wᵢ·sᵢ|·|Bᵢ|@|Aᵢ| that bound the fp32 arithmetic."""

    def __init__(self, base: Path, adapters: list[Path], weights: tuple[float, ...]) -> None:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        model = load_base_model(base, dtype=torch.float32).to(torch.float64)
        peft = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
        for k, adapter in enumerate(adapters[1:], 1):
            peft.load_adapter(adapter, adapter_name=f"a{k}")
        self.values, self.terms, self.ranks = {}, {}, {}
        for name, module in peft.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            w = module.get_base_layer().weight.detach()
            value, terms, rank = w.clone(), w.abs(), 0
            for k, weight in enumerate(weights):
                if f"a{k}" in module.lora_A:
                    a, b = module.lora_A[f"a{k}"].weight.detach(), module.lora_B[f"a{k}"].weight.detach()
                    value += weight * module.get_delta_weight(f"a{k}")
                    terms = terms + abs(weight * module.scaling[f"a{k}"]) * (b.abs() @ a.abs())
                    rank += a.shape[0]
            key = name[len(PREFIX):] + ".weight"
            self.values[key], self.terms[key], self.ranks[key] = value, terms, rank


def check_narrow(ours: torch.Tensor, exact: Float64Sum | Sums, name: str) -> int:
    """A bf16/fp16 output: the float64 sum rounded once, except where a rounding boundary lies within the fp32
    band (R + 4)·2^-24 of the terms (fp32 fold of wᵢ·sᵢ, the GEMM over the summed rank R, the add), where it may
    be either neighbour; never outside the rounding of that band. Returns the count of such elements."""
    ref, width = exact.values[name], (exact.ranks[name] + 4) * U32 * exact.terms[name]
    boundary = near_boundary(ref, width, ours.dtype)
    differ = ours != ref.to(ours.dtype)
    assert not (differ & ~boundary).any(), f"{name}: {int((differ & ~boundary).sum())} off away from a boundary"
    wide = width + ref.abs() * 2.0 ** -22
    assert not ((ours < (ref - wide).to(ours.dtype)) | (ours > (ref + wide).to(ours.dtype))).any(), name
    return int(boundary.sum())


def peft_cat(base: Path, adapters: list[Path], weights: tuple[float, ...], dtype: torch.dtype):
    """PEFT's weighted "cat" adapter on `base` (unmerged), active."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(load_base_model(base, dtype=dtype), adapters[0], adapter_name="a0")
    for k, adapter in enumerate(adapters[1:], 1):
        peft.load_adapter(adapter, adapter_name=f"a{k}")
    names = [f"a{k}" for k in range(len(adapters))]
    peft.add_weighted_adapter(names, list(weights), "cat", combination_type="cat")
    peft.set_adapter("cat")
    return peft


@pytest.fixture(scope="session")
def multi(zoo, tmp_path_factory):
    """bf16: the zoo's basic (r=8, alpha 16, all linear), rslora (r=8, alpha 13, rsLoRA) and a third one of
    another rank with patterns and lm_head; fp32: the zoo's fp32 adapter and an rsLoRA one of rank 4. Each set
    merged once with WEIGHTS, and the float64 sums. Read-only."""
    root = tmp_path_factory.mktemp("multi")
    base = zoo.base("qwen_bf16")
    extra = build_peft_adapter(base, root / "extra", EXTRA, seed=31, dtype=torch.bfloat16)
    adapters = [zoo.adapter("basic"), extra, zoo.adapter("rslora")]
    base32 = zoo.base("qwen_fp32")
    rslora32 = build_peft_adapter(base32, root / "rslora32", FP32_RSLORA, seed=32, dtype=torch.float32)
    adapters32 = [rslora32, zoo.adapter("basic_fp32_base")]
    out, out32 = root / "out", root / "out32"
    report = merge_shards(base, adapters, out, weights=WEIGHTS, progress=False)
    merge_shards(base32, adapters32, out32, weights=WEIGHTS[:2], progress=False)
    return dict(root=root, base=base, adapters=adapters, out=out, report=report, base32=base32,
                adapters32=adapters32, out32=out32, exact=Float64Sum(base, adapters, WEIGHTS),
                exact32=Float64Sum(base32, adapters32, WEIGHTS[:2]))


@pytest.mark.slow
def test_bf16_is_the_float64_sum_rounded_once_and_untouched_tensors_are_copies(multi):
    ours, base = disk_tensors(multi["out"]), disk_tensors(multi["base"])
    exact = multi["exact"]
    assert set(exact.values) == {op.name for op in multi["report"].plan.merges}
    assert "lm_head.weight" in exact.values  # only the third adapter targets it
    near = sum(check_narrow(ours[name], exact, name) for name in exact.values)
    total = sum(v.numel() for v in exact.values.values())
    assert near < 0.05 * total  # the band is narrow: few elements have a boundary inside it
    for name, tensor in base.items():
        if name not in exact.values:
            assert torch.equal(ours[name], tensor), name


@pytest.mark.slow
def test_fp32_is_the_float64_sum_rounded_once_and_does_not_depend_on_the_order(multi, tmp_path):
    ours, exact = disk_tensors(multi["out32"]), multi["exact32"]
    for name, ref in exact.values.items():
        check_fp32(ours[name], ref, U_WIDE * exact.terms[name])
    swapped = tmp_path / "swapped"  # an exact product: the same bytes whatever the adapters' order
    merge_shards(multi["base32"], multi["adapters32"][::-1], swapped, weights=WEIGHTS[:2][::-1], progress=False)
    a, b = tree_hash(swapped), tree_hash(multi["out32"])
    a.pop("qwen_merge.json"), b.pop("qwen_merge.json")
    assert a == b


@pytest.mark.slow
def test_peft_cat_merge_differs_only_by_its_extra_roundings(multi):
    """On a bf16 model PEFT's cat adapter is itself bf16: wᵢ·sᵢ·Aᵢ and Bᵢ are rounded to bf16 (2^-9 each) before
    the fp32 GEMM, and the delta again before the add, so its merge lies in a band of 3·2^-9 of the terms around
    the float64 sum (2^-7 allowed), and ours (rounded once) is closer on average. On an fp32 model its factors
    are fp32, and ours is nowhere further from the float64 sum than its merge (beyond the float64 band)."""
    exact = multi["exact"]
    peft = peft_cat(multi["base"], multi["adapters"], WEIGHTS, torch.bfloat16)
    merged = {k: v.detach() for k, v in peft.merge_and_unload(adapter_names=["cat"]).state_dict().items()}
    ours = disk_tensors(multi["out"])
    err_ours = err_peft = differ = 0
    for name, ref in exact.values.items():
        width = (2.0 ** -7 + (exact.ranks[name] + 8) * U32) * exact.terms[name] + ref.abs() * 2.0 ** -22
        theirs = merged[name]
        assert not ((theirs < (ref - width).to(theirs.dtype)) | (theirs > (ref + width).to(theirs.dtype))).any(), name
        differ += int((ours[name] != theirs).sum())
        err_ours += float((ours[name].double() - ref).abs().sum())
        err_peft += float((theirs.double() - ref).abs().sum())
    assert err_ours < err_peft
    print(f"\n[multi] bf16: {differ} elements differ from PEFT's cat merge; summed |error| vs the float64 sum: "
          f"ours {err_ours:.4g}, PEFT {err_peft:.4g}")
    # fp32: listed with the plain adapter first (PEFT's cat takes rsLoRA from the first adapter)
    exact32, ours32 = multi["exact32"], disk_tensors(multi["out32"])
    peft32 = peft_cat(multi["base32"], multi["adapters32"][::-1], WEIGHTS[:2][::-1], torch.float32)
    merged32 = {k: v.detach() for k, v in peft32.merge_and_unload(adapter_names=["cat"]).state_dict().items()}
    differ = sum(check_fp32(ours32[name], ref, U_WIDE * exact32.terms[name], peft=merged32[name])
                 for name, ref in exact32.values.items())
    print(f"[multi] fp32: {differ} elements of PEFT's cat merge differ from the float64 sum rounded once")


@pytest.mark.slow
def test_logits_match_peft_unmerged_cat_adapter(multi):
    from transformers import AutoModelForCausalLM

    ids = input_ids()
    peft = peft_cat(multi["base"], multi["adapters"], WEIGHTS, torch.float32)
    unmerged = logits(peft, ids)
    with peft.disable_adapter():
        plain = logits(peft, ids)
    ours = logits(AutoModelForCausalLM.from_pretrained(multi["out"], dtype=torch.float32), ids)
    effect, diff = (unmerged - plain).abs(), (ours - unmerged).abs()
    assert effect.mean() > 1e-3
    # the merged weights are bf16: the difference is their rounding, a small share of the adapters' effect
    assert diff.mean() <= 0.05 * effect.mean() and diff.max() <= 0.25 * effect.max(), (diff.mean(), effect.mean())


@pytest.mark.slow
def test_peft_cat_with_rslora_first_scales_every_adapter_by_its_rule(multi):
    """PEFT's cat adapter takes use_rslora from its first adapter: its scale is then sqrt(Σr) instead of 1, so
    every delta is off by that factor; ours sums each adapter at its own scale, in any order."""
    names = ["model.layers.0.self_attn.q_proj.weight"]
    rslora, basic = multi["adapters"][2], multi["adapters"][0]
    peft = peft_cat(multi["base"], [rslora, basic], (0.5, 0.5), torch.float32)
    module = peft.base_model.model.model.layers[0].self_attn.q_proj
    assert module.scaling["cat"] == pytest.approx(math.sqrt(16))
    exact = Float64Sum(multi["base"], [basic, rslora], (0.5, 0.5))
    theirs = module.get_delta_weight("cat").double()
    want = exact.values[names[0]] - module.get_base_layer().weight.double()
    assert (theirs - want).abs().max() > 0.5 * want.abs().max()  # PEFT's delta is not the sum
    ours = {name: t for name, t in _iter(multi["base"], [rslora, basic], (0.5, 0.5), names)}
    check_narrow(ours[names[0]], exact, names[0])


def _iter(base, adapters, weights, names):
    from qwen_merge import iter_merged

    return ((n, t.clone()) for n, t in iter_merged(base, adapters, weights=weights) if n in names)


@pytest.mark.slow
def test_a_single_adapter_with_weight_one_is_the_plain_merge(zoo, tmp_path):
    base, adapter = zoo.pair("basic")
    merge_shards(base, adapter, tmp_path / "plain", progress=False)
    merge_shards(base, [adapter], tmp_path / "listed", weights=[1.0], progress=False)
    assert tree_hash(tmp_path / "plain") == tree_hash(tmp_path / "listed")
    manifest = json.loads((tmp_path / "plain" / "qwen_merge.json").read_text())
    assert "adapters" not in manifest and "weight" not in manifest["adapter"]


@pytest.mark.slow
def test_plan_lists_the_adapters_of_each_tensor(multi):
    plan = plan_merge(multi["base"], multi["adapters"], weights=WEIGHTS)
    text = render(plan)
    assert "adapter 2: " in text and "weight -0.4" in text
    line = next(x for x in text.splitlines() if "model.layers.0.self_attn.q_proj.weight" in x)
    assert "adapters 1 (r=8 w·s=1.4), 2 (r=4 w·s=-0.3), 3 (r=8" in line
    head = next(x for x in text.splitlines() if " lm_head.weight" in x)
    assert "adapters 2 (r=4" in head and "adapters 1" not in head
    assert "merged:  29 tensors (20 by adapters 1, 3; 8 by adapters 1, 2, 3; 1 by adapter 2)" in text
    doc = to_dict(plan)
    assert [a["weight"] for a in doc["adapters"]] == list(WEIGHTS)
    tensor = next(t for t in doc["tensors"] if t["name"] == "model.layers.0.self_attn.v_proj.weight")
    assert [(a["adapter"], a["rank"]) for a in tensor["delta"]["adapters"]] == [(1, 8), (2, 2), (3, 8)]
    assert tensor["delta"]["rank"] == 18


@pytest.mark.slow
def test_manifest_verify_and_resume_cover_every_adapter_and_weight(multi, tmp_path):
    out = multi["out"]
    manifest = json.loads((out / "qwen_merge.json").read_text())
    assert [a["weight"] for a in manifest["adapters"]] == list(WEIGHTS)
    assert manifest["adapter"] == {k: v for k, v in manifest["adapters"][0].items() if k != "weight"}
    assert len({a["weights_sha256"] for a in manifest["adapters"]}) == 3
    assert verify_merge(out, multi["base"], multi["adapters"]).ok  # the weights the manifest records
    wrong = verify_merge(out, multi["base"], multi["adapters"], weights=(0.7, -0.4, 1.0))
    assert not wrong.ok and any("lm_head" not in p and "differs" in p for p in wrong.problems)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = merge_shards(multi["base"], multi["adapters"], copy, weights=WEIGHTS, resume=True, progress=False)
    assert again.already_complete
    with pytest.raises(Exception, match="weights"):
        merge_shards(multi["base"], multi["adapters"], copy, weights=(1, 1, 1), resume=True, progress=False)


@pytest.mark.slow
def test_cli_merge_plan_and_verify_several_adapters(multi, tmp_path, capsys):
    base, adapters = multi["base"], multi["adapters"]
    out = tmp_path / "out"
    proc = in_process_cli(capsys, "merge", base, *adapters, out, "--weights=0.7,-0.4,1.5", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert tree_hash(out) == tree_hash(multi["out"])
    planned = in_process_cli(capsys, "plan", base, *adapters, "--weights=0.7,-0.4,1.5")
    assert planned.returncode == 0 and "adapter 3: " in planned.stdout
    checked = in_process_cli(capsys, "verify", out, "--base", base, *(x for a in adapters for x in ("--adapter", a)))
    assert checked.returncode == 0, checked.stdout
    line = in_process_error_line(in_process_cli(capsys, "merge", base, *adapters, tmp_path / "x", "--weights", "1,2"))
    assert "--weights" in line and "2 weights for 3 adapters" in line
    line = in_process_error_line(in_process_cli(capsys, "merge", base, *adapters, tmp_path / "x", "--weights=1,inf,1"))
    assert "not a finite number" in line
    line = in_process_error_line(in_process_cli(capsys, "merge", base, *adapters, tmp_path / "x", "--weights=1,a,1"))
    assert "expected numbers separated by commas" in line


@pytest.mark.slow
def test_refusals_are_one_line_each(zoo, multi, tmp_path, capsys):
    base, basic = zoo.pair("basic")
    dora = zoo.adapter("dora")
    line = in_process_error_line(in_process_cli(capsys, "plan", base, basic, dora))
    assert "DoRA" in line and "cannot be combined" in line
    line = in_process_error_line(in_process_cli(capsys, "plan", base, dora, "--weights", "0.5"))
    assert "DoRA" in line and "cannot be weighted" in line
    saved = []
    for k in range(2):  # both replace lm_head (a modules_to_save copy)
        folder = shutil.copytree(basic, tmp_path / f"saved{k}")
        edit_tensors(folder / "adapter_model.safetensors", lambda t, k=k: t.__setitem__(
            PREFIX + "lm_head.weight", torch.full((256, 64), 0.01 * (k + 1), dtype=torch.bfloat16)))
        edit_json(folder / "adapter_config.json", {"modules_to_save": ["lm_head"]})
        saved.append(folder)
    assert plan_merge(base, saved[:1], weights=[0.5]).merges  # one replacement alone: kept as it is
    line = in_process_error_line(in_process_cli(capsys, "plan", base, *saved))
    assert "replaces 'lm_head.weight'" in line and "changes it too" in line
    line = in_process_error_line(in_process_cli(capsys, "plan", base, saved[0], multi["adapters"][1]))
    assert "lm_head.weight" in line
    extra = multi["adapters"][1]  # LoRA on lm_head, and the base lm_head saved beside it as PEFT does
    twice = plan_merge(base, [extra, extra], weights=[0.5, 0.5])
    head = next(op for op in twice.merges if op.name == "lm_head.weight")
    assert not head.source.in_adapter and len(head.pair.terms) == 2  # the saved copy is the base's: a sum
    named = []
    for k, model in enumerate(("Qwen/Qwen3-4B", "Qwen/Qwen3-8B")):
        folder = shutil.copytree(basic, tmp_path / f"named{k}")
        edit_json(folder / "adapter_config.json", {"base_model_name_or_path": model})
        named.append(folder)
    line = in_process_error_line(in_process_cli(capsys, "plan", base, *named))
    assert "Qwen/Qwen3-4B" in line and "Qwen/Qwen3-8B" in line and "different models" in line
    edit_json(named[1] / "adapter_config.json", {"base_model_name_or_path": "/data/checkpoints/base"})
    plan = plan_merge(base, named)  # unsure (a local path on another machine): a note, not a refusal
    assert any("different base models" in note for note in plan.notes)
    with pytest.raises(OptionError, match="2 weights for 1 adapters"):
        plan_merge(base, [basic], weights=[1, 2])
    with pytest.raises(OptionError, match="not a finite number"):
        plan_merge(base, [basic, basic], weights=[1, float("nan")])
    with pytest.raises(AdapterError):
        merge_shards(base, [basic, dora], tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_two_hub_adapters(multi, tmp_path, monkeypatch):
    from hubserver import FakeHub, use_hub

    with FakeHub() as server:
        server.add_repo("org/base", multi["base"])
        for k, adapter in enumerate(multi["adapters"][:2]):
            server.add_repo(f"org/lora{k}", adapter)
        use_hub(monkeypatch, server, tmp_path / "hf-cache", home=tmp_path / "hf-home", fast_retries=True)
        out = tmp_path / "out"
        merge_shards("org/base", ["org/lora0", "org/lora1"], out, weights=WEIGHTS[:2], progress=False)
        local = tmp_path / "local"
        merge_shards(multi["base"], multi["adapters"][:2], local, weights=WEIGHTS[:2], progress=False)
        a, b = tree_hash(out), tree_hash(local)
        a.pop("qwen_merge.json"), b.pop("qwen_merge.json")
        assert a == b
        manifest = json.loads((out / "qwen_merge.json").read_text())
        assert [a["hub"]["repo"] for a in manifest["adapters"]] == ["org/lora0", "org/lora1"]
        assert verify_merge(out, "org/base", ["org/lora0", "org/lora1"]).ok


@pytest.mark.slow
def test_fused_expert_adapters_add_up(tmp_path):
    """target_parameters LoRA (fused experts; PEFT's add_weighted_adapter refuses these) of two ranks and other
    targets, on a per-expert base and on transposed fused 3-D experts: the float64 sum rounded once."""
    h, i, e = TINY["hidden"], TINY["moe_intermediate"], TINY["experts"]
    base = build_moe_base(tmp_path / "base", seed=0)
    adapters = [build_fused_adapter(base, tmp_path / "a1", seed=41, r=4, alpha=8),
                build_fused_adapter(base, tmp_path / "a2", seed=42, r=3, alpha=5,
                                    target_parameters=("mlp.experts.down_proj",), target_modules=("q_proj", "k_proj"))]
    weights = (0.8, -1.25)
    w = disk_tensors(base)
    values = {n: t.double() for n, t in w.items()}
    terms = {n: t.double().abs() for n, t in w.items()}
    ranks, touched = dict.fromkeys(w, 0), set()
    for adapter, weight, rank in zip(adapters, weights, (4, 3)):
        deltas = fused_reference_deltas(adapter, hidden=h, moe_intermediate=i, experts=e, rank=rank)
        sizes = fused_reference_deltas(rewrite_adapter(adapter, tmp_path / (adapter.name + "-abs"),
                                                       transform=lambda k, t: t.abs()),
                                       hidden=h, moe_intermediate=i, experts=e, rank=rank)
        for name, delta in deltas.items():
            values[name] = values[name] + weight * delta
            terms[name] = terms[name] + abs(weight) * sizes[name]
            ranks[name] += rank
            touched.add(name)
    exact = Sums(*({n: d[n] for n in touched} for d in (values, terms, ranks)))
    ours = disk_tensors(merge_shards(base, adapters, tmp_path / "out", weights=weights, progress=False).output)
    assert any(".experts.3.gate_proj" in n for n in touched) and any(".router" in n or ".gate.weight" in n
                                                                     for n in touched)
    for name in touched:
        check_narrow(ours[name], exact, name)
    fused = fuse_checkpoint(base, tmp_path / "fused", transposed=True)
    ours3 = disk_tensors(merge_shards(fused, adapters, tmp_path / "out3", weights=weights, progress=False).output)
    for layer in range(TINY["layers"]):
        module = f"model.layers.{layer}.mlp.experts"
        parts = [[f"{module}.{k}.gate_proj.weight", f"{module}.{k}.up_proj.weight"] for k in range(e)]
        stacked = Sums(*({module: torch.stack([torch.cat([d[a], d[b]]) for a, b in parts]).transpose(1, 2)}
                         for d in (values, terms)), {module: 4})
        check_narrow(ours3[f"{module}.gate_up_proj"], stacked, module)


def test_weights_are_checked_before_anything_is_read(tmp_path):
    with pytest.raises(OptionError, match="one weight per adapter"):
        plan_merge(tmp_path / "base", [tmp_path / "a", tmp_path / "b"], weights=[1.0])
    with pytest.raises(OptionError, match="not a finite number"):
        plan_merge(tmp_path / "base", [tmp_path / "a", tmp_path / "b"], weights=[1.0, float("inf")])
    with pytest.raises(OptionError, match="no adapter"):
        plan_merge(tmp_path / "base", [])
    assert DTYPES  # builders' tables are importable in the fast tier


def test_the_adapters_record_reads_back_and_a_bad_field_is_named(tmp_path):
    import dataclasses

    from qwen_merge import FormatError
    from qwen_merge.planning.manifest import AdapterRecord, BaseRecord, MergeIdentity, differences

    first = AdapterRecord("a" * 64, 10, "c" * 64, None)
    listed = (dataclasses.replace(first, weight=0.5), AdapterRecord("b" * 64, 20, "d" * 64, None, -1.0))
    ident = MergeIdentity("qwen-merge", "0", BaseRecord({"model.safetensors": 1}, (), None), first, {}, None, listed)
    doc = ident.to_json()
    assert "weight" not in doc["adapter"] and [a["weight"] for a in doc["adapters"]] == [0.5, -1.0]
    assert MergeIdentity.from_json(doc, tmp_path / "qwen_merge.json") == ident
    changed = dataclasses.replace(ident, adapters=(listed[0], dataclasses.replace(listed[1], weight=1.0)))
    assert differences(ident, changed) == ["the adapters or their weights changed (2 adapters, weights 0.5, -1 -> "
                                           "2 adapters, weights 0.5, 1)"]
    single = dataclasses.replace(ident, adapters=())
    assert "adapters" not in single.to_json()
    with pytest.raises(FormatError, match=r"adapters\[1\]\.weight must be a number"):
        MergeIdentity.from_json({**doc, "adapters": [doc["adapters"][0], {"weight": "x"}]}, tmp_path / "m.json")


@pytest.mark.slow
def test_several_adapters_on_a_4bit_base_merge_onto_its_dequantized_weights(tmp_path):
    """A QLoRA base (bitsandbytes NF4, double quantization): the sum merges onto bitsandbytes' own dequantized
    weights, as onto a plain checkpoint of them."""
    from bnb_models import SPECS, build_adapter, build_bnb4_base, write_dequantized

    spec = SPECS["nf4_double"]
    base, plain = build_bnb4_base(spec, tmp_path)
    adapters = [build_adapter(spec, plain, tmp_path / "a1", seed=1),
                build_peft_adapter(plain, tmp_path / "a2", dict(r=2, lora_alpha=5, use_rslora=True,
                                                                target_modules=["q_proj", "down_proj"]), seed=2)]
    dequantized = write_dequantized(base, tmp_path / "dequantized", spec.compute)
    ours = disk_tensors(merge_shards(base, adapters, tmp_path / "out", weights=(0.6, -1.0), progress=False).output)
    plain_merge = merge_shards(dequantized, adapters, tmp_path / "plain", weights=(0.6, -1.0), progress=False)
    theirs = disk_tensors(plain_merge.output)
    assert set(ours) == set(theirs) and plain_merge.merged > 0
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
