"""The dtypes, in one vocabulary: the safetensors codes every module stores and compares (`"BF16"`), their
widths, which of them are floats, the dtypes an output can be converted to, and the names people and
config.json give those (`bfloat16`, `bf16`, `torch.bfloat16`).

No torch and no numpy: the torch dtype of each code is `compute.arithmetic.TORCH_DTYPES`, keyed by these
same codes.
"""

from __future__ import annotations

# Every dtype code a safetensors header may carry, and its width in bits (F4 and the F6s pack below a byte).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# The floats of 16 bits and more: the tensors an output dtype converts, and whose differences verify counts
# in units in the last place (one sign bit, then bits whose order is the values' order).
FLOATS = frozenset({"BF16", "F16", "F32", "F64"})
# The floats a merge computes with: the adapter's tensors, and the base tensors that take a delta or are
# replaced by an adapter's tensor. PEFT saves adapters in these, and the merge's fp32 arithmetic rounds once
# into each. F64 is not one of them: the merge computes in fp32 (float64 only to round an fp32 result
# exactly), so a float64 result would claim digits that arithmetic does not have.
MERGEABLE_FLOATS = frozenset({"BF16", "F16", "F32"})
# The floats of 4, 6 and 8 bits: quantized formats, stored beside block scales; converting one to an output
# dtype needs its scale.
NARROW_FLOATS = frozenset(code for code, bits in DTYPE_BITS.items() if code.startswith("F") and bits <= 8)

# The dtypes an output can be converted to (`--dtype`, `dtype=`), and the other names each is given; the
# first is torch's and config.json's. Case does not matter, and torch's own spelling (`torch.bfloat16`)
# works too. The command line's --dtype, its help and the errors read this table.
DTYPE_NAMES: dict[str, tuple[str, ...]] = {
    "BF16": ("bfloat16", "bf16"), "F16": ("float16", "fp16", "half"), "F32": ("float32", "fp32", "float"),
}
OUTPUT_DTYPES = tuple(DTYPE_NAMES)
DTYPE_OF_NAME = {name: code for code, names in DTYPE_NAMES.items() for name in names}  # "bf16" -> "BF16"
# config.json's fields that name the model's dtype: transformers writes `dtype`, older versions `torch_dtype`.
CONFIG_DTYPE_KEYS = ("dtype", "torch_dtype")


def dtype_name(code: str) -> str:
    """"BF16" -> "bfloat16": the name torch and config.json give an output dtype."""
    return DTYPE_NAMES[code][0]


def output_dtype(name: object) -> str:
    """"bfloat16" / "bf16" / "BF16" / torch.bfloat16 -> "BF16".

    Raises:
        ValueError: `name` names no output dtype.
    """
    text = str(name).removeprefix("torch.")
    if text.upper() in DTYPE_NAMES:
        return text.upper()
    if text.lower() in DTYPE_OF_NAME:
        return DTYPE_OF_NAME[text.lower()]
    raise ValueError(f"{name!r} is not an output dtype; expected one of {dtype_choices()}")


def dtype_choices() -> str:
    """The accepted output dtype names, for help texts and errors: `bfloat16 (bf16, BF16), ...`."""
    return ", ".join(f"{names[0]} ({', '.join((*names[1:], code))})" for code, names in DTYPE_NAMES.items())
