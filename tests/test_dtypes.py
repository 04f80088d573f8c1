"""The dtype vocabulary (`qwen_merge.dtypes`): every safetensors code has a width the format layer reads;
the output dtypes' names map to their codes and back, as torch and config.json spell them; F64 is a float an
output dtype converts but not one a LoRA delta merges into; the command line's --dtype reads the same table."""

from __future__ import annotations

import json

import pytest
import torch
from builders import in_process_cli, in_process_error_line, rewrite_checkpoint

from qwen_merge import MismatchError, OptionError, plan_merge
from qwen_merge.cli import _parser
from qwen_merge.compute.arithmetic import TORCH_DTYPES
from qwen_merge.dtypes import (CONFIG_DTYPE_KEYS, DTYPE_BITS, DTYPE_NAMES, DTYPE_OF_NAME, FLOATS, MERGEABLE_FLOATS,
                               NARROW_FLOATS, OUTPUT_DTYPES, dtype_choices, dtype_name, output_dtype)
from qwen_merge.inputs.tensorfile import TensorEntry, encode_header, read_header

NORM = "model.norm.weight"
TARGET = "model.layers.0.self_attn.q_proj.weight"  # a LoRA target of the demo adapter


def test_every_code_has_a_width_the_format_layer_reads(tmp_path):
    entries, offset = [], 0
    for code, bits in DTYPE_BITS.items():
        entries.append(TensorEntry(code.lower(), code, (8,), offset, offset + bits))  # 8 elements: `bits` bytes
        offset += bits
    path = tmp_path / "every.safetensors"
    path.write_bytes(encode_header(entries, {"format": "pt"}) + bytes(offset))
    assert [(e.dtype, e.nbytes) for e in read_header(path).entries] == [(c, b) for c, b in DTYPE_BITS.items()]


def test_torch_dtypes_are_keyed_by_the_same_codes_and_widths():
    assert TORCH_DTYPES.keys() <= DTYPE_BITS.keys()
    for code, dtype in TORCH_DTYPES.items():
        assert dtype.itemsize * 8 == DTYPE_BITS[code], code


def test_the_float_sets_and_f64():
    """FLOATS are torch's floats of 16 bits and more (F64 among them); MERGEABLE_FLOATS leaves F64 out; the
    narrow floats are the 4, 6 and 8 bit ones; every output dtype is one a delta merges into."""
    floats = {code for code, dtype in TORCH_DTYPES.items() if dtype.is_floating_point}
    assert FLOATS == {code for code in floats if DTYPE_BITS[code] >= 16} and "F64" in FLOATS
    assert MERGEABLE_FLOATS == FLOATS - {"F64"}
    assert floats - FLOATS <= NARROW_FLOATS and not NARROW_FLOATS & FLOATS
    assert NARROW_FLOATS == {"F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
    assert set(OUTPUT_DTYPES) <= MERGEABLE_FLOATS


def test_output_names_map_both_ways():
    assert set(OUTPUT_DTYPES) == DTYPE_NAMES.keys()
    assert len(DTYPE_OF_NAME) == sum(len(names) for names in DTYPE_NAMES.values())  # no name means two dtypes
    for code, names in DTYPE_NAMES.items():
        torch_dtype = getattr(torch, dtype_name(code))  # the first name is torch's (and config.json's)
        assert str(torch_dtype) == f"torch.{dtype_name(code)}" and TORCH_DTYPES[code] == torch_dtype
        for name in (code, code.lower(), *names, *(n.upper() for n in names), torch_dtype, str(torch_dtype)):
            assert output_dtype(name) == code, name
        assert all(DTYPE_OF_NAME[name] == code for name in names)
    for wrong in ("F64", "int8", "fp8", "", "torch.float64"):
        with pytest.raises(ValueError, match=rf"^{wrong!r} is not an output dtype; expected one of "):
            output_dtype(wrong)
        with pytest.raises(OptionError, match=rf"^dtype: {wrong!r} is not an output dtype"):
            plan_merge("unused", "unused", dtype=wrong)


def test_the_command_line_dtype_help_comes_from_the_table():
    help_text = " ".join(_parser()[1]["merge"].format_help().split())
    assert dtype_choices() in help_text
    assert all(name in help_text for code, names in DTYPE_NAMES.items() for name in (code, *names))


@pytest.fixture(scope="module")
def f64_bases(demo_inputs, tmp_path_factory):
    """The demo base with its final norm in float64, and with a LoRA target in float64."""
    base, adapter = demo_inputs
    root = tmp_path_factory.mktemp("f64")

    def widen(name):
        return lambda shard, tensors: {k: v.double() if k == name else v for k, v in tensors.items()}

    return rewrite_checkpoint(base, root / "norm", widen(NORM)), rewrite_checkpoint(base, root / "target",
                                                                                  widen(TARGET)), adapter


def test_an_f64_tensor_is_converted_by_an_output_dtype(f64_bases, capsys):
    norm, _, adapter = f64_bases
    plan = plan_merge(norm, adapter, dtype="bf16")
    assert [(op.source.entry.dtype, op.dtype) for op in plan.ops if op.name == NORM] == [("F64", "BF16")]
    proc = in_process_cli(capsys, "plan", norm, adapter, "--dtype", "float16", "--json")
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    tensor = next(t for t in document["tensors"] if t["name"] == NORM)
    assert (tensor["action"], tensor["dtype"], tensor["source"]["dtype"]) == ("convert", "F16", "F64")
    assert document["config"][CONFIG_DTYPE_KEYS[1]] == "float16"  # the demo's config has torch_dtype
    assert NORM not in {op.name for op in plan_merge(norm, adapter).ops}  # without one it is copied as it is


def test_an_f64_weight_takes_no_lora_delta(f64_bases, capsys):
    _, target, adapter = f64_bases
    says = f"{adapter / 'adapter_model.safetensors'}: {TARGET}: base dtype F64 cannot take a LoRA delta; " \
           f"expected BF16, F16 or F32"
    with pytest.raises(MismatchError) as info:
        plan_merge(target, adapter)
    assert str(info.value) == says
    assert in_process_error_line(in_process_cli(capsys, "plan", target, adapter)) == f"error: {says}"
