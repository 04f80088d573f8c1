"""End-to-end: qwen_merge's streamed merge against real PEFT merge_and_unload on real checkpoints.

For every variant of builders.ADAPTERS (bf16/fp16/fp32 bases, tied and untied, sharded and
single-file, rsLoRA, rank/alpha patterns, layers_to_transform, bf16/fp16 adapter files, GPT-2 Conv1D):
* untouched tensors are byte-identical to the base;
* merged tensors match PEFT's merge_and_unload() under bounds that hold on every host (reference.py):
  bf16/fp16 bit for bit wherever no rounding boundary lies within the fp32 arithmetic's error of the
  float64 merge; fp32 as the float64 merge rounded once, never further from it than PEFT's fp32 merge;
* iter_merged yields exactly the bytes that were written, in checkpoint order;
* plan_merge reports the right module set, rank, scale and transpose flag;
* the output folder has the base's structure (shards, tensor->shard map, metadata, index, other files).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from builders import (ADAPTERS, BASES, DTYPES, EXTRA_BASE_FILES, MERGE_VARIANTS, PATTERN_SPOT_CHECKS, adapter_modules,
                      checkpoint_tensors, expected_rank_alpha_scale, load_base_model, peft_merged_state_dict,
                      read_header, record, shard_files, tensor_bytes, to_tensor, ulp_distance)
from reference import U32, U_WIDE, Exact, check_fp32, check_rounded

from qwen_merge import MergeReport, iter_merged, plan_merge
from qwen_merge.report import render

# Largest share of merged bf16/fp16 elements whose fp32 error band holds a rounding boundary: the band is
# (r + 4) fp32 units of the terms' magnitude, a small fraction of an output unit (measured: 2.3 % of fp16
# elements, whose unit is 2^-11, and far fewer bf16 ones), so a larger share means a vacuous band.
MAX_NEAR_BOUNDARY_SHARE = 0.05


class Result:
    """The session's merge of a variant (builders.Zoo.merged), with its PEFT reference computed on first use."""

    def __init__(self, variant: str, merged):
        self.variant, self.base, self.adapter, self.out = variant, merged.base, merged.adapter, merged.out
        self.report, self.inputs_before, self.inputs_after = merged.report, merged.inputs_before, merged.inputs_after
        self.spec = ADAPTERS[variant]
        self.base_spec = BASES[self.spec.base]
        self.modules = adapter_modules(self.adapter)  # module -> rank, from the file
        self.expected_merged = {m + ".weight" for m in self.modules}
        self._ref = self._exact = None

    @property
    def reference(self) -> dict[str, torch.Tensor]:
        if self._ref is None:
            self._ref = peft_merged_state_dict(self.base, self.adapter, dtype=DTYPES[self.base_spec.dtype])
        return self._ref

    @property
    def exact(self) -> Exact:
        """PEFT's merge in float64, and the magnitudes of its terms."""
        if self._exact is None:
            dtype = DTYPES[self.base_spec.dtype]
            self._exact = Exact.of(lambda: load_base_model(self.base, dtype=dtype), self.adapter)
        return self._exact


@pytest.fixture(scope="module")
def merged(zoo):
    cache: dict[str, Result] = {}

    def get(variant: str) -> Result:
        if variant not in cache:
            cache[variant] = Result(variant, zoo.merged(variant))
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", MERGE_VARIANTS)
def test_merged_tensors_match_peft(merged, variant):
    res = merged(variant)
    base = checkpoint_tensors(res.base)
    out = checkpoint_tensors(res.out)
    ref = res.reference
    assert list(out) == list(base), "output tensor names/order differ from the base"
    assert res.expected_merged <= set(base), "fixture error: adapter module without base tensor"
    assert len(res.expected_merged) > 0

    n_diff = n_merged = near = 0
    for name, (_, dtype, shape, payload) in out.items():
        _, b_dtype, b_shape, b_payload = base[name]
        assert (dtype, shape) == (b_dtype, b_shape), f"{name}: dtype/shape changed"
        if name not in res.expected_merged:
            assert payload == b_payload, f"{name}: untouched tensor is not byte-identical to the base"
            # sanity of the reference: PEFT left it alone too
            assert tensor_bytes(ref[name]) == b_payload, f"{name}: PEFT reference changed an untouched tensor"
            continue
        ours = to_tensor(dtype, shape, payload)
        theirs = ref[name]
        assert theirs.dtype == ours.dtype and tuple(theirs.shape) == shape, name
        base_t = to_tensor(b_dtype, b_shape, b_payload)
        changed = (ours.view(-1) != base_t.view(-1)).sum().item()
        assert changed > 0.5 * ours.numel(), f"{name}: only {changed}/{ours.numel()} elements changed"
        exact = res.exact
        if ours.dtype == torch.float32:
            n_diff += check_fp32(ours, exact.merged[name], exact.bands(name, U_WIDE), theirs)
        else:
            near += check_rounded(ours, theirs, exact.merged[name], exact.bands(name, U32))
            n_diff += int((ours != theirs).sum())
        n_merged += ours.numel()

    record("merged elements that differ from PEFT merge_and_unload", variant, n_diff, n_merged, 1)
    print(f"\n[{variant}] {n_diff} of {n_merged} merged elements differ from PEFT's ({near} near a rounding boundary)")
    assert near <= MAX_NEAR_BOUNDARY_SHARE * n_merged, f"{near}/{n_merged} elements near a boundary: a vacuous band"


@pytest.mark.parametrize("variant", MERGE_VARIANTS)
def test_output_structure(merged, variant):
    res = merged(variant)
    base_files = sorted([p.name for p in res.base.iterdir()] + ["qwen_merge.json"])  # + the manifest
    out_files = sorted(p.name for p in res.out.iterdir())
    assert out_files == base_files, "output folder must hold exactly the base's file names and the manifest"
    for adapter_file in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert not (res.out / adapter_file).exists()
    for other in ["config.json", "generation_config.json", *EXTRA_BASE_FILES]:
        assert (res.out / other).read_bytes() == (res.base / other).read_bytes(), f"{other} not copied verbatim"

    shards = shard_files(res.base)
    assert shard_files(res.out) == shards
    weight_map = {}
    total = 0
    for shard in shards:
        n, header = read_header(res.out / shard)
        _, base_header = read_header(res.base / shard)
        assert header.get("__metadata__", {}).get("format") == "pt", f"{shard}: __metadata__ {header.get('__metadata__')}"
        names = {k for k in header if k != "__metadata__"}
        assert names == {k for k in base_header if k != "__metadata__"}, f"{shard}: tensor set differs from base"
        size = (res.out / shard).stat().st_size
        spans = sorted(tuple(header[k]["data_offsets"]) for k in names)
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert 8 + n + spans[-1][1] == size, f"{shard}: file length does not match header"
        for k in names:
            assert header[k]["dtype"] == base_header[k]["dtype"] and header[k]["shape"] == base_header[k]["shape"]
            weight_map[k] = shard
            total += header[k]["data_offsets"][1] - header[k]["data_offsets"][0]

    index_path = res.out / "model.safetensors.index.json"
    if BASES[res.spec.base].max_shard_size is None:
        assert shards == ["model.safetensors"] and not index_path.exists()
    else:
        index = json.loads(index_path.read_text())
        assert index["metadata"]["total_size"] == total
        assert index["weight_map"] == weight_map
        base_index = json.loads((res.base / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == base_index["weight_map"]
        assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]


@pytest.mark.parametrize("variant", MERGE_VARIANTS)
def test_inputs_unchanged(merged, variant):
    res = merged(variant)
    assert res.inputs_after[0] == res.inputs_before[0], "base folder changed"
    assert res.inputs_after[1] == res.inputs_before[1], "adapter folder changed"
    leftovers = sorted(p.name for p in res.out.parent.iterdir() if p.name != res.out.name)
    assert leftovers == [], f"leftovers beside the destination: {leftovers}"


@pytest.mark.parametrize("variant", MERGE_VARIANTS)
def test_report(merged, variant):
    res = merged(variant)
    report = res.report
    assert isinstance(report, MergeReport)
    n_tensors = len(checkpoint_tensors(res.base))
    assert Path(report.output).resolve() == res.out.resolve()
    assert report.merged == len(res.expected_merged)
    assert report.copied == n_tensors - len(res.expected_merged)
    assert set(shard_files(res.out)) <= set(report.files)
    for f in report.files:
        assert (res.out / f).is_file(), f"report.files names {f!r}, which is not in the output"
    payload = sum(len(v[3]) for v in checkpoint_tensors(res.out).values())
    on_disk = sum(p.stat().st_size for p in res.out.iterdir())
    assert payload <= report.bytes_written <= on_disk
    fields = lambda p: [(m.name, m.rank, m.scale, m.transpose, m.shard) for m in p.merges]  # noqa: E731
    assert fields(report.plan) == fields(plan_merge(res.base, res.adapter))


@pytest.mark.parametrize("variant", MERGE_VARIANTS)
def test_iter_merged_matches_files(merged, variant):
    res = merged(variant)
    out = checkpoint_tensors(res.out)
    got = []
    for name, tensor in iter_merged(res.base, res.adapter):
        assert isinstance(tensor, torch.Tensor)
        shard, dtype, shape, payload = out[name]
        assert tensor.dtype == DTYPES[{"BF16": "bf16", "F16": "fp16", "F32": "fp32"}[dtype]], name
        assert tuple(tensor.shape) == shape, name
        assert tensor_bytes(tensor) == payload, f"{name}: iter_merged bytes differ from the written file"
        got.append(name)
    assert got == list(out), "iter_merged must yield every tensor once, in checkpoint (shard, offset) order"


@pytest.mark.parametrize("variant", MERGE_VARIANTS)
def test_plan(merged, variant):
    res = merged(variant)
    plan = plan_merge(res.base, res.adapter)
    base = checkpoint_tensors(res.base)
    transpose = BASES[res.spec.base].arch == "gpt2"
    by_name = {m.name: m for m in plan.merges}
    assert len(by_name) == len(plan.merges), "a tensor is planned twice"
    assert set(by_name) == res.expected_merged
    assert plan.copied == len(base) - len(plan.merges)
    for module, file_rank in res.modules.items():
        m = by_name[module + ".weight"]
        r, _, scale = expected_rank_alpha_scale(res.adapter, module)
        assert file_rank == r, f"fixture error: PEFT saved rank {file_rank} for {module}, config says {r}"
        assert m.rank == r, f"{m.name}: rank {m.rank}, expected {r}"
        assert math.isclose(m.scale, scale, rel_tol=1e-12), f"{m.name}: scale {m.scale!r}, expected {scale!r}"
        assert m.transpose is transpose, f"{m.name}: transpose {m.transpose}"
        assert Path(m.shard).name == base[m.name][0], f"{m.name}: shard {m.shard}"
    payload = sum(len(v[3]) for v in base.values())
    assert plan.output_bytes >= payload
    assert plan.output_bytes == sum(p.stat().st_size for p in res.out.iterdir())  # every file, the manifest too
    assert isinstance(plan.predicted_peak_bytes, int) and plan.predicted_peak_bytes > 0
    summary, detail = render(plan), render(plan, detail=True)
    assert isinstance(summary, str) and summary.strip()
    assert str(len(plan.merges)) in summary
    for m in plan.merges:
        assert m.name in detail, f"render(detail=True) does not list {m.name}"


def test_plan_patterns_spot_checks(zoo):
    """The tricky rows of peft-semantics.md §2.2, by hand, and via PEFT's real get_pattern_key."""
    base, adapter = zoo.pair("patterns")
    modules = adapter_modules(adapter)
    plan = {m.name: m for m in plan_merge(base, adapter).merges}
    for module, r, alpha in PATTERN_SPOT_CHECKS:
        assert expected_rank_alpha_scale(adapter, module)[:2] == (r, alpha), f"spec table vs PEFT for {module}"
        assert modules[module] == r, f"PEFT saved rank {modules[module]} for {module}"
        m = plan[module + ".weight"]
        assert (m.rank, m.scale) == (r, alpha / r), f"{module}: got rank {m.rank} scale {m.scale}"
    # the distinct ranks really occur, so a wrong rule cannot pass by accident
    assert {m.rank for m in plan.values()} == {2, 4, 5, 6, 8, 12}


def test_plan_patterns_follow_file_order(zoo):
    """First key wins in adapter_config.json order. PEFT itself saves the dicts sorted, so the same
    patterns give layer 1's down_proj alpha 7 in our hand-ordered file and 3 in PEFT's sorted file."""
    ordered_base, ordered = zoo.pair("patterns")
    sorted_base, sorted_adapter = zoo.pair("patterns_sorted")
    cfg_sorted = json.loads((sorted_adapter / "adapter_config.json").read_text())
    cfg_ordered = json.loads((ordered / "adapter_config.json").read_text())
    assert list(cfg_sorted["alpha_pattern"]) == sorted(cfg_sorted["alpha_pattern"])
    assert list(cfg_ordered["alpha_pattern"]) != sorted(cfg_ordered["alpha_pattern"])
    name = "model.layers.1.mlp.down_proj.weight"
    a = {m.name: m for m in plan_merge(ordered_base, ordered).merges}[name]
    b = {m.name: m for m in plan_merge(sorted_base, sorted_adapter).merges}[name]
    assert (a.rank, a.scale) == (4, 7 / 4)
    assert (b.rank, b.scale) == (4, 3 / 4)


def test_plan_rslora_scale(zoo):
    base, adapter = zoo.pair("rslora")
    merges = plan_merge(base, adapter).merges
    assert len(merges) == 4 * 7
    for m in merges:
        assert m.rank == 8
        assert m.scale == 13 / math.sqrt(8), m.scale
        assert m.transpose is False


def test_plan_layers_to_transform(zoo):
    base, adapter = zoo.pair("layers02")
    names = {m.name for m in plan_merge(base, adapter).merges}
    assert len(names) == 2 * 7
    assert {n.split(".")[2] for n in names} == {"0", "2"}


def test_plan_single_file_base_path(zoo):
    """A base given as the .safetensors file itself plans like its folder."""
    base, adapter = zoo.pair("basic_single")
    by_dir = plan_merge(base, adapter)
    by_file = plan_merge(base / "model.safetensors", adapter)
    key = lambda p: sorted((m.name, m.rank, m.scale, m.transpose) for m in p.merges)  # noqa: E731
    assert key(by_file) == key(by_dir)
    assert by_file.copied == by_dir.copied


def test_gpt2_square_conv1d_is_transposed(merged):
    """attn.c_proj is 64x64: only the architecture can say it needs a transposed delta."""
    res = merged("gpt2")
    out = checkpoint_tensors(res.out)
    name = "transformer.h.0.attn.c_proj.weight"
    assert out[name][2] == (64, 64)
    ours = to_tensor(*out[name][1:])
    assert int(ulp_distance(ours, res.reference[name]).max()) <= 1
