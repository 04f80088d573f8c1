"""PEFT's own LoRA test matrix through qwen_merge.

Every `LoraConfig` row of PEFT 0.21.2's tests/test_custom_models.py (vendored in peft_custom_cases.py) is
built as PEFT's tests build it: the tiny custom model, seed 0. All adapter weights (factors, LoRA biases,
modules_to_save copies, trainable tokens) are then randomised and DoRA magnitudes scaled, so every delta is
non-zero. The model's state_dict is the base (a single model.safetensors, or two shards with an index,
alternating), the adapter is written with save_pretrained, and PEFT's reference is
`PeftModel.from_pretrained(model, adapter).merge_and_unload()`. qwen_merge.merge_shards must then:

* not crash: any exception but a QwenMergeError fails the test;
* match the merge, with bounds that hold on every host (reference.py): an fp32 output is PEFT's merge
  computed in float64, rounded once (and never further from it than PEFT's own fp32 merge); a bf16 output
  equals PEFT's merge bit for bit wherever no rounding boundary lies within the fp32 arithmetic's error of
  the float64 merge, and is one of the two neighbours where one does;
* leave every tensor that PEFT leaves alone byte-identical to the base;
* or refuse with a one-line QwenMergeError that says why, without a rename hint, and write nothing.

The tests after the matrix cover what running it found: convolution LoRA (in bf16, in many row blocks,
and a Conv3d kernel PEFT itself crashes on), nn.MultiheadAttention, VeLoRA, MiCA under rounding="peft",
and row blocks of a single row; and that an fp32 merge has the same bytes whatever the thread count and
the block size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from builders import PREFIX, checkpoint_tensors, disk_tensors, rewrite_adapter, tree_hash, write_checkpoint
from peft_custom_cases import LORA_CASES, build_model, resolved
from reference import U32, U_WIDE, Exact, band, check_fp32, check_rounded, near_boundary
from safetensors.torch import load_file
from torch import nn

from qwen_merge import AdapterError, QwenMergeError, merge_shards, plan_merge, verify_merge
from qwen_merge.report import render

pytestmark = pytest.mark.filterwarnings("ignore")

CASES = {name: (model_id, kwargs) for name, model_id, kwargs in LORA_CASES}
GROUPED = ("Conv2d Groups LoRA", "Conv2d Groups2 LoRA", "Conv2d Groups LoRA with DoRA",
           "Conv2d Groups2 LoRA with DoRA")
# Cases qwen_merge refuses: the words its one-line message must contain.
REFUSED = {
    "Vanilla MLP 1 LoRA with KaSA": ("KaSA", "kasa_config"),
    "Vanilla MLP 1 LoRA with Monteclora": ("MonteCLoRA", "monteclora_config"),
    "BD-LoRA A only": ("BD-LoRA", "use_bdlora"),
    "BD-LoRA B only": ("BD-LoRA", "use_bdlora"),
    "BD-LoRA both A and B": ("BD-LoRA", "use_bdlora"),
    "MHA 1 LoRA": ("'mha'", "MultiheadAttention", "out_proj delta twice"),
    "MHA 2 LoRA": ("'mha'", "MultiheadAttention", "out_proj delta twice"),
    "Conv2d Groups LoRA": ("'conv2d'", "groups=8", "PEFT cannot merge"),
    "Conv2d Groups2 LoRA": ("'conv2d'", "groups=2", "PEFT cannot merge"),
    "Conv2d Groups LoRA with DoRA": ("'conv2d'", "groups=8", "PEFT cannot merge"),
    "Conv2d Groups2 LoRA with DoRA": ("'conv2d'", "groups=2", "PEFT cannot merge"),
}
RENAME_HINTS = ("key_map", "--map")


# --------------------------------------------------------------------------------------------------
# Building a case: base checkpoint, adapter, PEFT's reference


@dataclass
class Built:
    base: Path
    adapter: Path
    reference: dict[str, torch.Tensor] | None  # PEFT's merged state_dict; None when PEFT cannot merge
    peft_error: Exception | None
    make_model: Callable[[], nn.Module] | None = None
    _exact: Exact | None = None

    def exact(self) -> Exact:
        """The float64 references, made on first use."""
        if self._exact is None:
            self._exact = Exact.of(self.make_model, self.adapter)
        return self._exact


def randomise(model: nn.Module, seed: int) -> None:
    """Trained-looking adapter weights: random factors, biases, modules_to_save copies and trainable tokens;
    DoRA magnitudes scaled by 0.9..1.1, so the merge is neither plain LoRA nor the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.9 + 0.2 * torch.rand(p.shape, generator=g).to(p.dtype))
            elif any(k in name for k in ("lora_", "modules_to_save", "trainable_tokens_delta")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))


def save_base(state: dict[str, torch.Tensor], folder: Path, sharded: bool) -> None:
    """A safetensors checkpoint: model.safetensors, or two shards and an HF index."""
    names = list(state)
    if not sharded or len(names) < 2:
        halves = {"model.safetensors": names}
    else:
        halves = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    write_checkpoint(folder, {shard: {n: state[n] for n in part} for shard, part in halves.items()})


def build_case(root: Path, make_model, config_kwargs: dict, seed: int) -> Built:
    from peft import LoraConfig, PeftModel, get_peft_model

    folder = root / f"case{seed:03d}"
    model = make_model()
    save_base(model.state_dict(), folder / "base", sharded=seed % 2 == 1)
    peft_model = get_peft_model(model, LoraConfig(**resolved(config_kwargs)))
    randomise(peft_model, seed)
    peft_model.save_pretrained(folder / "adapter")
    try:
        reference = PeftModel.from_pretrained(make_model(), folder / "adapter").merge_and_unload().state_dict()
    except (NotImplementedError, RuntimeError) as e:  # what PEFT cannot merge; each test says which it expects
        return Built(folder / "base", folder / "adapter", None, e)
    return Built(folder / "base", folder / "adapter", {k: v.detach() for k, v in reference.items()}, None,
                 make_model)


class Matrix:
    """Cases built on first use and shared by the session (tests treat them as read-only)."""

    def __init__(self, root: Path) -> None:
        self.root, self._built, self._outs = root, {}, 0
        self.merged: dict[str, Path] = {}  # case name -> its default merge, for tests that compare bytes

    def case(self, name: str, dtype: torch.dtype = torch.float32) -> Built:
        model_id, kwargs = CASES[name]
        return self.custom(f"{name} [{dtype}]", lambda: build_model(model_id, dtype), kwargs)

    def custom(self, key: str, make_model, kwargs: dict) -> Built:
        if key not in self._built:
            self._built[key] = build_case(self.root, make_model, kwargs, seed=len(self._built))
        return self._built[key]

    def out(self) -> Path:
        self._outs += 1
        return self.root / f"out{self._outs:03d}"


@pytest.fixture(scope="session")
def matrix(tmp_path_factory) -> Matrix:
    torch.set_num_threads(2)
    return Matrix(tmp_path_factory.mktemp("peft_matrix"))


def compare_with_peft(built: Built, out: Path) -> int:
    """Check the output against PEFT's merge under bounds that hold on every host (reference.py); return the
    number of merged elements where it differs from PEFT's fp32-arithmetic merge."""
    ours, base = disk_tensors(out), checkpoint_tensors(built.base)
    raw = checkpoint_tensors(out)
    assert list(raw) == list(base), "tensor names or their order changed"
    assert set(built.reference) == set(base), "fixture error: PEFT's merged model has other tensors"
    exact, differ = built.exact(), 0
    for name, peft in built.reference.items():
        got = ours[name]
        assert (got.dtype, got.shape) == (peft.dtype, peft.shape), name
        if _unchanged(peft, base[name]):
            assert raw[name][3] == base[name][3], f"{name}: PEFT leaves it alone but it is not byte-identical"
            continue
        ref = exact.merged[name]
        if got.dtype == torch.float32:
            differ += check_fp32(got, ref, exact.bands(name, U_WIDE), peft.contiguous())
        else:
            check_rounded(got, peft.contiguous(), ref, exact.bands(name, U32))
            differ += int((got != peft).sum())
    return differ


def _unchanged(ref: torch.Tensor, base_entry) -> bool:
    return ref.contiguous().view(torch.uint8).numpy().tobytes() == base_entry[3]


def _op(plan, name: str):
    return next(op for op in plan.merges if op.name == name)


def refusal(built: Built, out: Path, **kwargs) -> QwenMergeError:
    """Run a merge that must be refused; check the message is one line and nothing was written."""
    before = (tree_hash(built.base), tree_hash(built.adapter))
    with pytest.raises(QwenMergeError) as info:
        merge_shards(built.base, built.adapter, out, progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    assert not out.exists() and not any(out.parent.glob(f".{out.name}*")), "a refused merge wrote files"
    assert (tree_hash(built.base), tree_hash(built.adapter)) == before
    return info.value


# --------------------------------------------------------------------------------------------------
# The matrix


@pytest.mark.parametrize("name", list(CASES))
def test_peft_case(matrix, name):
    built = matrix.case(name)
    out = matrix.out()
    if name in REFUSED:
        error = refusal(built, out)
        assert isinstance(error, AdapterError)
        message = str(error)
        assert all(word in message for word in REFUSED[name]), message
        assert not any(hint in message for hint in RENAME_HINTS), f"misleading rename hint: {message}"
        if name in GROUPED:
            assert built.peft_error is not None, "PEFT merged a grouped convolution LoRA"
        return
    assert built.peft_error is None
    merge_shards(built.base, built.adapter, out, progress=False)  # anything but a QwenMergeError fails
    compare_with_peft(built, out)
    matrix.merged[name] = out


def test_matrix_is_complete():
    """All 46 LoraConfig rows of PEFT 0.21.2's TEST_CASES, with unique names."""
    assert len(LORA_CASES) == len(CASES) == 46
    assert set(REFUSED) <= set(CASES)


@pytest.mark.parametrize("threads, block_bytes", [(1, 256), (4, 4096)])
def test_fp32_bytes_do_not_move(matrix, threads, block_bytes):
    """Every merged fp32 case of the matrix gives the same bytes with 1 and 4 torch threads and with row
    blocks of a few rows (the GEMM kernels, and their summation order, change with both): an fp32 merge
    does not depend on how its products are computed."""
    merged = [name for name in CASES if name not in REFUSED]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in merged:
            built, out = matrix.case(name), matrix.out()
            if name not in matrix.merged:
                merge_shards(built.base, built.adapter, matrix.merged.setdefault(name, matrix.out()), progress=False)
            merge_shards(built.base, built.adapter, out, progress=False, block_bytes=block_bytes)
            assert checkpoint_tensors(out) == checkpoint_tensors(matrix.merged[name]), name
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Convolution LoRA


BF16_CASES = ["Conv1d LoRA", "Conv1d LoRA with DoRA", "Conv2d 2 LoRA", "Conv2d 2 LoRA with DoRA",
              "Conv3d 1 LoRA", "Conv3d 2 LoRA with DoRA", "Conv3d 1 LoRA with lora_b bias",
              "Embedding + transformers Conv1D 3 DoRA", "Vanilla MLP 8 LoRA with DoRA",
              "Vanilla MLP 11 LoRA with VeLoRA batch_average"]


@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_base_rounds_like_peft(matrix, name):
    """With a bf16 base (PEFT promotes the adapter to fp32), PEFT's convolution and VeLoRA merges add the
    fp32 delta in place and round once, as for Linear, and DoRA rounds its product once: the default
    rounding reproduces them."""
    built = matrix.case(name, torch.bfloat16)
    out = matrix.out()
    merge_shards(built.base, built.adapter, out, progress=False)
    compare_with_peft(built, out)


@pytest.mark.parametrize("name", ["Conv2d 1 LoRA with DoRA", "Conv3d 2 LoRA with DoRA", "Conv1d LoRA"])
def test_conv_streams_whole_filters_in_row_blocks(matrix, name):
    """A convolution weight (out, in, *k) is streamed as the matrix (out, in·prod(k)): one filter per row
    block gives the same bytes as one block for the whole tensor (fp32: the same on every host)."""
    built = matrix.case(name)
    plan = plan_merge(built.base, built.adapter)
    conv = next(op for op in plan.merges if op.pair.kind == "conv")
    assert ("conv dora r=8" if "DoRA" in name else "conv r=8") in render(plan, detail=True)
    assert conv.matrix == (conv.shape[0], torch.Size(conv.shape[1:]).numel())
    one_filter = 4 * conv.matrix[1]
    assert _op(plan_merge(built.base, built.adapter, block_bytes=one_filter), conv.name).block_rows == 1
    whole, blocks = matrix.out(), matrix.out()
    merge_shards(built.base, built.adapter, whole, progress=False)
    merge_shards(built.base, built.adapter, blocks, progress=False, block_bytes=one_filter)
    assert checkpoint_tensors(whole) == checkpoint_tensors(blocks)
    compare_with_peft(built, blocks)
    assert verify_merge(blocks, built.base, built.adapter, full=True, block_bytes=one_filter).ok


class PatchEmbed(nn.Module):
    """A Qwen-VL style patch embedding: Conv3d over (time, height, width) patches, no bias."""

    def __init__(self, kernel: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(3, 16, kernel, stride=kernel, bias=False)


def _patch_embed(kernel):
    def make():
        torch.manual_seed(0)
        return PatchEmbed(kernel)
    return make


def test_qwen_vl_patch_embedding(matrix):
    """The Conv3d patch embedding of Qwen VL vision towers (kernel = stride = (2, 14, 14) there)."""
    built = matrix.custom("patch embed (2,4,4)", _patch_embed((2, 4, 4)),
                          {"target_modules": ["proj"], "r": 4, "lora_alpha": 8})
    out = matrix.out()
    merge_shards(built.base, built.adapter, out, progress=False)
    compare_with_peft(built, out)


def test_conv3d_kernel_peft_crashes_on(matrix):
    """PEFT's 1x1 shortcut catches a Conv3d kernel (1, 1, k) and fails on its shape; qwen_merge computes
    ΔW[o, i, κ] = s·Σ_ρ B[o, ρ]·A[ρ, i, κ] and the merged layer computes what the unmerged adapter does."""
    from peft import PeftModel

    built = matrix.custom("conv3d (1,1,3)", _patch_embed((1, 1, 3)),
                          {"target_modules": ["proj"], "r": 4, "lora_alpha": 12})
    assert isinstance(built.peft_error, RuntimeError), built.peft_error
    out = matrix.out()
    merge_shards(built.base, built.adapter, out, progress=False)
    tensors = load_file(built.adapter / "adapter_model.safetensors")
    a, b = tensors[PREFIX + "proj.lora_A.weight"], tensors[PREFIX + "proj.lora_B.weight"]
    w = disk_tensors(built.base)["proj.weight"]
    expected = w.double() + 3.0 * torch.einsum("or,ri...->oi...", b.flatten(1).double(), a.double())
    terms = w.double().abs() + 3.0 * torch.einsum("or,ri...->oi...", b.flatten(1).double().abs(), a.double().abs())
    check_fp32(disk_tensors(out)["proj.weight"], expected, band(terms, 4, U_WIDE))

    unmerged = PeftModel.from_pretrained(_patch_embed((1, 1, 3))(), built.adapter)
    x = torch.randn(2, 3, 2, 4, 6)
    merged = _patch_embed((1, 1, 3))()
    merged.load_state_dict(disk_tensors(out))
    torch.testing.assert_close(merged.proj(x), unmerged.base_model.model.proj(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# What the matrix found besides convolutions


def test_mha_lora_is_what_peft_computes_twice(matrix):
    """Why MHA LoRA is refused rather than mapped onto in_proj_weight / out_proj.weight: PEFT's merged
    out_proj is W + 2·s·B@A (its unmerged forward agrees), which a rename of the keys cannot give."""
    built = matrix.case("MHA 1 LoRA")
    tensors, base = load_file(built.adapter / "adapter_model.safetensors"), disk_tensors(built.base)
    delta = {m: tensors[f"{PREFIX}{m}.lora_B.weight"] @ tensors[f"{PREFIX}{m}.lora_A.weight"]
             for m in ("mha", "mha.base_layer.out_proj")}  # alpha / r = 1
    ref = built.reference
    torch.testing.assert_close(ref["mha.in_proj_weight"], base["mha.in_proj_weight"] + delta["mha"])
    torch.testing.assert_close(ref["mha.out_proj.weight"],
                               base["mha.out_proj.weight"] + 2 * delta["mha.base_layer.out_proj"])
    renamed = {"mha.weight": "mha.in_proj_weight", "mha.base_layer.out_proj.": "mha.out_proj."}
    error = refusal(built, built.base.parent / "renamed", key_map=renamed)
    assert "MultiheadAttention" in str(error)


def test_velora_projection_needs_velora_config(matrix, tmp_path):
    """VeLoRA's projection vector only serves its training forward; without velora_config in the config
    the file does not say what it was trained with."""
    built = matrix.case("Vanilla MLP 10 LoRA with VeLoRA random")
    adapter = rewrite_adapter(built.adapter, tmp_path / "adapter", config=lambda config: config.pop("velora_config"))
    error = refusal(Built(built.base, adapter, None, None), tmp_path / "out")
    assert "lora_velora_embed" in str(error) and "velora_config" in str(error)


def test_mica_rounding_peft_is_peft_bit_for_bit(matrix):
    """PEFT merges MiCA as W + rnd_W(ΔW) (a second rounding, also in its default unsafe merge).
    rounding="peft" reproduces it bit for bit, except where ΔW's fp32 value lies within its arithmetic's
    error of a bf16 rounding boundary (there the host's GEMM decides); the default rounds fp32(W) + ΔW once,
    which differs in some elements."""
    built = matrix.case("Vanilla MLP 1 LoRA with MiCA", torch.bfloat16)
    peft_out, single_out = matrix.out(), matrix.out()
    plan = plan_merge(built.base, built.adapter, rounding="peft")
    assert [op.round_delta for op in plan.merges] == [True]
    assert "delta rounded to BF16 first" in render(plan, detail=True)
    merge_shards(built.base, built.adapter, peft_out, progress=False, rounding="peft")
    tensors = load_file(built.adapter / "adapter_model.safetensors")
    config = json.loads((built.adapter / "adapter_config.json").read_text())
    a, b = tensors[PREFIX + "lin0.lora_A.weight"].double(), tensors[PREFIX + "lin0.lora_B.weight"].double()
    scale = config["lora_alpha"] / config["r"]
    delta64 = scale * (b @ a)
    delta_band = band(scale * (b.abs() @ a.abs()), config["r"], U32)
    ours, peft = disk_tensors(peft_out)["lin0.weight"], built.reference["lin0.weight"]
    assert torch.equal(ours[~near_boundary(delta64, delta_band, torch.bfloat16)],
                       peft[~near_boundary(delta64, delta_band, torch.bfloat16)])
    merge_shards(built.base, built.adapter, single_out, progress=False)
    single = disk_tensors(single_out)["lin0.weight"]
    assert not torch.equal(single, peft)
    w = disk_tensors(built.base)["lin0.weight"]
    fp32_arithmetic = (w.float() + (b.float() @ a.float()) * scale).to(torch.bfloat16)
    check_rounded(single, fp32_arithmetic, w.double() + delta64, band(w.double().abs() + scale * (b.abs() @ a.abs()),
                                                                     config["r"], U32))


class Wide(nn.Module):
    """Rows wide enough (64 columns) that a one-row product sums differently from a matrix product in fp32;
    22, 40 and 16 rows leave one row over in blocks of 3."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.lin = nn.Linear(64, 22)
        self.emb = nn.Embedding(40, 64)
        self.conv1d = Conv1D(64, 16)  # stored (16, 64): rows are input features


def _wide_bf16() -> nn.Module:
    return Wide().to(torch.bfloat16)


@pytest.mark.parametrize("make_model, targets", [(Wide, ["lin", "emb", "conv1d"]), (_wide_bf16, ["lin", "conv1d"])],
                         ids=["fp32", "bf16"])
def test_a_block_of_one_row(matrix, make_model, targets):
    """A lone row is a vector-matrix product, whose fp32 sums differ from a matrix product's; the merge
    computes it inside a two-row product (bf16: PEFT's sums), and an fp32 merge of blocks of 3 rows, one
    left over, has the bytes of the whole-tensor merge (Linear, Embedding, GPT-2 Conv1D; PEFT rounds an
    embedding's bf16 delta twice, which rounding="single" does not follow)."""
    built = matrix.custom(f"wide {make_model.__name__}", make_model, {"target_modules": targets, "r": 8})
    block_bytes = 4 * 64 * 3
    plan = plan_merge(built.base, built.adapter, block_bytes=block_bytes)
    assert {op.name: (op.matrix[0] % op.block_rows, op.matrix[1]) for op in plan.merges} == {
        f"{target}.weight": (1, 64) for target in targets}
    out, whole = matrix.out(), matrix.out()
    merge_shards(built.base, built.adapter, out, progress=False, block_bytes=block_bytes)
    compare_with_peft(built, out)
    if make_model is Wide:
        merge_shards(built.base, built.adapter, whole, progress=False)
        assert checkpoint_tensors(out) == checkpoint_tensors(whole)
