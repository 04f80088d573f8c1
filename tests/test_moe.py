"""Mixture-of-experts adapters on tiny Qwen3-MoE checkpoints (issue 4; peft-semantics.md §1.5, §3.5, E15).

Model: hidden 32, moe_intermediate 16, 2 layers, 6 experts, vocab 128 (builders.TINY). Ranks 4 and 3
are deliberately different from the expert count (E ≠ r is the case others got wrong).

Fused ``target_parameters`` LoRA (real PEFT 0.21 on transformers 5, with the router ``gate.weight`` and
q/v attention targets in the same adapter), merged into the per-expert checkpoint transformers writes:
* ``rounding="peft"`` is byte-identical to PEFT ``merge_and_unload()`` + ``save_pretrained``.
* ``rounding="single"`` (default) rounds once: every merged element equals a direct recomputation
  ``rnd(fp32(W) + fl32(ΔW))`` (≤ 1 ulp, rare, from fp32 summation order), and lies within PEFT's
  double-rounding error of PEFT's own result. PEFT computes ``rnd(W + rnd(ΔW))``; with
  ``u(x)`` the bf16 spacing at |x|, ``|rnd(ΔW) - ΔW| <= u(rnd ΔW)/2`` and each final rounding moves a
  value by at most half a spacing, so
      |ours - peft| <= u(rnd ΔW)/2 + u(max(|ours|, |peft|)) + 2^-18·(|W| + |ΔW|)
  (the last term covers fp32 summation-order differences in ΔW and the fp32 add).
  Attention targets are Linear in PEFT (one rounding), so both modes match PEFT there.
* The order of target_parameters in the config, and which wrapper nests inside which, do not matter.
* The merged checkpoint loads with AutoModelForCausalLM and its logits equal the un-merged PeftModel's
  within bf16 tolerance, measured against the adapter's effect as in test_transformers_load.py.

Fused 3-D expert tensors on disk (as transformers holds them, and transposed, GPT-OSS style): the merged
3-D tensors equal the per-expert merged tensors stacked, byte for byte, in both rounding modes.

Per-expert Linear LoRA (``mlp.experts.<e>.gate_proj`` etc., transformers 4.x / unsloth): plain Linear
merges, checked against ``rnd(fp32(W) + fl32(s·B@A))`` and by loading the merged checkpoint.

Refusals: factors that fit no targeted parameter, and A/B rank dimensions that are not E·r, raise
MismatchError and write nothing. The plan groups experts; ``--detail`` lists every tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from builders import (TINY, MergeCache, SynthSpec, adapter_tensors, bf16_ulp, build_fused_adapter, build_moe_base,
                      check_like_unmerged, checkpoint_tensors, disk_tensors, double_rounding, expert_delta_loop,
                      fuse_checkpoint, fused_reference_deltas, header_names, linear_reference_deltas, load_base_model,
                      logits, note, peft_unmerged, random_ids, rewrite_adapter, single_rounding, swap_nesting,
                      tensor_bytes, to_tensor, tree_hash, ulp_distance, write_checkpoint, write_expert_linear_adapter,
                      write_synthetic_fused_adapter, write_synthetic_moe)

from qwen_merge import MismatchError, NonFiniteError, iter_merged, merge_shards, plan_merge

H, I, E, L = TINY["hidden"], TINY["moe_intermediate"], TINY["experts"], TINY["layers"]
I_NARROW = 8  # a second base with 2·I != H, so that gate_up_proj is not square
STATS = "MoE: merged elements against the recomputed recipe and PEFT"

# adapter name -> (base name, rank, alpha, target_parameters as given to LoraConfig)
FUSED = {
    "fused": ("per_expert", 4, 8, ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
    "fused_rev": ("per_expert", 3, 5, ("mlp.experts.down_proj", "mlp.experts.gate_up_proj")),  # scale 5/3
    "fused_narrow": ("per_expert_narrow", 4, 8, ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
}


class MoeZoo:
    """Bases, adapters, PEFT references and our merges, each built once per module on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[tuple, object] = {}
        self.merges = MergeCache(root / "ours")

    def _once(self, key: tuple, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def base(self, name: str) -> Path:
        def build() -> Path:
            if name == "per_expert":
                return build_moe_base(self.root / "bases" / name, seed=0)
            if name == "per_expert_narrow":
                return build_moe_base(self.root / "bases" / name, seed=3, moe_intermediate=I_NARROW)
            src, transposed = {"fused": ("per_expert", False), "fused_t": ("per_expert", True),
                               "fused_narrow": ("per_expert_narrow", False),
                               "fused_t_narrow": ("per_expert_narrow", True)}[name]
            return fuse_checkpoint(self.base(src), self.root / "bases" / name, transposed=transposed)

        return self._once(("base", name), build)

    def adapter(self, name: str) -> Path:
        def build() -> Path:
            out = self.root / "adapters" / name
            if name in FUSED:
                base, r, alpha, params = FUSED[name]
                return build_fused_adapter(self.base(base), out, seed=11 + r, r=r, alpha=alpha,
                                           target_parameters=params)
            if name == "fused_swapped":  # gate_up_proj outer, down_proj inner; config lists them the other way
                return rewrite_adapter(self.adapter("fused"), out, rename=swap_nesting,
                                       config={"target_parameters": ["mlp.experts.down_proj",
                                                                     "mlp.experts.gate_up_proj", "gate.weight"]})
            if name == "linear":
                return write_expert_linear_adapter(out, layers=L, experts=E, hidden=H, moe_intermediate=I,
                                                   r=4, alpha=8, seed=21)
            raise KeyError(name)

        return self._once(("adapter", name), build)

    def peft_merged(self, adapter: str) -> dict[str, torch.Tensor]:
        """PEFT merge_and_unload() + save_pretrained (per-expert tensors on disk), read back from disk."""

        def build():
            merged = peft_unmerged(self.base(FUSED[adapter][0]), self.adapter(adapter)).merge_and_unload()
            out = self.root / "peft" / adapter
            merged.save_pretrained(out)
            return disk_tensors(out)

        return self._once(("peft", adapter), build)

    def merged(self, base: str, adapter: str, rounding: str = "single") -> Path:
        """Our merge, once per session (inputs checked unchanged, nothing left beside the output)."""
        return self.merges(self.base(base), self.adapter(adapter), rounding=rounding).out


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> MoeZoo:
    return MoeZoo(tmp_path_factory.mktemp("moe"))


def _weights_hash(folder: Path) -> dict[str, str]:
    """sha256 of the weight files and the index (not the provenance manifest, which names the inputs)."""
    return {k: v for k, v in tree_hash(folder).items() if k.endswith((".safetensors", ".index.json", "config.json"))}


def _assert_structure_kept(base: Path, out: Path) -> None:
    """Same tensors in the same shards, with the same dtypes and shapes."""
    b, o = checkpoint_tensors(base), checkpoint_tensors(out)
    assert {n: (s, d, sh) for n, (s, d, sh, _) in o.items()} == {n: (s, d, sh) for n, (s, d, sh, _) in b.items()}


# --------------------------------------------------------------------------------------------------
# Fused target_parameters LoRA onto the per-expert checkpoint, against real PEFT


def test_fixture_shapes_have_e_ne_r(moe):
    """The fused adapters really are E·r-row factors with E != r, nested as PEFT 0.21 writes them."""
    for name in ("fused", "fused_rev"):
        _, r, _, _ = FUSED[name]
        t = adapter_tensors(moe.adapter(name))
        assert r != E
        inner, outer = t["model.layers.0.mlp.experts.base_layer.lora_A.weight"], t["model.layers.0.mlp.experts.lora_A.weight"]
        assert tuple(inner.shape) == (E * r, H), "gate_up_proj (registered first) is the inner wrapper"
        assert tuple(outer.shape) == (E * r, I), "down_proj is the outer wrapper"
        assert tuple(t["model.layers.0.mlp.experts.lora_B.weight"].shape) == (H, E * r)
        assert tuple(t["model.layers.0.mlp.gate.lora_A.weight"].shape) == (r, H), "router LoRA missing"


@pytest.mark.parametrize("adapter", ["fused", "fused_rev"])
def test_fused_peft_rounding_is_bit_identical_to_peft(moe, adapter):
    base_name = FUSED[adapter][0]
    out = moe.merged(base_name, adapter, "peft")
    ours, base, ref = disk_tensors(out), disk_tensors(moe.base(base_name)), moe.peft_merged(adapter)
    assert set(ours) == set(ref) == set(base)
    _assert_structure_kept(moe.base(base_name), out)
    deltas = fused_reference_deltas(moe.adapter(adapter), hidden=H, moe_intermediate=I, experts=E,
                                    rank=FUSED[adapter][1])
    assert len(deltas) == L * (3 * E + 1 + 2)  # every expert tensor, the router, q and v
    for name, t in ours.items():
        assert tensor_bytes(t) == tensor_bytes(ref[name]), (
            f"{name}: rounding='peft' differs from PEFT in {int((ulp_distance(t, ref[name]) > 0).sum())} elements")
        if name in deltas:
            assert (t != base[name]).sum() > 0.5 * t.numel(), f"{name}: the delta did not land"
        else:
            assert tensor_bytes(t) == tensor_bytes(base[name]), f"{name}: untouched tensor changed"


@pytest.mark.parametrize("adapter", ["fused", "fused_rev"])
def test_fused_single_rounding_rounds_once_within_peft_bound(moe, adapter):
    base_name, r = FUSED[adapter][0], FUSED[adapter][1]
    ours = disk_tensors(moe.merged(base_name, adapter, "single"))
    base, ref = disk_tensors(moe.base(base_name)), moe.peft_merged(adapter)
    deltas = fused_reference_deltas(moe.adapter(adapter), hidden=H, moe_intermediate=I, experts=E, rank=r)
    n_total = n_direct = n_peft = max_peft_ulp = 0
    worst_share, n_over_tight = 0.0, 0  # max |ours - peft| / bound; elements beyond the tighter bound
    for name, t in ours.items():
        if name not in deltas:
            assert tensor_bytes(t) == tensor_bytes(base[name]), f"{name}: untouched tensor changed"
            continue
        w, delta = base[name], deltas[name]
        # 1. one rounding of the exact-recipe value
        direct = ulp_distance(t, single_rounding(w, delta))
        assert int(direct.max()) <= 1, f"{name}: {int(direct.max())} ulp from rnd(W + ΔW)"
        n_direct += int((direct > 0).sum())
        # 2. within PEFT's double-rounding error of PEFT's result
        p = ref[name]
        d_bf16 = delta.float().to(torch.bfloat16)
        is_param = ".experts." in name or name.endswith("mlp.gate.weight")  # ParamWrapper: PEFT rounds twice
        recipe = double_rounding(w, delta) if is_param else single_rounding(w, delta)
        assert int(ulp_distance(recipe, p).max()) <= 1, f"{name}: the PEFT reference does not follow its recipe"
        gap = (t.double() - p.double()).abs()
        bound = bf16_ulp(d_bf16) / 2 + bf16_ulp(torch.maximum(t.double().abs(), p.double().abs())) \
            + 2.0 ** -18 * (w.double().abs() + delta.abs())
        bad = gap > bound
        assert not bad.any(), (f"{name}: {int(bad.sum())} elements beyond PEFT's double-rounding error, e.g. ours "
                               f"{t[bad][0].item()} peft {p[bad][0].item()} ΔW {delta[bad][0].item()}")
        worst_share = max(worst_share, float((gap / bound).max()))
        # informational: the tighter u(rnd ΔW)/2 + u(result)/2 (exceeded only where one result rounds
        # across a binade or tie the other does not; the sound bound above allows a full result spacing)
        tight = bf16_ulp(d_bf16) / 2 + bf16_ulp(torch.maximum(t.double().abs(), p.double().abs())) / 2
        n_over_tight += int((gap > tight + 2.0 ** -18 * (w.double().abs() + delta.abs())).sum())
        u = ulp_distance(t, p)
        n_peft += int((u > 0).sum())
        max_peft_ulp = max(max_peft_ulp, int(u.max()))
        n_total += t.numel()
        if is_param:
            continue
        assert int(u.max()) <= 1, f"{name}: Linear target differs from PEFT by {int(u.max())} ulp"
    text = (f"{n_direct}/{n_total} elements 1 ulp from rnd(W+ΔW); {n_peft}/{n_total} differ from PEFT (max "
            f"{max_peft_ulp} ulp on the bf16 grid, max |ours-peft| = {worst_share:.3f} of the bound; {n_over_tight} "
            f"beyond u(rnd ΔW)/2 + u(result)/2)")
    note(STATS, f"{adapter} single", text)
    print(f"\n[{adapter} single] {text}")
    assert n_direct <= 1e-3 * n_total
    assert n_peft > 0, "single rounding gave PEFT's double-rounded result everywhere: is it rounding twice?"


def test_target_parameters_order_and_nesting_do_not_matter(moe):
    """Swapping which wrapper is inner/outer and listing target_parameters in the other order gives the
    same bytes: each pair is assigned by shape, not by position."""
    for rounding in ("single", "peft"):
        a = moe.merged("per_expert", "fused", rounding)
        b = moe.merged("per_expert", "fused_swapped", rounding)
        assert _weights_hash(a) == _weights_hash(b), f"rounding={rounding}: output depends on nesting/config order"
    key = lambda p: sorted((m.name, m.rank, m.scale) for m in p.merges)  # noqa: E731
    assert key(plan_merge(moe.base("per_expert"), moe.adapter("fused"))) == \
        key(plan_merge(moe.base("per_expert"), moe.adapter("fused_swapped")))


def test_fused_merged_checkpoint_loads_with_unmerged_peft_logits(moe):
    """Tolerance as test_transformers_load.py: relative to the adapter's effect |unmerged - base|."""
    base, adapter = moe.base("per_expert"), moe.adapter("fused")
    ids = random_ids(TINY["vocab"])
    ours = logits(load_base_model(moe.merged("per_expert", "fused")), ids)
    base_logits = logits(load_base_model(base), ids)
    peft_model = peft_unmerged(base, adapter)
    unmerged = logits(peft_model, ids)
    peft_merged = logits(peft_model.merge_and_unload(), ids)
    effect, _ = check_like_unmerged("fused", ours, unmerged, base_logits, min_effect=0.05)
    print(f"[fused] |merged-peft_merged| max {(ours - peft_merged).abs().max():.5f}")
    assert (ours - peft_merged).abs().max() <= 0.05 * effect.max()


# --------------------------------------------------------------------------------------------------
# Fused 3-D expert tensors on disk


def _stacked_per_expert(per_expert: dict[str, torch.Tensor], module: str, transposed: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    experts = range(len([n for n in per_expert if n.startswith(module + ".") and n.endswith(".down_proj.weight")]))
    gate_up = torch.stack([torch.cat([per_expert[f"{module}.{e}.gate_proj.weight"],
                                      per_expert[f"{module}.{e}.up_proj.weight"]]) for e in experts])
    down = torch.stack([per_expert[f"{module}.{e}.down_proj.weight"] for e in experts])
    if transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return gate_up.contiguous(), down.contiguous()


@pytest.mark.parametrize("rounding", ["single", "peft"])
@pytest.mark.parametrize("layout", ["fused", "fused_narrow", "fused_t_narrow"])
def test_fused_on_disk_equals_per_expert_merge_stacked(moe, layout, rounding):
    """(E, 2I, H)/(E, H, I) and transposed (E, H, 2I)/(E, I, H) bases: merged 3-D tensors equal the
    per-expert merge (checked against PEFT above) stacked, byte for byte."""
    per_expert_base, adapter = ("per_expert_narrow", "fused_narrow") if "narrow" in layout else ("per_expert", "fused")
    transposed = "_t" in layout
    fused_base = moe.base(layout)
    out = moe.merged(layout, adapter, rounding)
    _assert_structure_kept(fused_base, out)
    ours, base = disk_tensors(out), disk_tensors(fused_base)
    per_expert = disk_tensors(moe.merged(per_expert_base, adapter, rounding))
    for layer in range(L):
        module = f"model.layers.{layer}.mlp.experts"
        gate_up, down = _stacked_per_expert(per_expert, module, transposed)
        assert ours[f"{module}.gate_up_proj"].shape == gate_up.shape
        for name, want in ((f"{module}.gate_up_proj", gate_up), (f"{module}.down_proj", down)):
            got = ours[name]
            assert tensor_bytes(got) == tensor_bytes(want), (
                f"{name}: {int((ulp_distance(got, want) > 0).sum())} elements differ from the per-expert merge, "
                f"max {int(ulp_distance(got, want).max())} ulp")
    for name, t in ours.items():
        if ".mlp.experts." not in name:
            assert tensor_bytes(t) == tensor_bytes(per_expert[name]), f"{name}: differs from the per-expert merge"
        if name not in per_expert and ".mlp.experts." not in name:
            assert tensor_bytes(t) == tensor_bytes(base[name])
    # iter_merged streams the same 3-D tensors that were written
    written = checkpoint_tensors(out)
    for name, tensor in iter_merged(fused_base, moe.adapter(adapter), rounding=rounding):
        assert tensor_bytes(tensor) == written[name][3], name


def test_fused_on_disk_square_transposed_is_right_or_refused(moe):
    """With 2·I == H, a transposed gate_up_proj (E, H, 2I) has the same shape as an untransposed one
    (E, 2I, H); its shape alone cannot tell. The merge must still be right (e.g. from down_proj's
    orientation in the same module), or refuse; a silently transposed delta is wrong."""
    out_parent = moe.root / "square_t"
    out = out_parent / "out"
    try:
        merge_shards(moe.base("fused_t"), moe.adapter("fused"), out, progress=False)
    except MismatchError as e:
        assert "gate_up_proj" in str(e)
        assert not out.exists()
        return
    ours = disk_tensors(out)
    per_expert = disk_tensors(moe.merged("per_expert", "fused", "single"))
    for layer in range(L):
        module = f"model.layers.{layer}.mlp.experts"
        gate_up, down = _stacked_per_expert(per_expert, module, transposed=True)
        assert tensor_bytes(ours[f"{module}.down_proj"]) == tensor_bytes(down)
        assert tensor_bytes(ours[f"{module}.gate_up_proj"]) == tensor_bytes(gate_up), (
            f"{module}.gate_up_proj (E, H, 2I) with H == 2I was merged as if it were (E, 2I, H)")


def test_square_gate_up_alone(moe, tmp_path):
    """An adapter targeting only gate_up_proj (PEFT then saves it un-nested as experts.lora_*): on the
    per-expert base it merges into gate/up exactly as the full adapter does; on a fused base whose
    gate_up_proj is square, nothing else shows the orientation, so the result must be right or refused."""
    only = rewrite_adapter(
        moe.adapter("fused"), tmp_path / "gate_up_only",
        rename=lambda k: k.replace(".experts.base_layer.lora_", ".experts.lora_"),
        transform=lambda k, t: None if (".experts.lora_" in k or ".mlp.gate." in k) else t,
        config={"target_parameters": ["mlp.experts.gate_up_proj"], "target_modules": ["q_proj", "v_proj"]})
    out = merge_shards(moe.base("per_expert"), only, tmp_path / "pe", progress=False).output
    ours, full = disk_tensors(out), disk_tensors(moe.merged("per_expert", "fused"))
    base = disk_tensors(moe.base("per_expert"))
    for name, t in ours.items():
        want = base[name] if name.endswith(("down_proj.weight", "mlp.gate.weight")) else full[name]
        assert tensor_bytes(t) == tensor_bytes(want), name
    for layout, transposed in (("fused", False), ("fused_t", True)):
        dest = tmp_path / layout
        try:
            merge_shards(moe.base(layout), only, dest, progress=False)
        except MismatchError as e:
            assert "square" in str(e) or "gate_up_proj" in str(e), str(e)
            assert not dest.exists()
            continue
        got = disk_tensors(dest)
        for layer in range(L):
            module = f"model.layers.{layer}.mlp.experts"
            gate_up, _ = _stacked_per_expert(ours, module, transposed)
            assert tensor_bytes(got[f"{module}.gate_up_proj"]) == tensor_bytes(gate_up), f"{layout}: {module}"


# --------------------------------------------------------------------------------------------------
# Per-expert Linear LoRA (transformers 4.x / unsloth style)


def test_per_expert_linear_lora(moe):
    base, adapter = moe.base("per_expert"), moe.adapter("linear")
    single = moe.merged("per_expert", "linear", "single")
    peft_mode = moe.merged("per_expert", "linear", "peft")
    assert _weights_hash(single) == _weights_hash(peft_mode), "PEFT's Linear merge rounds once: the modes must agree"
    _assert_structure_kept(base, single)
    ours, w = disk_tensors(single), disk_tensors(base)
    deltas = linear_reference_deltas(adapter)
    assert len(deltas) == L * (3 * E + 1 + 2)
    assert set(deltas) <= set(w), "fixture error: a per-expert module without a base tensor"
    n_diff = n_total = 0
    for name, t in ours.items():
        if name not in deltas:
            assert tensor_bytes(t) == tensor_bytes(w[name]), f"{name}: untouched tensor changed"
            continue
        u = ulp_distance(t, single_rounding(w[name], deltas[name]))
        assert int(u.max()) <= 1, f"{name}: {int(u.max())} ulp from rnd(W + s·B@A)"
        assert (t != w[name]).sum() > 0.5 * t.numel(), f"{name}: the delta did not land"
        n_diff, n_total = n_diff + int((u > 0).sum()), n_total + t.numel()
    note(STATS, "linear per-expert", f"{n_diff}/{n_total} elements 1 ulp from rnd(W + s·B@A)")
    assert n_diff <= 1e-3 * n_total
    plan = plan_merge(base, adapter)
    assert len(plan.merges) == len(deltas)
    assert {m.name for m in plan.merges} == set(deltas)


def test_per_expert_linear_merged_checkpoint_loads(moe):
    """transformers 5 fuses the merged per-expert tensors at load; the logits equal an fp32 un-merged
    reference built in memory on the fused parameters (gate = rows [:I] of gate_up_proj, up = [I:])."""
    base, adapter = moe.base("per_expert"), moe.adapter("linear")
    deltas = linear_reference_deltas(adapter)
    ids = random_ids(TINY["vocab"], seed=99)
    ours = logits(load_base_model(moe.merged("per_expert", "linear"), dtype=torch.float32), ids)
    model = load_base_model(base, dtype=torch.float32)
    base_logits = logits(model, ids)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            m = re.fullmatch(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
            if m is None:
                params[name] += d.float()
                continue
            module, e, proj = m.group(1), int(m.group(2)), m.group(3)
            if proj == "down_proj":
                params[f"{module}.down_proj"][e] += d.float()
            else:
                rows = slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)
                params[f"{module}.gate_up_proj"][e, rows] += d.float()
    unmerged = logits(model, ids)
    check_like_unmerged("linear", ours, unmerged, base_logits, min_effect=0.05)


# --------------------------------------------------------------------------------------------------
# Refusals: nothing written


def _assert_refused(base: Path, adapter: Path, out: Path, *match: str) -> str:
    before = (tree_hash(base), tree_hash(adapter))
    out.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(MismatchError) as info:
        plan_merge(base, adapter)
    with pytest.raises(MismatchError):
        merge_shards(base, adapter, out, progress=False)
    assert not out.exists(), "a refused merge created the destination"
    assert list(out.parent.iterdir()) == [], f"leftovers: {list(out.parent.iterdir())}"
    assert (tree_hash(base), tree_hash(adapter)) == before
    for word in match:
        assert word in str(info.value), str(info.value)
    return str(info.value)


def test_refuses_pair_that_fits_no_targeted_parameter(moe, tmp_path):
    src = moe.adapter("fused")
    # the config targets only gate_up_proj: the down_proj pair fits nothing that is targeted
    only_gate_up = rewrite_adapter(src, tmp_path / "a1", config={"target_parameters": ["mlp.experts.gate_up_proj"],
                                                               "target_modules": ["q_proj", "v_proj"]},
                                   transform=lambda k, t: None if ".mlp.gate." in k else t)
    _assert_refused(moe.base("per_expert"), only_gate_up, tmp_path / "o1" / "out", "fit")
    # the down_proj pair's lora_A is one column short: its width is no targeted parameter's input size
    narrow = rewrite_adapter(src, tmp_path / "a2",
                             transform=lambda k, t: t[:, :-1] if k.endswith("layers.1.mlp.experts.lora_A.weight") else t)
    _assert_refused(moe.base("per_expert"), narrow, tmp_path / "o2" / "out", "fit")
    # also on a fused on-disk base
    _assert_refused(moe.base("fused"), narrow, tmp_path / "o3" / "out", "fit")


def test_refuses_an_expert_stored_in_another_shape(tmp_path):
    """One fused LoRA splits evenly over the experts: an expert whose tensor has another shape is named
    before anything is written (it failed inside torch, mid-merge)."""
    spec = SynthSpec(layers=1, experts=8, hidden=32, moe_intermediate=16, head_dim=8, vocab=64, shards=1)
    good = write_synthetic_moe(tmp_path / "good", spec)
    adapter = write_synthetic_fused_adapter(tmp_path / "adapter", spec, r=4, alpha=8)
    odd_name = "model.layers.0.mlp.experts.5.down_proj.weight"
    shards: dict[str, dict] = {}
    for name, (shard, dtype, shape, payload) in checkpoint_tensors(good).items():
        t = to_tensor(dtype, shape, payload)
        shards.setdefault(shard, {})[name] = t[:, :8].contiguous() if name == odd_name else t
    odd = write_checkpoint(tmp_path / "odd", shards, json.loads((good / "config.json").read_text()))
    _assert_refused(odd, adapter, tmp_path / "o" / "out", odd_name, "[32, 8]", "[32, 16]")


def test_refuses_rank_rows_that_are_not_experts_times_r(moe, tmp_path):
    src = moe.adapter("fused")
    # 22 rows of A / columns of B: not 6 experts x r=4
    cut = rewrite_adapter(src, tmp_path / "a1", transform=lambda k, t: (
        t[:22] if k.endswith("layers.0.mlp.experts.base_layer.lora_A.weight") else
        t[:, :22] if k.endswith("layers.0.mlp.experts.base_layer.lora_B.weight") else t))
    _assert_refused(moe.base("per_expert"), cut, tmp_path / "o1" / "out", "24")
    _assert_refused(moe.base("fused_t"), cut, tmp_path / "o2" / "out", "24")
    # the file's 24 = 6 x 4 rows with a config that says r=5 for the experts (30 rows expected)
    wrong_r = rewrite_adapter(src, tmp_path / "a3", config={"rank_pattern": {"gate_up_proj": 5, "down_proj": 5}})
    _assert_refused(moe.base("per_expert"), wrong_r, tmp_path / "o3" / "out", "30")


def test_per_expert_linear_lora_on_fused_base_is_refused_not_dropped(moe, tmp_path):
    """Per-expert Linear keys have no per-expert tensor in a fused checkpoint: a loud error, never a
    silently dropped delta (unsloth #5410)."""
    _assert_refused(moe.base("fused"), moe.adapter("linear"), tmp_path / "o" / "out", "experts.0.")


# --------------------------------------------------------------------------------------------------
# The plan groups experts


EXPERT_LINE = re.compile(r"^\s*merge\s+model\.layers\.(\d+)\.mlp\.experts\.\*\.(gate|up|down)_proj\.weight\s+"
                         r"experts r=(\d+) scale=([\d.]+)\s+x(\d+) experts\s+\[.+\]$")


def _cli(capsys, *args) -> str:
    from qwen_merge.cli import main

    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_plan_groups_experts_and_detail_lists_every_tensor(moe, capsys):
    base, adapter = moe.base("per_expert"), moe.adapter("fused")
    names = header_names(base)
    summary = _cli(capsys, "plan", base, adapter)
    groups = [m.groups() for line in summary.splitlines() if (m := EXPERT_LINE.match(line))]
    assert sorted(groups) == sorted((str(layer), p, "4", "2", str(E)) for layer in range(L)
                                    for p in ("gate", "up", "down")), summary
    assert not re.search(r"experts\.\d+\.", summary), "the summary names single experts"
    detail = _cli(capsys, "plan", base, adapter, "--detail")
    listed = [n for n in names if re.search(rf"\s{re.escape(n)}\s", detail)]
    assert listed == names, f"--detail misses {sorted(set(names) - set(listed))[:5]}"
    assert len(detail.splitlines()) >= len(names)


def test_plan_of_many_experts_is_short(tmp_path, capsys):
    spec = SynthSpec(layers=3, experts=64, hidden=32, moe_intermediate=16, head_dim=8, vocab=64, shards=4)
    base = write_synthetic_moe(tmp_path / "base", spec)
    adapter = write_synthetic_fused_adapter(tmp_path / "adapter", spec, r=8, alpha=16)
    n_tensors = len(header_names(base))
    assert n_tensors == 3 * (3 * 64 + 9) + 3  # as Qwen3-30B-A3B: 48 * (3 * 128 + 9) + 3 = 18,867
    plan = plan_merge(base, adapter)
    assert len(plan.merges) == 3 * (3 * 64 + 2)
    summary = _cli(capsys, "plan", base, adapter)
    lines = summary.splitlines()
    print(f"\n[plan] {n_tensors} tensors, {len(plan.merges)} merged: {len(lines)} summary lines")
    assert len(lines) <= 40 < n_tensors / 10, summary
    assert sum(1 for line in lines if EXPERT_LINE.match(line)) == 3 * 3, summary
    detail = _cli(capsys, "plan", base, adapter, "--detail")
    assert len(detail.splitlines()) >= n_tensors


def _text_ordered_copy(base: Path, out: Path) -> Path:
    """The same checkpoint with each shard's tensors stored in name order as text (experts 0, 1, 10, 11,
    2, ...), as writers that sort by name store them."""
    tensors = checkpoint_tensors(base)
    shards: dict[str, dict] = {}
    for name in sorted(tensors):
        shard, dtype, shape, payload = tensors[name]
        shards.setdefault(shard, {})[name] = (dtype, shape, payload)
    write_checkpoint(out, dict(sorted(shards.items())), json.loads((base / "config.json").read_text()))
    return out


def test_batched_experts_equal_one_by_one_in_any_storage_order(tmp_path, monkeypatch):
    """Small per-expert tensors are merged in batches (one read, one batched product per projection).
    Stored in expert order the batch takes views of the split factors; stored in text order it gathers
    them. Both must give the bits of merging each expert's tensor alone, and rnd(W + ΔW_e) within 1 ulp."""
    spec = SynthSpec(layers=2, experts=12, hidden=32, moe_intermediate=16, head_dim=8, vocab=64, shards=2)
    numeric = write_synthetic_moe(tmp_path / "numeric", spec)
    text = _text_ordered_copy(numeric, tmp_path / "text")
    names = header_names(text)
    downs = [n for n in names if n.startswith("model.layers.0.") and n.endswith(".down_proj.weight")]
    assert downs[:3] == [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in (0, 1, 10)], downs
    adapter = write_synthetic_fused_adapter(tmp_path / "adapter", spec, r=4, alpha=8)
    batched = {"numeric": disk_tensors(merge_shards(numeric, adapter, tmp_path / "out_n", progress=False).output),
               "text": disk_tensors(merge_shards(text, adapter, tmp_path / "out_t", progress=False).output)}
    monkeypatch.setattr("qwen_merge.planning.plan.BATCH_TENSOR_BYTES", 0)  # nothing is batchable: one tensor at a time
    alone = disk_tensors(merge_shards(numeric, adapter, tmp_path / "out_1", progress=False).output)
    base, factors = disk_tensors(numeric), adapter_tensors(adapter)
    assert set(alone) == set(batched["numeric"]) == set(batched["text"]) == set(base)
    for name, t in alone.items():
        for order, merged in batched.items():
            assert tensor_bytes(merged[name]) == tensor_bytes(t), f"{name}: batched ({order} order) != alone"
    inter = spec.moe_intermediate
    for layer in range(spec.layers):
        mod = f"model.layers.{layer}.mlp.experts"
        gate_up = expert_delta_loop(factors[mod + ".base_layer.lora_A.weight"],
                                    factors[mod + ".base_layer.lora_B.weight"], spec.experts, 4, 2.0)
        down = expert_delta_loop(factors[mod + ".lora_A.weight"], factors[mod + ".lora_B.weight"], spec.experts,
                                 4, 2.0)
        for e in range(spec.experts):
            for proj, delta in (("gate", gate_up[e][:inter]), ("up", gate_up[e][inter:]), ("down", down[e])):
                name = f"{mod}.{e}.{proj}_proj.weight"
                assert int(ulp_distance(alone[name], single_rounding(base[name], delta)).max()) <= 1, name
                assert (alone[name] != base[name]).any(), f"{name}: the delta did not land"


def test_batched_experts_in_fp16_stop_on_an_overflow_naming_the_tensor(tmp_path):
    """A batch is rounded to fp16 in one pass; an expert whose merged values overflow is still named."""
    spec = SynthSpec(layers=1, experts=12, hidden=32, moe_intermediate=16, head_dim=8, vocab=64, shards=1)
    bf16 = write_synthetic_moe(tmp_path / "bf16", spec)
    tensors = checkpoint_tensors(bf16)
    halves = {name: to_tensor(dtype, shape, payload).to(torch.float16)
              for name, (_, dtype, shape, payload) in tensors.items()}
    config = {**json.loads((bf16 / "config.json").read_text()), "torch_dtype": "float16"}
    base = write_checkpoint(tmp_path / "f16", {"model.safetensors": halves}, config)
    adapter = write_synthetic_fused_adapter(tmp_path / "adapter", spec, r=4, alpha=8)
    clean = merge_shards(base, adapter, tmp_path / "clean", progress=False)
    assert clean.merged == 3 * spec.experts + 2

    def blow_up_expert_7(key: str, t: torch.Tensor) -> torch.Tensor:
        if key.endswith("mlp.experts.lora_A.weight"):  # down_proj's A: rows 7·r .. 7·r + r are expert 7's
            t = t.clone()
            t[7 * 4:8 * 4] *= 1e9
        return t

    broken = rewrite_adapter(adapter, tmp_path / "broken", transform=blow_up_expert_7)
    with pytest.raises(NonFiniteError, match=r"model\.layers\.0\.mlp\.experts\.7\.down_proj\.weight rows .*F16"):
        merge_shards(base, broken, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
