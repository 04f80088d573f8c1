"""The checkpoint the user asks for: output dtype, shard size, and FP8 block-quantized bases in and out.

References are independent of qwen_merge: float64 dequantization and exact merged values (tests/fp8ref.py),
real PEFT models built on the dequantized base, and real transformers loads of every output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import (ADAPTER_ST, INDEX, build_peft_adapter, check_index, check_like_unmerged, checkpoint_entries,
                      checkpoint_tensors, input_ids, load_base_model, logits, note, one_error_line,
                      peft_merged_state_dict, peft_unmerged, read_header, record, run_cli, shard_files, tensor_bytes,
                      tree_hash, ulp_distance)
from fp8ref import (build_fp8_qwen3, build_fp8_qwen3_moe, dequantize_f64, dequantized_checkpoint, expand_scale,
                    read_shards, requant_bound)
from reference import U32, Exact, check_rounded

from qwen_merge import MismatchError, NonFiniteError, OptionError, iter_merged, merge_shards, plan_merge, verify_merge
from qwen_merge.report import render

LORA = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8}


def flat(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in read_shards(folder).values() for k, v in shard.items()}


def fp8_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# --------------------------------------------------------------------------------------------------
# FP8 fixtures: tiny Qwen3 and Qwen3-MoE quantized with the reference formulas


FP8_CASES = {
    # name: (builder, kwargs) — dims multiples of 128 with F32 scales; ragged (hidden 192) with BF16 scales;
    # MoE with per-expert FP8 tensors and a target_parameters LoRA on the fused experts
    "dense": (build_fp8_qwen3, {"hidden": 256, "scale_dtype": torch.float32}),
    "ragged": (build_fp8_qwen3, {"hidden": 192, "scale_dtype": torch.bfloat16, "seed": 3}),
    "moe": (build_fp8_qwen3_moe, {"hidden": 256, "moe_intermediate": 128, "scale_dtype": torch.bfloat16, "seed": 5}),
}


class Fp8Case:
    def __init__(self, root: Path, name: str) -> None:
        builder, kwargs = FP8_CASES[name]
        self.name = name
        self.base = builder(root / name, **kwargs)
        # the exact dequantized model (fp32 is exact for BF16 scales; for F32 scales f32(Q)·S rounds once)
        self.deq = dequantized_checkpoint(self.base, root / f"{name}-deq32", dtype=torch.float32)
        self.adapter = build_peft_adapter(self.deq, root / f"{name}-lora", LORA, seed=11, dtype=torch.float32)
        self.zero = build_peft_adapter(self.deq, root / f"{name}-zero", {**LORA, "init_lora_weights": True},
                                       seed=12, dtype=torch.float32)
        self.root = root
        self._merged: dict[tuple, Path] = {}

    def merged(self, adapter: str = "adapter", **options) -> Path:
        key = (adapter, tuple(sorted(options.items())))
        if key not in self._merged:
            out = self.root / f"{self.name}-out-{len(self._merged)}"
            merge_shards(self.base, getattr(self, adapter), out, progress=False, **options)
            self._merged[key] = out
        return self._merged[key]

    def exact(self) -> dict[str, torch.Tensor]:
        """Every FP8 weight's exact merged value in float64: f64(Q)·S + ΔW with ΔW from the adapter file
        (the PEFT reference for target_parameters experts computes its own delta: see `delta`)."""
        base, deltas = flat(self.base), peft_deltas(self.deq, self.adapter)
        return {n: dequantize_f64(base[n], base[n + "_scale_inv"]) + deltas.get(n, 0.0)
                for n in base if base[n].dtype == torch.float8_e4m3fn}


def peft_deltas(deq: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW per on-disk weight, in float64, as PEFT's merge of the fp32 dequantized base computes it minus
    the base (PEFT in fp32: one rounding of W + ΔW, so the difference is ΔW within fp32 rounding). This
    covers target_parameters on fused experts, which PEFT splits per expert on save."""
    merged = peft_merged_state_dict(deq, adapter, dtype=torch.float32)
    base = {k: v for k, v in flat(deq).items()}
    out: dict[str, torch.Tensor] = {}
    for name, value in merged.items():
        if name in base and not torch.equal(value, base[name]):
            out[name] = value.double() - base[name].double()
        elif name.endswith(("gate_up_proj", "down_proj")) and ".experts." in name:  # fused (E, out, in)
            prefix = name.rsplit(".", 1)[0]
            for e in range(value.shape[0]):
                parts = (["gate_proj", "up_proj"] if name.endswith("gate_up_proj") else ["down_proj"])
                rows = value[e].shape[0] // len(parts)
                for k, part in enumerate(parts):
                    disk = f"{prefix}.{e}.{part}.weight"
                    out[disk] = value[e, k * rows:(k + 1) * rows].double() - base[disk].double()
    return out


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    cases: dict[str, Fp8Case] = {}

    def get(name: str) -> Fp8Case:
        if name not in cases:
            cases[name] = Fp8Case(root, name)
        return cases[name]

    yield get
    shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# FP8 in, FP8 out (requantized)


@pytest.mark.parametrize("case", list(FP8_CASES))
def test_fp8_requantized_within_half_an_e4m3_step(fp8, case):
    c = fp8(case)
    out, base = flat(c.merged()), flat(c.base)
    exact = c.exact()
    changed = 0
    for name, value in exact.items():
        q, s = out[name], out[name + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == base[name + "_scale_inv"].dtype, name
        got = dequantize_f64(q, s)
        bound = requant_bound(value, s, slack=2**-20)
        ratio = float(((got - value).abs() / bound).max())
        assert ratio <= 1.0, f"{name}: error {ratio:.3f} of the half-step bound"
        changed += not torch.equal(fp8_bits(q), fp8_bits(base[name]))
        record("fp8 requant (error / bound)", f"{case}", 0, q.numel(), ratio)
    assert changed == sum(1 for n in exact if n in peft_deltas(c.deq, c.adapter))
    # everything else is byte-identical: untouched FP8 tensors, their scales, bf16 tensors
    deltas = peft_deltas(c.deq, c.adapter)
    for name, value in base.items():
        weight = name.removesuffix("_scale_inv")
        if weight not in deltas:
            assert torch.equal(fp8_bits(out[name]), fp8_bits(value)), name
    config = json.loads((c.merged() / "config.json").read_text())
    assert config["quantization_config"] == json.loads((c.base / "config.json").read_text())["quantization_config"]
    # the base's files and tensor-to-file assignment; in shards with requantized weights each new scale
    # comes after its weight (smallest element first), so its weight is merged once
    mine, theirs = checkpoint_entries(c.merged()), checkpoint_entries(c.base)
    assert {k: v[0] for k, v in mine.items()} == {k: v[0] for k, v in theirs.items()}
    for name in deltas:
        if name + "_scale_inv" in mine:
            assert mine[name + "_scale_inv"][1]["data_offsets"][0] >= mine[name][1]["data_offsets"][1], name
    check_index(c.merged())


@pytest.mark.parametrize("case", list(FP8_CASES))
def test_fp8_zero_adapter_gives_back_the_base_bytes(fp8, case):
    """A block whose values do not change keeps its scale and its e4m3 bytes; only -0 may come back +0
    (fp32 -0 + 0 is +0)."""
    c = fp8(case)
    out, base = checkpoint_tensors(c.merged("zero")), checkpoint_tensors(c.base)
    assert out.keys() == base.keys()
    minus_zero = 0
    for name, (shard, dtype, shape, data) in base.items():
        assert out[name][:3] == (shard, dtype, shape), name
        if out[name][3] == data:
            continue
        assert dtype == "F8_E4M3", f"{name} changed"
        a, b = torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.frombuffer(bytearray(out[name][3]),
                                                                                     dtype=torch.uint8)
        differ = a != b
        assert bool((a[differ] == 0x80).all() and (b[differ] == 0x00).all()), f"{name}: not only -0 -> +0"
        minus_zero += int(differ.sum())
    note("fp8 zero adapter", case, f"byte-identical but {minus_zero} e4m3 -0 written as +0")


def test_fp8_scales_are_fresh_where_blocks_change(fp8):
    """A merged block gets amax/448 in the scale dtype (the stored, rounded value is what Q was divided by),
    unless its amax is unchanged."""
    c = fp8("ragged")
    out, base, exact = flat(c.merged()), flat(c.base), c.exact()
    name = "model.layers.0.self_attn.q_proj.weight"  # 192 x 192: blocks 128 + 64 both ways
    s_out, s_base = out[name + "_scale_inv"], base[name + "_scale_inv"]
    assert s_out.shape == (2, 2) and s_out.dtype == torch.bfloat16
    from fp8ref import block_amax
    amax = block_amax(dequantize_f64(out[name], s_out))
    assert torch.equal(amax, (s_out.double() * 448).where(amax > 0, amax))  # the largest value is ±448·s
    assert not torch.equal(s_out, s_base)
    assert float((amax - block_amax(exact[name])).abs().max()) <= float(s_out.double().max()) * 16


# --------------------------------------------------------------------------------------------------
# FP8 in, plain dtype out (dequantized)


@pytest.mark.parametrize("case", list(FP8_CASES))
def test_fp8_dequantized_within_one_ulp(fp8, case):
    c = fp8(case)
    out_dir = c.merged(dtype="bfloat16")
    out, exact = flat(out_dir), c.exact()
    assert not any(n.endswith("_scale_inv") for n in out)
    for name, value in exact.items():
        assert out[name].dtype == torch.bfloat16
        ulps = ulp_distance(out[name], value.to(torch.float32).to(torch.bfloat16))
        # value.to(f32) first is exact for BF16 scales and within 2^-24 for F32 ones: compare per ulp
        assert int(ulps.max()) <= 1, name
        record("fp8 dequant -> bf16 (ulp vs exact)", case, int((ulps > 0).sum()), ulps.numel(), float(ulps.max()))
    config = json.loads((out_dir / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    check_index(out_dir)
    index = json.loads((out_dir / INDEX).read_text())
    assert all(not n.endswith("_scale_inv") for n in index["weight_map"])


@pytest.mark.parametrize("case", ["dense", "ragged"])
def test_fp8_merges_compute_what_the_unmerged_adapter_computes(fp8, case):
    """Logits of both outputs against the un-merged PEFT model on the exact (fp32) dequantized base. The
    bf16 output must be as close as the bf16 rounding of PEFT's own fp32 merge; the requantized output is
    measured (dequantized exactly) and must keep the adapter's effect."""
    c = fp8(case)
    ids = input_ids()
    unmerged = logits(peft_unmerged(c.deq, c.adapter, dtype=torch.float32), ids)
    base = logits(load_base_model(c.deq, dtype=torch.float32), ids)
    reference = load_base_model(c.deq, dtype=torch.float32)
    reference.load_state_dict(peft_merged_state_dict(c.deq, c.adapter, dtype=torch.float32))
    bf16_tolerance = float((logits(reference.to(torch.bfloat16), ids) - unmerged).abs().max())

    ours_bf16 = logits(load_base_model(c.merged(dtype="bfloat16"), dtype=torch.bfloat16), ids)
    err_bf16 = float((ours_bf16 - unmerged).abs().max())
    assert err_bf16 <= 1.5 * bf16_tolerance + 1e-3, (err_bf16, bf16_tolerance)

    requant = dequantized_checkpoint(c.merged(), c.root / f"{case}-requant-deq32", dtype=torch.float32)
    ours_fp8 = logits(load_base_model(requant, dtype=torch.float32), ids)
    err_fp8 = float((ours_fp8 - unmerged).abs().max())
    check_like_unmerged(f"fp8 requant {case}", ours_fp8, unmerged, base, min_effect=1e-3, mean_share=0.25,
                        max_share=0.5)
    note("fp8 logits", case, f"max |logits - unmerged|: bf16 output {err_bf16:.4g} (bf16 rounding of PEFT's merge "
         f"{bf16_tolerance:.4g}); requantized FP8 output {err_fp8:.4g}, effect of the adapter "
         f"{float((unmerged - base).abs().max()):.4g}")


def test_fp8_format_loads_in_transformers(fp8):
    """transformers' fine-grained FP8 loader (dequantize=True on CPU) reads our requantized output to the
    same weights as the exact reference dequantization (dims multiples of 128, where its loader is right)."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    c = fp8("dense")
    model = AutoModelForCausalLM.from_pretrained(c.merged(), dtype=torch.float32,
                                                 quantization_config=FineGrainedFP8Config(dequantize=True))
    state = model.state_dict()
    out = flat(c.merged())
    for name, q in out.items():
        if q.dtype == torch.float8_e4m3fn:
            assert torch.equal(state[name], dequantize_f64(q, out[name + "_scale_inv"]).to(torch.float32)), name


def test_fp8_plan_says_what_each_mode_does(fp8):
    c = fp8("dense")
    text = render(plan_merge(c.base, c.adapter))
    assert "dequant → merge → requant" in text and "half an e4m3 step" in text
    text = render(plan_merge(c.base, c.adapter, dtype="bfloat16"))
    assert "dequant → merge" in text and "FP8 tensors dequant → BF16" in text and "block scales" in text


@pytest.mark.parametrize("options", [{}, {"dtype": "bfloat16"}])
def test_fp8_verify(fp8, options):
    c = fp8("ragged")
    out = c.merged(**options)
    report = verify_merge(out, c.base, c.adapter, full=True, **options)
    assert report.ok, report.problems
    # a changed FP8 byte is found
    broken = c.root / f"broken-{len(options)}"
    shutil.copytree(out, broken)
    name = "model.layers.1.mlp.down_proj.weight"
    shard, offset, _entry = _locate(broken, name)
    with open(shard, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0x08]))
    report = verify_merge(broken, c.base, c.adapter, full=True, **options)
    assert not report.ok and name in report.problems[0], report.problems


def test_fp8_verify_accepts_another_valid_requantization_and_names_one_beyond_the_bound(fp8):
    """verify compares a requantized weight by value, within the e4m3 rounding bound, so an output that
    another tool requantized with other (valid) scales passes, and one element off by two steps does not."""
    c = fp8("ragged")
    name = "model.layers.1.mlp.down_proj.weight"
    exact = c.exact()[name]
    other = c.root / "other-requant"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(c.merged(), other)
    scale = flat(c.merged())[name + "_scale_inv"] * 2  # half the range: still valid, another tool's choice
    q = (exact / expand_scale(scale.double(), tuple(exact.shape))).float().to(torch.float8_e4m3fn)
    for tensor_name, value in ((name, q), (name + "_scale_inv", scale)):
        shard, offset, entry = _locate(other, tensor_name)
        with open(shard, "r+b") as f:
            f.seek(offset)
            f.write(tensor_bytes(value))
    report = verify_merge(other, c.base, c.adapter, full=True)
    assert report.ok, report.problems
    q.view(torch.uint8)[3, 5] += 2  # two e4m3 steps away (same binade: codes are monotonic within it)
    shard, offset, _ = _locate(other, name)
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(tensor_bytes(q))
    report = verify_merge(other, c.base, c.adapter, full=True)
    assert not report.ok and len(report.problems) == 1, report.problems
    assert f"tensor {name!r} is off the recomputed merge by more than FP8 requantization allows" in report.problems[0]
    assert "1 of " in report.problems[0] and "the first in row 3" in report.problems[0]


def _locate(folder: Path, name: str) -> tuple[Path, int, dict]:
    for shard in shard_files(folder) or ["model.safetensors"]:
        n, header = read_header(folder / shard)
        if name in header:
            return folder / shard, 8 + n + header[name]["data_offsets"][0], header[name]
    raise KeyError(name)


def test_iter_merged_yields_the_requested_dtype(fp8):
    c = fp8("dense")
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), (None, None)):
        got = dict(iter_merged(c.base, c.adapter, dtype=dtype))
        on_disk = flat(c.merged(**({"dtype": dtype} if dtype else {})))
        assert got.keys() == on_disk.keys()
        for name, tensor in got.items():
            if torch_dtype is not None and tensor.is_floating_point():
                assert tensor.dtype == torch_dtype, name
            assert torch.equal(fp8_bits(tensor), fp8_bits(on_disk[name])), name


def test_fp8_memory_stays_bounded(fp8, tmp_path):
    """The FP8 paths hold row blocks, not tensors: a merge with 64 KiB row blocks predicts and stays
    within a few MiB above the runtime."""
    c = fp8("dense")
    plan = plan_merge(c.base, c.adapter, block_bytes=1 << 16)
    assert all(op.block_rows % 128 == 0 for op in plan.ops if op.requant is not None)
    merge_shards(c.base, c.adapter, tmp_path / "out", progress=False, block_bytes=1 << 16)
    assert tree_hash(tmp_path / "out") == tree_hash(c.merged()) or _same_tensors(tmp_path / "out", c.merged())


def _same_tensors(a: Path, b: Path) -> bool:
    """The block size is part of the manifest's options; the tensors must not depend on it."""
    return {k: v[3] for k, v in checkpoint_tensors(a).items()} == {k: v[3] for k, v in checkpoint_tensors(b).items()}


# --------------------------------------------------------------------------------------------------
# What is refused, by name, before writing


def _edit_config(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_fp8_refusals(fp8, tmp_path):
    c = fp8("dense")
    # an FP8 weight without its scale
    from builders import rewrite_checkpoint
    target = "model.layers.0.self_attn.q_proj.weight"
    no_scale = rewrite_checkpoint(c.base, tmp_path / "noscale",
                                  lambda shard, t: {k: v for k, v in t.items() if k != target + "_scale_inv"})
    with pytest.raises(MismatchError, match=r"q_proj.weight cannot take a LoRA delta: it is F8_E4M3 without a "
                                            r"weight_scale_inv block scale"):
        plan_merge(no_scale, c.adapter)
    head_only = build_peft_adapter(c.deq, tmp_path / "head", {"target_modules": ["lm_head"], "r": 2}, seed=1,
                                   dtype=torch.float32)
    with pytest.raises(OptionError, match=r"q_proj.weight is F8_E4M3 without a block scale"):
        plan_merge(no_scale, head_only, dtype="bfloat16")
    # another quantization method: the tensors are refused as targets, and dtype cannot convert it
    other = _edit_config(c.base, tmp_path / "ct", lambda cfg: cfg["quantization_config"].update(
        quant_method="compressed-tensors"))
    with pytest.raises(MismatchError, match=r"quant_method 'compressed-tensors'.*Supported: plain"):
        plan_merge(other, c.adapter)
    with pytest.raises(OptionError, match="compressed-tensors"):
        plan_merge(other, head_only, dtype="bfloat16")
    # a broken block size
    bad = _edit_config(c.base, tmp_path / "bs", lambda cfg: cfg["quantization_config"].update(weight_block_size=[128]))
    with pytest.raises(Exception, match="weight_block_size must be two positive integers"):
        plan_merge(bad, c.adapter)
    # nothing was written anywhere: planning refuses before the output exists
    proc = run_cli("merge", no_scale, c.adapter, tmp_path / "out")
    assert "cannot take a LoRA delta" in one_error_line(proc) and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# dtype and max_shard_size on plain checkpoints


def test_dtype_converts_every_float_tensor_once(zoo):
    """fp32 -> bf16: a copied tensor is converted once; a merged one is PEFT's fp32 arithmetic rounded once
    to bf16, so it equals the fp32 merge rounded to bf16 wherever no bf16 rounding boundary lies within the
    fp32 arithmetic's error of the float64 merge (there the host's GEMM order decides)."""
    base, adapter = zoo.pair("basic_fp32_base")
    exact = Exact.of(lambda: load_base_model(base, dtype=torch.float32), adapter)
    merged_fp32 = flat(zoo.merged("basic_fp32_base").out)
    out = zoo.merged("basic_fp32_base", dtype="bfloat16").out
    got = flat(out)
    base_fp32 = flat(base)
    for name, value in merged_fp32.items():
        assert got[name].dtype == torch.bfloat16, name
        if torch.equal(value, base_fp32[name]):  # copied: converted once
            assert torch.equal(got[name], value.to(torch.bfloat16)), name
        else:  # merged: one rounding from the fp32 result
            check_rounded(got[name], value.to(torch.bfloat16), exact.merged[name], exact.bands(name, U32))
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    check_index(out)
    ids = input_ids()
    ours = logits(load_base_model(out, dtype=torch.bfloat16), ids)
    full = logits(load_base_model(zoo.merged("basic_fp32_base").out, dtype=torch.float32), ids)
    rounded = load_base_model(zoo.merged("basic_fp32_base").out, dtype=torch.bfloat16)  # cast while loading
    # the bf16 checkpoint loads as the fp32 merge cast while loading does, but for the elements near a
    # rounding boundary (one bf16 unit apart), which move the bf16 logits by a few units at most
    torch.testing.assert_close(ours, logits(rounded, ids), rtol=0, atol=float(full.abs().max()) * 2 ** -5)
    note("dtype", "fp32 -> bf16", f"max |logits - fp32 merge| = {float((ours - full).abs().max()):.4g}")


def test_dtype_float16_overflow_is_named(zoo, tmp_path):
    from builders import rewrite_checkpoint
    base = zoo.base("qwen_fp32")
    name = "model.layers.1.mlp.up_proj.weight"

    def big(shard, tensors):
        if name in tensors:
            tensors[name] = tensors[name].clone()
            tensors[name][3, 5] = 1e6
        return tensors

    hot = rewrite_checkpoint(base, tmp_path / "hot", big)
    adapter = zoo.adapter("basic_fp32_base")
    with pytest.raises(NonFiniteError, match=rf"{name} rows .* holds NaN or Inf.*overflows F16"):
        merge_shards(hot, adapter, tmp_path / "out", progress=False, dtype="float16")
    assert not (tmp_path / "out").exists()
    merge_shards(hot, adapter, tmp_path / "out", progress=False, dtype="float16", allow_nonfinite=True)
    assert torch.isinf(flat(tmp_path / "out")[name][3, 5])


@pytest.mark.parametrize("size, shards", [("60KB", None), ("10GB", 1), (1, None)])
def test_max_shard_size_reshards_in_checkpoint_order(zoo, size, shards):
    base, adapter = zoo.pair("basic")
    out = zoo.merged("basic", max_shard_size=size).out
    files = shard_files(out)
    reference = zoo.merged("basic").out
    assert flat(out).keys() == flat(reference).keys()
    for name, value in flat(reference).items():
        assert torch.equal(flat(out)[name], value), name
    if shards == 1:
        assert files == ["model.safetensors"] and not (out / INDEX).exists()
        return
    count = len(files)
    assert files == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    check_index(out)
    limit = 60_000 if size == "60KB" else 1
    order = [n for s in shard_files(reference) for n, _ in _data_order(reference / s)]
    placed = []
    for shard in files:
        entries = _data_order(out / shard)
        payload = sum(e["data_offsets"][1] - e["data_offsets"][0] for _, e in entries)
        assert payload <= limit or len(entries) == 1, (shard, payload)
        placed += sorted(n for n, _ in entries)
    # greedy in checkpoint order: each shard holds a contiguous run of the base's tensor order
    runs = [sorted(n for n, _ in _data_order(out / s)) for s in files]
    flat_order = [n for run in runs for n in sorted(run, key=order.index)]
    assert flat_order == order
    ids = input_ids()
    assert torch.equal(logits(load_base_model(out), ids), logits(load_base_model(reference), ids))
    assert verify_merge(out, base, adapter, max_shard_size=size).ok


def _data_order(path: Path) -> list[tuple[str, dict]]:
    _n, header = read_header(path)
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])


def test_resharded_tied_and_resized_vocabulary(arts):
    """An adapter that unties the head and one that resizes the vocabulary, re-sharded and converted."""
    for name in ("t_emb", "rs_mts"):
        out = arts.merged(name, max_shard_size="30KB", dtype="float32").out
        reference = arts.merged(name).out
        check_index(out)
        ref, got = flat(reference), flat(out)
        assert ref.keys() == got.keys(), name
        for key, value in ref.items():  # fp32: the merge before its rounding to bf16, copies widened exactly
            assert got[key].dtype == torch.float32 and torch.equal(got[key].to(value.dtype), value), (name, key)
        ref_cfg, cfg = (json.loads((p / "config.json").read_text()) for p in (reference, out))
        assert {k: v for k, v in cfg.items() if k not in ("dtype", "torch_dtype")} == \
            {k: v for k, v in ref_cfg.items() if k not in ("dtype", "torch_dtype")}
        base, adapter = arts.pair(name)
        assert verify_merge(out, base, adapter, max_shard_size="30KB", dtype="float32", full=True).ok


def test_resharded_merge_resumes(zoo, tmp_path, monkeypatch):
    """Interrupted after its first shards, a re-sharded, converted merge resumes to the same bytes."""
    from qwen_merge.sinks import writer

    base, adapter = zoo.pair("basic")
    options = {"max_shard_size": "50KB", "dtype": "float32"}
    reference = zoo.merged("basic", **options).out
    calls = {"n": 0}
    real = writer.ShardWriter.write

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(writer.ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_shards(base, adapter, tmp_path / "out", progress=False, **options)
    monkeypatch.setattr(writer.ShardWriter, "write", real)
    assert not (tmp_path / "out").exists()
    merge_shards(base, adapter, tmp_path / "out", progress=False, resume=True, **options)
    assert tree_hash(tmp_path / "out") == tree_hash(reference)


@pytest.mark.slow  # builds a model and adapters with transformers and PEFT
def test_untied_head_takes_the_embeddings_dtype(tmp_path):
    """A tied bf16 base, adapters whose untying copy is stored in fp32 (the base loaded in fp32 when the
    adapter was made): the new lm_head is bf16, as PEFT's merged checkpoint has it, with its values."""
    from builders import ABASES, build_abase

    base = build_abase(ABASES["tied"], tmp_path / "tied", {})
    for name, lora in (("mts", {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}),
                       ("emb", {"target_modules": ["embed_tokens", "q_proj"]})):
        adapter = build_peft_adapter(base, tmp_path / name, {"r": 4, "lora_alpha": 8, **lora}, seed=7,
                                     dtype=torch.float32, trained=True)
        dtypes = {e.dtype for e in read_header_entries(adapter / ADAPTER_ST)}
        assert "F32" in dtypes
        merged = merge_shards(base, adapter, tmp_path / f"out-{name}", progress=False).output
        entries = checkpoint_entries(merged)
        if "lm_head.weight" in entries:
            assert entries["lm_head.weight"][1]["dtype"] == "BF16", name
            assert entries["model.embed_tokens.weight"][1]["dtype"] == "BF16", name
        ours = flat(merged)
        reference = peft_merged_state_dict(base, adapter)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in ours:
                assert ours[key].dtype == reference[key].dtype == torch.bfloat16


class _E:
    def __init__(self, d: dict) -> None:
        self.dtype = d["dtype"]


def read_header_entries(path: Path) -> list[_E]:
    _, header = read_header(path)
    return [_E(v) for k, v in header.items() if k != "__metadata__"]


# --------------------------------------------------------------------------------------------------
# The command line


def test_cli_options(zoo, tmp_path):
    base, adapter = zoo.pair("basic")
    proc = run_cli("merge", base, adapter, tmp_path / "out", "--dtype", "float32", "--max-shard-size", "60KB",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert _same_tensors(tmp_path / "out", zoo.merged("basic", dtype="float32", max_shard_size="60KB").out)
    proc = run_cli("verify", tmp_path / "out", "--base", base, "--adapter", adapter, "--dtype", "float32",
                   "--max-shard-size", "60KB")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli("merge", base, adapter, tmp_path / "bad", "--max-shard-size", "5 gigs")
    assert "--max-shard-size: '5 gigs' is not a size" in one_error_line(proc)
    proc = run_cli("merge", base, adapter, tmp_path / "bad", "--dtype", "int8")
    assert "--dtype: 'int8' is not an output dtype" in one_error_line(proc)
    proc = run_cli("plan", base, adapter, "--dtype", "bfloat16")
    assert proc.returncode == 0 and "dtype:   output BF16" in proc.stdout


def test_options_are_recorded_in_the_manifest(zoo):
    out = zoo.merged("basic", dtype="float32", max_shard_size="60KB").out
    options = json.loads((out / "qwen_merge.json").read_text())["options"]
    assert options["dtype"] == "F32" and options["max_shard_size"] == 60_000
