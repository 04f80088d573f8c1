"""Float64 references for merged tensors, and comparisons with them that hold on every host.

A merge's fp32 arithmetic depends on the host: a GEMM sums in the order its kernel picks, and that order
changes with the CPU, the thread count and the shapes. So tests never assert one host's fp32 bits. They
compare with PEFT's own merge run in float64 (`merged64`), under bounds derived from the arithmetic:

* `band32`: how far any fp32 evaluation of PEFT's formula, `fl32(W + fl32(fl32(B @ A) · fl32(s)))` (and
  DoRA's `m / ‖V‖ · V` on top), can lie from the float64 value, element by element. For a dot product of
  length r, |fl(x) − x| ≤ γ_r · Σ|B_ik·A_kj| with γ_r ≈ r·u; the scale, its fp32 rounding and the add each
  add u·(their operands). `magnitudes64` gives the Σ|…| terms: the same PEFT merge of |W|, |A|, |B|.
* An output rounded to bf16/fp16 must then equal PEFT's merge wherever the whole band rounds to one value
  (no rounding boundary inside it: the result is the same on every host), and may differ by one unit in the
  last place only where a boundary lies inside it (`near_boundary`).
* An fp32 output, which qwen_merge computes in float64 from an exact product, must be the float64 value
  rounded once: within half a unit in the last place of it, plus the float64 band (`band64`), and no
  further from it than PEFT's own fp32 merge, beyond that band.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

U32, U64 = 2.0 ** -24, 2.0 ** -53
# qwen_merge's fp32 outputs drop the bits of a factor more than 2ρ ≥ 42 bits below its vector's largest
# (compute.widen); a float64 band of 2^-40 of the terms covers that, every float64 rounding of both sides,
# and still lies far below fp32's resolution (2^-24).
U_WIDE = 2.0 ** -40


def merged64(make_model, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload() of the model built by `make_model`, in float64: every weight and every
    adapter tensor promoted exactly, so the result is the merge's value to float64 precision."""
    from peft import PeftModel

    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("init_lora_weights") == "mica":  # PEFT refuses to initialise MiCA in float64; its merge is
        with tempfile.TemporaryDirectory() as scratch:  # a plain LoRA delta
            plain = _copy_adapter(adapter, Path(scratch) / "adapter")
            _edit_config(plain, init_lora_weights=True)
            return merged64(make_model, plain)
    model = make_model().to(torch.float64)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    return {name: value.detach() for name, value in merged.items()}


def _copy_adapter(adapter: Path, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(adapter, folder)
    return folder


def _edit_config(adapter: Path, **fields) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def magnitudes64(make_model, adapter: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """|W| + |s|·Σ_k |B_ik|·|A_kj| per element (and |value| for what the adapter replaces): the same PEFT
    merge, in float64, of the absolute values of every weight and adapter tensor, without DoRA's norm."""
    folder = _copy_adapter(adapter, scratch / "magnitudes")
    weights = folder / "adapter_model.safetensors"
    save_file({k: v.abs() for k, v in load_file(weights).items()
               if not k.endswith("lora_magnitude_vector")}, weights, metadata={"format": "pt"})
    config = json.loads((folder / "adapter_config.json").read_text())
    _edit_config(folder, use_dora=False, lora_alpha=abs(config.get("lora_alpha", 8)),
                 alpha_pattern={k: abs(v) for k, v in (config.get("alpha_pattern") or {}).items()})

    def absolute():
        model = make_model().to(torch.float64)
        with torch.no_grad():
            for p in model.parameters():
                p.abs_()
        return model

    return merged64(absolute, folder)


@dataclass(frozen=True)
class Exact:
    """PEFT's merge in float64 (`merged`), the magnitudes of its terms (`terms`), the merge without DoRA's
    norm (`plain`; None when the adapter has no DoRA), and the largest rank."""

    merged: dict[str, torch.Tensor]
    terms: dict[str, torch.Tensor]
    plain: dict[str, torch.Tensor] | None
    rank: int

    @classmethod
    def of(cls, make_model, adapter: Path) -> Exact:
        """`make_model()` builds the base model as stored (any dtype); the adapter folder is only read."""
        config = json.loads((adapter / "adapter_config.json").read_text())
        with tempfile.TemporaryDirectory(prefix="exact-") as scratch:
            plain = None
            if config.get("use_dora"):
                folder = _copy_adapter(adapter, Path(scratch) / "plain")
                _edit_config(folder, use_dora=False)
                plain = merged64(make_model, folder)
            return cls(merged64(make_model, adapter), magnitudes64(make_model, adapter, Path(scratch)), plain,
                       max_rank(adapter))

    def bands(self, name: str, unit: float) -> torch.Tensor:
        """`band` for tensor `name`: unit U32 for fp32 arithmetic, U_WIDE for qwen_merge's float64."""
        merged, plain = self.merged[name], self.plain and self.plain[name]
        dora = (merged, plain) if plain is not None and not torch.equal(merged, plain) else None
        return band(self.terms[name], self.rank, unit, dora)


def max_rank(adapter: Path) -> int:
    config = json.loads((adapter / "adapter_config.json").read_text())
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


def band(terms: torch.Tensor, rank: int, unit: float, dora: tuple[torch.Tensor, torch.Tensor] | None = None
         ) -> torch.Tensor:
    """How far an evaluation with unit roundoff `unit` can lie from the exact merge, per element.

    `terms` is `magnitudes64`'s value. For LoRA: (r + 4)·unit·terms (the dot product, the scale's own
    rounding and its product, the add). With DoRA, `dora` = (the DoRA merge, V = the same merge without
    DoRA), both float64: out = f·V with f = m / ‖V‖ per row or column; an error δ in V moves the norm by at
    most ‖δ‖ (along either axis: the larger ratio is taken, so the axis need not be known) and the norm's
    own sum by (n + 4)·unit relative."""
    band_v = (rank + 4) * unit * terms
    if dora is None:
        return band_v
    out, v = dora
    n = max(v.shape)
    ratio = max(float(_axis_ratio(band_v, v, axis)) for axis in (0, 1)) if v.dim() > 1 else \
        float(band_v.norm() / v.norm())
    f = (out / v).abs().nan_to_num(nan=0.0, posinf=0.0)
    f = torch.where(v == 0, f.max(), f)
    return f * (band_v + v.abs() * (ratio + (n + 4) * unit)) + unit * out.abs()


def _axis_ratio(band_v: torch.Tensor, v: torch.Tensor, axis: int) -> torch.Tensor:
    """The largest ‖band‖ / ‖V‖ over the rows (axis 0) or the columns (axis 1) of the matrix view."""
    dim = 1 if axis == 0 else 0
    return (band_v.flatten(1).norm(dim=dim) / v.flatten(1).norm(dim=dim)).nan_to_num(nan=0.0).max()


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at |x| (toward larger magnitudes), as float64."""
    a = x.abs()
    return (torch.nextafter(a, torch.tensor(float("inf"), dtype=x.dtype)) - a).to(torch.float64)


def check_fp32(ours: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, peft: torch.Tensor | None = None) -> int:
    """An fp32 output is the float64 merge rounded once: within half an ulp of `ref` plus `tol` (the float64
    band), and no further from `ref` than PEFT's fp32 merge, beyond `tol`. Returns the count of elements
    where PEFT's merge differs from ours (0 without `peft`)."""
    assert ours.dtype == torch.float32
    err = (ours.to(torch.float64) - ref).abs()
    bad = err > ulp(ours) / 2 + tol
    assert not bad.any(), _worst("not the float64 merge rounded once", ours, ref, err, bad)
    if peft is None:
        return 0
    worse = err > (peft.to(torch.float64) - ref).abs() + tol
    assert not worse.any(), _worst("further from the float64 merge than PEFT", ours, ref, err, worse)
    return int((ours != peft).sum())


def near_boundary(ref: torch.Tensor, width: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elements whose interval [ref − width, ref + width] holds a rounding boundary of `dtype`: where the
    order of a sum can decide the rounded value. torch rounds float64 to bf16/fp16 through fp32, so the
    interval is widened by 2^-22 of |ref| to cover that second rounding."""
    wide = width + ref.abs() * 2.0 ** -22
    return (ref - wide).to(dtype) != (ref + wide).to(dtype)


def check_rounded(ours: torch.Tensor, peft: torch.Tensor, ref: torch.Tensor, width: torch.Tensor) -> int:
    """A bf16/fp16 output equals PEFT's merge wherever no rounding boundary lies within `width` (the fp32
    band) of the float64 merge; elsewhere it may be either neighbour. Returns the count of such elements."""
    assert ours.dtype == peft.dtype and ours.shape == peft.shape
    boundary = near_boundary(ref, width, ours.dtype)
    differ = ours != peft
    assert not (differ & ~boundary).any(), _worst("differs from PEFT away from any rounding boundary", ours,
                                                  ref, (ours.to(torch.float64) - ref).abs(), differ & ~boundary)
    wide = width + ref.abs() * 2.0 ** -22
    low, high = (ref - wide).to(ours.dtype), (ref + wide).to(ours.dtype)
    outside = (ours < low) | (ours > high)
    assert not outside.any(), _worst("outside the rounding of the fp32 band", ours, ref,
                                     (ours.to(torch.float64) - ref).abs(), outside)
    return int(boundary.sum())


def _worst(what: str, ours: torch.Tensor, ref: torch.Tensor, err: torch.Tensor, mask: torch.Tensor) -> str:
    index = int(torch.where(mask.flatten(), err.flatten(), torch.zeros(())).argmax())
    return (f"{what}: {int(mask.sum())} of {mask.numel()} elements; worst at flat index {index}: "
            f"ours {float(ours.flatten()[index])!r}, float64 {float(ref.flatten()[index])!r}")
