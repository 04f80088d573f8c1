"""The FP8 reference of fp8ref.py checked against itself, torch and transformers (no qwen_merge code).

Facts measured here (torch 2.13 CPU, transformers 5.24, accelerate installed; asserted below):

* torch's CPU cast to float8_e4m3fn saturates (465 -> 448, -1e6 -> -448) and rounds to nearest even,
  exactly like :func:`fp8ref.round_e4m3`; the reference clips before rounding anyway.
* Requantizing a dequantized block gives back the same Q and S bytes, for F32 and BF16 scales, whether
  the dequantized block is held in float64 or rounded to float32. With an F32 scale this is not obvious:
  ``fl32(448 * S) != amax`` for about 11% of float32 values, yet ``fl32(fl32(448 * S) / 448) == S`` for
  every one of them (checked exhaustively over a binade), and the block max dequantizes to ``448 * S``
  (the max element always quantizes to +-448). Rounding the dequantized block to *bfloat16* first
  (a bf16 reference base) breaks it for S, not for Q (bf16's 2^-9 error is far below e4m3's half
  spacing): with F32 scales S changes in nearly every block of float32 source weights, never for bfloat16
  ones (their amax is bf16-exact); with BF16 scales wherever bf16(bf16(448 S) / 448) != S (14 of the
  128 bfloat16 significands).
* transformers loads these checkpoints on CPU by dequantizing while loading:
  ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=FineGrainedFP8Config(dequantize=True))``
  (without the argument it switches to the same with a warning, as no GPU is present). The model has
  plain nn.Linear layers, no ``*_scale_inv``, no quantization_config left; weights take the load dtype
  (the config's bfloat16 by default, ``dtype=torch.float32`` gives float32). For dims that are multiples
  of 128 they equal ``dequantize_f64(Q, S).to(dtype)`` bit for bit (one rounding: its float32 product is
  exact for BF16 scales and innocuous double rounding for F32 ones), MoE experts fused included.
* transformers takes the block size from the scale grid (``rows // grid_rows``): a 192-wide tensor is read
  as 96 + 96 blocks instead of 128 + 64 (silently wrong), and a shape the grid does not divide (320 columns,
  3 cells) raises "not divisible by scale grid". Not a reference for ragged shapes.
"""

from __future__ import annotations

import json
import math

import builders
import fp8ref
import pytest
import torch
from fp8ref import SCALE_SUFFIX

SCALE_DTYPES = [torch.float32, torch.bfloat16]


def codes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def weights(shape: tuple[int, int], seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """~N(0, 0.02) like the tiny models, with one all-zero block and one outlier to exercise the scales."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[:128, :128] = 0.0
    w[-1, -1] = 0.5
    return w.to(dtype)


# --------------------------------------------------------------------------------------------------
# e4m3 values and rounding


def test_e4m3_table():
    v = fp8ref.E4M3_VALUES
    assert v.dtype == torch.float64 and v.shape == (256,)
    assert v[0x7F].isnan() and v[0xFF].isnan() and int(v.isnan().sum()) == 2
    assert v[0x7E] == 448 and v[0xFE] == -448 and v[0x01] == 2.0 ** -9 and v[0x08] == 2.0 ** -6
    assert torch.equal(v[0x80:0xFF], -v[:0x7F])
    assert bool((v[1:0x7F] > v[:0x7E]).all()), "codes 0x00..0x7e must increase"


def test_round_e4m3_is_torch_cast_with_ties_to_even():
    """Every midpoint between neighbours, the float32 values next to them, and random values."""
    pos = fp8ref.E4M3_VALUES[:0x7F]
    mids = (pos[1:] + pos[:-1]) / 2
    f32 = mids.to(torch.float32)
    x = torch.cat([pos, mids, torch.nextafter(f32, torch.tensor(0.0)).double(),
                   torch.nextafter(f32, torch.tensor(1e9)).double(),
                   (torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2) ** 9])
    x = torch.cat([x, -x]).clamp(-448, 448)
    ours = fp8ref.round_e4m3(x)
    assert torch.equal(ours, codes(x.to(torch.float32).to(torch.float8_e4m3fn)))
    assert bool((ours[len(pos):len(pos) + len(mids)] % 2 == 0).all()), "ties must go to the even code"


def test_torch_cpu_cast_saturates():
    """Recorded fact for torch 2.13 CPU (spec §4.1: ml_dtypes and other builds give NaN, hence the clip)."""
    x = torch.tensor([449.0, 465.0, 1e6, -465.0, -1e6])
    assert x.to(torch.float8_e4m3fn).float().tolist() == [448.0, 448.0, 448.0, -448.0, -448.0]
    assert x.double().to(torch.float8_e4m3fn).float().tolist() == [448.0, 448.0, 448.0, -448.0, -448.0]


def test_half_step():
    x = torch.tensor([0.0, 2.0 ** -9, 2.0 ** -6 * 0.99, 2.0 ** -6, 1.0, 1.99, 2.0, 300.0, 448.0, 449.75])
    want = [2.0 ** -10] * 3 + [2.0 ** -10, 2.0 ** -4, 2.0 ** -4, 2.0 ** -3, 16.0, 16.0, 16.0]
    assert fp8ref.e4m3_half_step(x).tolist() == want
    assert fp8ref.e4m3_half_step(-x).tolist() == want


# --------------------------------------------------------------------------------------------------
# One tensor: quantize, dequantize, requantize


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=["F32", "BF16"])
@pytest.mark.parametrize("shape", [(256, 384), (192, 192), (96, 320)], ids=["aligned", "ragged", "ragged-thin"])
def test_round_trip_within_bound(shape, scale_dtype):
    w = weights(shape, seed=shape[1])
    q, s = fp8ref.quantize_blocks(w, scale_dtype)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == scale_dtype and tuple(s.shape) == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    assert s[0, 0] == 1 and not codes(q[:128, :128]).any(), "an all-zero block: scale 1, zeros"
    assert int((codes(q) & 0x7F).max()) == 0x7E, "a block max quantizes to +-448"
    err = (fp8ref.dequantize_f64(q, s) - w.double()).abs()
    bound = fp8ref.requant_bound(w.double(), s, slack=0.0)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float((err / bound).max()) > 0.9, "the bound should be tight, not vacuous"


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=["F32", "BF16"])
@pytest.mark.parametrize("source", [torch.bfloat16, torch.float32], ids=["bf16-src", "f32-src"])
def test_requantizing_a_dequantized_block_is_identity(source, scale_dtype):
    """Same Q and S bytes from the float64 and from the float32-rounded dequantized block; a
    bfloat16-rounded one changes S for float32 source weights (module docstring)."""
    w = weights((512, 448), seed=7, dtype=source)  # 448 = 3 * 128 + 64: ragged columns too
    q, s = fp8ref.quantize_blocks(w, scale_dtype)
    deq = fp8ref.dequantize_f64(q, s)
    for held in (deq, deq.to(torch.float32)):
        q2, s2 = fp8ref.quantize_blocks(held, scale_dtype)
        assert torch.equal(codes(q2), codes(q)) and torch.equal(s2.view(torch.uint8), s.view(torch.uint8))
    q3, s3 = fp8ref.quantize_blocks(deq.to(torch.bfloat16), scale_dtype)
    assert torch.equal(codes(q3), codes(q))
    changed = int((s3 != s).sum())
    if scale_dtype == torch.float32 and source == torch.float32:
        assert changed > s.numel() // 2, changed
    elif scale_dtype == torch.float32:  # bf16 amax: 448 S is within 2^-24 of it, so bf16(448 S) == amax
        assert changed == 0, changed


def test_f32_scale_division_by_448():
    """Why the F32 round trip holds: over every float32 a in [1, 2) (so every binade, away from the
    subnormals), S = fl(a / 448) and fl(fl(448 S) / 448) == S, although fl(448 S) != a for ~11% of a."""
    a = (torch.arange(2 ** 23, dtype=torch.int32) | (127 << 23)).view(torch.float32)
    s = a / 448
    assert torch.equal(s, (a.double() / 448).float()), "float32 division == float64 then one rounding"
    back = s * 448
    assert 0.10 < float((back != a).float().mean()) < 0.12
    assert torch.equal(back / 448, s)


def test_bf16_scale_division_by_448():
    """BF16 scales round-trip through a float64 or float32 block (448 S is exact there), but not through a
    bfloat16 one: bf16(bf16(448 S) / 448) != S for 14 of the 128 bfloat16 significands."""
    s = (torch.arange(128, dtype=torch.int16) | (127 << 7)).view(torch.bfloat16)
    assert torch.equal((s.float() * 448) / 448, s.float())
    assert int(((s * 448) / 448 != s).sum()) == 14


# --------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    """Tiny FP8 models, built on first use: aligned (hidden 256) with F32 or BF16 scales, ragged (hidden
    192), MoE (4 experts)."""
    root, built = tmp_path_factory.mktemp("fp8"), {}
    makers = {
        "F32": lambda p: fp8ref.build_fp8_qwen3(p, scale_dtype=torch.float32, seed=1),
        "BF16": lambda p: fp8ref.build_fp8_qwen3(p, scale_dtype=torch.bfloat16, seed=2,
                                                  not_convert=("model.layers.1.mlp.down_proj",)),
        "ragged": lambda p: fp8ref.build_fp8_qwen3(p, hidden=192, seed=3, max_shard_size="400KB"),
        "moe": lambda p: fp8ref.build_fp8_qwen3_moe(p, seed=4),
    }

    def get(name: str):
        if name not in built:
            built[name] = makers[name](root / name)
        return built[name]

    return get


def load(folder, **kwargs):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    config = FineGrainedFP8Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, **kwargs)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["F32", "BF16", "moe"])
def test_checkpoint_layout(fp8_dirs, name):
    out = fp8_dirs(name)
    src = fp8ref.bf16_source(out)
    builders.check_index(out)
    assert builders.shard_files(out) == builders.shard_files(src) and len(builders.shard_files(out)) >= 3
    before, after = builders.checkpoint_tensors(src), builders.checkpoint_tensors(out)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert {k: qc[k] for k in fp8ref.QUANT_CONFIG} == fp8ref.QUANT_CONFIG
    skip = tuple(qc.get("modules_to_not_convert", ()))
    assert skip == (("model.layers.1.mlp.down_proj",) if name == "BF16" else ())
    scale_st = "F32" if name != "BF16" else "BF16"
    quantized = 0
    for tensor, (shard, dtype, shape, payload) in before.items():
        if fp8ref.is_fp8_target(tensor, torch.empty(shape, device="meta"), skip):
            quantized += 1
            s_shard, s_dtype, s_shape, _ = after[tensor + SCALE_SUFFIX]
            assert after[tensor][:3] == (shard, "F8_E4M3", shape)
            assert (s_shard, s_dtype, s_shape) == (shard, scale_st, tuple(math.ceil(d / 128) for d in shape))
            order = [n for n, _ in builders.tensor_entries(out / shard)]
            assert order.index(tensor + SCALE_SUFFIX) < order.index(tensor), "scales precede F8 weights"
        else:
            assert after[tensor] == before[tensor], f"{tensor} must keep its bytes"
    assert len(after) == len(before) + quantized and quantized >= 13
    assert any(n.endswith("mlp.gate.weight") for n in before) == (name == "moe")
    for side in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / side).read_bytes() == (src / side).read_bytes()


@pytest.mark.parametrize("name", ["F32", "BF16", "moe"])
def test_transformers_dequantizes_like_the_reference(fp8_dirs, name):
    """transformers' CPU load (dequantize=True) equals dequantize_f64 rounded once to the loaded dtype."""
    out = fp8_dirs(name)
    pairs = fp8ref.fp8_pairs(out)
    dtypes = [torch.bfloat16, torch.float32] if name == "F32" else [torch.bfloat16]
    for dtype in dtypes:
        loaded = load(out, dtype=dtype)
        assert not any(k.endswith(SCALE_SUFFIX) for k in loaded)
        ref = {n: fp8ref.dequantize_f64(q, s).to(dtype) for n, (q, s) in pairs.items()}
        if name == "moe":  # transformers 5 fuses the experts: gate_up_proj (E, 2I, H), down_proj (E, H, I)
            ref = fuse_experts(ref)
        for n, want in ref.items():
            assert loaded[n].dtype == dtype and torch.equal(loaded[n], want), n


def fuse_experts(per_expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, groups = {}, {}
    for n, t in per_expert.items():
        m = builders._PER_EXPERT.match(n)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[n] = t
    for module, experts in groups.items():
        out[module + ".gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in sorted(experts)])
        out[module + ".down_proj"] = torch.stack([experts[e]["down_proj"] for e in sorted(experts)])
    return out


def test_transformers_reads_ragged_blocks_from_the_scale_grid(fp8_dirs):
    """hidden 192: transformers dequantizes with block = shape // grid (96 x 96 for 192 x 192), which is
    not the format's 128 + 64; our reference differs from it, and equals it when given that block."""
    out = fp8_dirs("ragged")
    loaded = load(out)
    differ = 0
    for n, (q, s) in fp8ref.fp8_pairs(out).items():
        assert 192 in q.shape, n
        theirs = (q.shape[0] // s.shape[0], q.shape[1] // s.shape[1])
        assert torch.equal(loaded[n], fp8ref.dequantize_f64(q, s, theirs).to(torch.bfloat16)), n
        same = torch.equal(loaded[n], fp8ref.dequantize_f64(q, s).to(torch.bfloat16))
        # Misplaced block edges only show where neighbouring scale cells differ (equal block maxima do not).
        assert same == bool((s == s.flatten()[0]).all()), n
        differ += not same
    assert differ >= 10, differ


@pytest.mark.slow  # imports transformers
def test_transformers_refuses_a_grid_that_does_not_divide():
    """320 columns, 3 scale cells (128 + 128 + 64): transformers' dequantizer raises instead."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    q, s = fp8ref.quantize_blocks(weights((256, 320), seed=5), torch.float32)
    with pytest.raises(ValueError, match="not divisible by scale grid"):
        Fp8Dequantize(None)._dequantize_one(q, s, torch.bfloat16)


def test_dequantized_checkpoint_is_what_transformers_loads(fp8_dirs, tmp_path):
    """The plain bf16 folder (the PEFT reference base) loads without a quantizer to the same weights."""
    out = fp8_dirs("BF16")
    plain = fp8ref.dequantized_checkpoint(out, tmp_path / "plain", torch.bfloat16)
    config = json.loads((plain / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    builders.check_index(plain)
    names = builders.header_names(plain)
    assert not any(n.endswith(SCALE_SUFFIX) for n in names)
    assert sorted(names) == sorted(builders.header_names(fp8ref.bf16_source(out)))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plain)
    mine = {k: v.detach() for k, v in model.state_dict().items()}
    theirs = load(out)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
