"""fp32 outputs do not depend on the host: the product is exact, the rest float64, one rounding at the end.

* `compute.widen` splits each factor vector into two float64 halves whose products a float64 GEMM sums
  without rounding: checked on vectors of every exponent spread, zeros and subnormals, ranks 1 to 1024.
* Merged values against exact rational arithmetic (`fractions`), element by element, within half an fp32
  ulp plus the float64 roundings; a sum one fp32 rounding of the product would get wrong is right.
* The same bytes whatever the GEMM kernel: a real merge run under other MKL code paths and without ATen's
  vector kernels (each emulates another host) gives identical shards; so do 1, 2 and 4 threads and blocks
  of any height, in-process.
* bf16 outputs keep PEFT's fp32 order; where the merge fuses the add into the GEMM, it gives the bits of
  the separate add on this host too.
"""

from __future__ import annotations

import hashlib
from fractions import Fraction

import numpy as np
import pytest
import torch
from builders import (SynthSpec, checkpoint_tensors, cli_env, run_python, write_synthetic_fused_adapter,
                      write_synthetic_moe)

from qwen_merge import merge_shards
from qwen_merge.compute import arithmetic as compute
from qwen_merge.compute.arithmetic import Workspace, make_factors, merge_rows, widen


def _factors(rng: np.random.Generator, rows: int, rank: int, cols: int, spread: float = 0.0):
    """fp32 A (rank, cols), B (rows, rank) with log-uniform magnitudes over `spread` binary orders (numpy,
    so the values are the same on every host; torch.randn follows the host's vector kernels)."""
    def draw(shape):
        x = rng.standard_normal(shape) * np.exp2(-rng.uniform(0, spread, shape))
        return torch.from_numpy(x.astype(np.float32))
    return draw((rank, cols)), draw((rows, rank))


def _merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, block: int | None = None,
           wide: bool = True) -> torch.Tensor:
    factors = make_factors(a, b, scale, transpose=False)
    factors = widen(factors) if wide else factors
    out, workspace, rows = torch.empty_like(w), Workspace(), w.shape[0]
    block = block or rows
    for row0 in range(0, rows, block):
        n = min(block, rows - row0)
        merge_rows(w[row0:row0 + n], factors, row0, workspace.block(n, (w.shape[1],), "F32", out[row0:row0 + n],
                                                                     wide=wide))
    return out


@pytest.mark.parametrize("rank", [1, 2, 7, 16, 64, 200, 1024])
@pytest.mark.parametrize("spread", [0, 10, 60])
def test_split_is_exact_where_it_promises(rank, spread):
    """hi + lo is the fp32 value whenever it lies within 2ρ - 24 bits of its vector's largest; hi has at most ρ significant bits above its vector's quantum, lo ρ below it, so
    r products sum below 2^53 quanta; what is dropped is below 2^-2ρ of the vector's largest."""
    rng = np.random.default_rng(rank * 100 + spread)
    a, b = _factors(rng, 33, rank, 41, spread)
    factors = widen(make_factors(a, b, 1.0, transpose=False))
    rho = (53 - max(rank - 1, 1).bit_length()) // 2
    for x, halves, dim in ((b, factors.lhs, -1), (a, factors.rhs, -2)):
        x64 = x.double()
        hi, lo = (halves[:, :rank], halves[:, rank:]) if dim == -1 else (halves[rank:], halves[:rank])
        largest = x64.abs().amax(dim=dim, keepdim=True)
        exponent = torch.frexp(largest)[1].double()  # largest < 2^e
        quantum = torch.exp2(exponent - rho)
        assert torch.equal(torch.round(hi / quantum), hi / quantum), "hi is not a multiple of its quantum"
        assert (hi.abs() / quantum).max() <= 2 ** rho
        assert torch.equal(torch.round(lo / quantum * 2 ** rho), lo / quantum * 2 ** rho)
        assert (lo.abs() / quantum).max() <= 0.5
        dropped = (x64 - hi - lo).abs()
        assert (dropped <= largest * 2.0 ** (-2 * rho)).all()
        within = x64.abs() >= torch.exp2(exponent + 23 - 2 * rho)  # its last bit at or above lo's quantum
        assert torch.equal(dropped[within], torch.zeros_like(dropped[within]))


@pytest.mark.parametrize("rank, scale", [(1, 2.0), (8, 2.6666666666666665), (64, 0.5), (300, 4.618802153517007)])
def test_merged_values_against_exact_arithmetic(rank, scale):
    """Every sampled element is within half an fp32 ulp of W + s·Σ_k B_ik·A_kj computed exactly (s the
    double alpha/r), plus the float64 roundings of s·S and of the add."""
    rng = np.random.default_rng(rank)
    a, b = _factors(rng, 50, rank, 70, spread=8)
    w = torch.from_numpy(rng.standard_normal((50, 70)).astype(np.float32))
    out = _merge(w, a, b, scale, block=7)
    for i, j in rng.integers(0, (50, 70), size=(100, 2)):
        exact = Fraction(float(w[i, j])) + Fraction(scale) * sum(
            Fraction(float(b[i, k])) * Fraction(float(a[k, j])) for k in range(rank))
        got = float(out[i, j])
        half_ulp = float(np.spacing(np.float32(abs(got)))) / 2  # fp32's spacing at |got|
        terms = abs(float(w[i, j])) + abs(scale) * float(b[i].double().abs() @ a[:, j].double().abs())
        assert abs(Fraction(got) - exact) <= Fraction(half_ulp) + Fraction(2.0 ** -50 * terms), (i, j)


def test_zero_vectors_and_subnormal_factors():
    """A zero row of B and a zero column of A (a zero vector splits into zeros), and fp32 subnormals next to
    normal values in one vector: every element equals the exact merge rounded once."""
    a = torch.tensor([[1.0, 0.0, 3e-39], [2.0 ** -20, 0.0, -1.5]], dtype=torch.float32)   # (r=2, 3)
    b = torch.tensor([[1e-40, 2.0], [0.0, 0.0], [0.75, -1e-45]], dtype=torch.float32)    # (3, r)
    w = torch.tensor([[0.5, -0.25, 1e-38], [1.0, 2.0, 3.0], [-7.0, 0.0, 1e-30]], dtype=torch.float32)
    out = _merge(w, a, b, 2.0)
    for i in range(3):
        for j in range(3):
            exact = Fraction(float(w[i, j])) + 2 * sum(Fraction(float(b[i, k])) * Fraction(float(a[k, j]))
                                                       for k in range(2))
            got = out[i, j].item()
            assert abs(Fraction(got) - exact) <= Fraction(float(np.spacing(np.float32(abs(got))))) / 2, (i, j)
    assert torch.equal(out[1], w[1])


def test_one_rounding_where_fp32_arithmetic_rounds_twice():
    """W = 1, ΔW = 2^-24 + 2^-50: fp32 arithmetic rounds ΔW to 2^-24 and then 1 + 2^-24 to the even 1.0;
    the float64 merge keeps the 2^-50 and rounds up to 1 + 2^-23, the nearest fp32 value. An exact tie
    (ΔW = 2^-24) still rounds to even."""
    a = torch.tensor([[2.0 ** -12], [2.0 ** -25]]).repeat(1, 2)           # (r=2, 2)
    b = torch.tensor([[2.0 ** -12, 2.0 ** -25], [2.0 ** -12, 0.0]])       # row 0: 2^-24 + 2^-50; row 1: 2^-24
    w = torch.ones(2, 2)
    out = _merge(w, a, b, 1.0)
    assert out[0].tolist() == [1 + 2 ** -23] * 2
    assert out[1].tolist() == [1.0, 1.0]
    assert _merge(w, a, b, 1.0, wide=False)[0].tolist() == [1.0, 1.0]     # what fp32 arithmetic gives


def test_bytes_do_not_depend_on_blocks_or_threads():
    rng = np.random.default_rng(7)
    a, b = _factors(rng, 257, 48, 300, spread=4)
    w = torch.from_numpy(rng.standard_normal((257, 300)).astype(np.float32))
    before = torch.get_num_threads()
    try:
        results = []
        for threads, block in ((1, None), (2, 1), (4, 5), (2, 64)):
            torch.set_num_threads(threads)
            results.append(_merge(w, a, b, 2.6666666666666665, block))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


# Each setting makes MKL or torch take other kernels, as another CPU would; "as is" is this machine's own.
# (Thread counts are covered in-process above: a merge computes on one thread whatever OMP_NUM_THREADS says.)
KERNEL_SETTINGS = {"as is": {}, "MKL compatible": {"MKL_CBWR": "COMPATIBLE"}, "MKL AVX": {"MKL_CBWR": "AVX"},
                   "ATen default": {"ATEN_CPU_CAPABILITY": "default"}}
# One child per setting: the fp32 GEMM's own bits under it (to show the setting changes them), then the merge.
CHILD = """
import hashlib, sys
import numpy as np, torch
from qwen_merge.cli import main
r = np.random.default_rng(0)
a = torch.from_numpy(r.standard_normal((64, 48)).astype(np.float32))
b = torch.from_numpy(r.standard_normal((48, 300)).astype(np.float32))
print(hashlib.sha256((a @ b).numpy().tobytes()).hexdigest())
sys.exit(main(["merge", *sys.argv[1:], "--quiet"]))
"""


def _kernel_env(settings: dict[str, str]) -> dict[str, str]:
    """cli_env() with one setting, and none of the others this run may have inherited."""
    env = {k: v for k, v in cli_env().items() if k not in ("OMP_NUM_THREADS", "MKL_CBWR", "ATEN_CPU_CAPABILITY")}
    return {**env, **settings}


def test_a_real_merge_has_the_same_bytes_under_other_kernels(zoo, tmp_path):
    """The fp32 Qwen3 base of the zoo merged under each kernel setting: identical shards, though the fp32
    GEMM itself gives other bits under them (checked, so the settings do change something)."""
    base, adapter = zoo.pair("basic_fp32_base")
    hashes, gemm = {}, {}
    for label, settings in KERNEL_SETTINGS.items():
        out = tmp_path / label.replace(" ", "_")
        child = run_python(CHILD, base, adapter, out, env=_kernel_env(settings), capture_output=True, text=True)
        assert child.returncode == 0, child.stderr[-2000:]
        gemm[label] = child.stdout.strip()
        hashes[label] = {name: hashlib.sha256(entry[3]).hexdigest() for name, entry in checkpoint_tensors(out).items()}
    assert all(h == hashes["as is"] for h in hashes.values()), "an fp32 merge depends on the kernel"
    assert len(set(gemm.values())) > 1, "the settings did not change the fp32 GEMM: the test proves nothing"


@pytest.mark.parametrize("check", ["_fused_add_exact", "_batched_add_exact"])
def test_fused_add_gives_the_bits_of_the_separate_add(demo_inputs, tmp_path, monkeypatch, check):
    """bf16 merges add W inside the GEMM (addmm_ for a tensor, baddbmm_ for a batch of small experts) where
    a check at the call's shape showed the same bits as a separate add; with the fused path switched off
    the output is byte-identical (the demo model; a Qwen3-MoE layout with a fused-expert LoRA, alpha/r = 2
    so the scale folds into the factor and the fused form applies)."""
    if check == "_fused_add_exact":
        base, adapter = demo_inputs
    else:
        spec = SynthSpec(layers=2, experts=16, hidden=32, moe_intermediate=16, head_dim=8, vocab=64, shards=2)
        base = write_synthetic_moe(tmp_path / "moe", spec)
        adapter = write_synthetic_fused_adapter(tmp_path / "adapter", spec, r=4, alpha=8)
    fused, separate = tmp_path / "fused", tmp_path / "separate"
    checks, real = [], getattr(compute, check)
    monkeypatch.setattr(compute, check, lambda *shape: checks.append(real(*shape)) or checks[-1])
    merge_shards(base, adapter, fused, progress=False)
    assert checks, "the merge never considered the fused form"
    if not any(checks):
        pytest.skip("this machine's GEMM adds W in another order at every shape: the merge never fuses here")
    monkeypatch.setattr(compute, check, lambda *shape: False)
    merge_shards(base, adapter, separate, progress=False)
    assert checkpoint_tensors(fused) == checkpoint_tensors(separate)
