"""Our conversion of rows to GGUF types is the `gguf` package's, bit for bit: the package's numpy quantizer
(the one llama.cpp's converter calls) is the reference, on values chosen to hit every rounding rule."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # noqa: F401 - the optional extra; the test extra installs it

from qwen_merge.compute.ggufquant import encode  # noqa: E402

QTYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
          "BF16": gguf.GGMLQuantizationType.BF16, "Q8_0": gguf.GGMLQuantizationType.Q8_0}
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def hard_values(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows at several scales, with the cases rounding rules differ on: exact halves for Q8_0
    (a block's max is 127 steps), zeros (a zero block), f16 overflow and subnormals, ties for bf16."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 3, rows).unsqueeze(1)
    x[0] = 0
    x[1, :32] = torch.arange(32) - 15.5  # Q8_0 halves: max 16.5 -> steps of 16.5/127
    x[1, 32:64] = torch.tensor([127.0, -63.5] * 16) / 127
    x[2, :8] = torch.tensor([70000.0, -70000.0, 1e-7, -3e-8, 6e-5, 65504.0, 65520.0, -0.0])
    x[3] = 1 + torch.arange(cols) * 2 ** -8  # bf16 ties: 1 + k/256 sits between bf16 neighbours
    return x.to(dtype)


@pytest.mark.parametrize("source", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("ggml_type", ["F32", "F16", "BF16", "Q8_0"])
def test_rows_convert_as_the_gguf_package_converts_them(source, ggml_type):
    x = hard_values(12, 96, TORCH[source])
    ours = b"".join(encode(memoryview(x.contiguous().view(torch.uint8).numpy()).cast("B"), source, 96, ggml_type))
    reference = gguf.quants.quantize(x.to(torch.float32).numpy(), QTYPES[ggml_type])
    assert ours == reference.tobytes()


def test_nan_is_kept_quiet_with_its_top_bits_as_the_converter_does():
    bits = torch.tensor([0x7F81, 0xFF81, 0x7FC1, 0x3F80] * 8, dtype=torch.int32).to(torch.int16)  # sNaN, quiet, 1.0
    ours = b"".join(encode(memoryview(bits.view(torch.uint8).numpy()).cast("B"), "BF16", 32, "BF16"))
    reference = gguf.quants.quantize(bits.view(torch.bfloat16).to(torch.float32).numpy(),
                                     gguf.GGMLQuantizationType.BF16)
    assert ours == reference.tobytes()
    f32 = torch.tensor([float("nan"), -float("nan"), 1.5] * 32, dtype=torch.float32)
    f32.view(torch.int32)[0] = 0x7F800123  # a signalling NaN with low payload bits
    ours = b"".join(encode(memoryview(f32.view(torch.uint8).numpy()).cast("B"), "F32", 96, "BF16"))
    assert ours == gguf.quants.quantize(f32.numpy(), gguf.GGMLQuantizationType.BF16).tobytes()
    assert np.frombuffer(ours, np.uint16)[0] == 0x7FC0  # quiet bit set, payload's top bits kept


def test_a_value_that_becomes_inf_in_f16_is_refused_when_asked(monkeypatch):
    from qwen_merge.compute import ggufquant
    from qwen_merge.errors import NonFiniteError

    x = torch.ones(4, 32)
    x[2, 5] = 70000.0
    data = memoryview(x.view(torch.uint8).numpy()).cast("B")
    with pytest.raises(NonFiniteError, match="65504"):
        b"".join(encode(data, "F32", 32, "F16", finite=True))
    assert np.isinf(np.frombuffer(b"".join(encode(data, "F32", 32, "F16")), np.float16)).sum() == 1
    x[2, 5] = float("inf")  # already Inf before the conversion: not the conversion's doing
    b"".join(encode(memoryview(x.view(torch.uint8).numpy()).cast("B"), "F32", 32, "F16", finite=True))
    monkeypatch.setattr(ggufquant, "CHUNK_VALUES", 32)  # one row per part: the parts join to the same bytes
    y = hard_values(6, 64, torch.bfloat16)
    raw = memoryview(y.view(torch.uint8).numpy()).cast("B")
    parts = list(encode(raw, "BF16", 64, "Q8_0"))
    assert len(parts) == 6
    assert [len(p) for p in parts] == [68] * 6  # flat bytes: the sink advances its file offset by len()
    assert b"".join(parts) == gguf.quants.quantize(y.float().numpy(), QTYPES["Q8_0"]).tobytes()


def test_q8_0_rounds_halves_away_from_zero_and_values_just_below_them_down():
    """A block whose largest magnitude is 127 has scale 1, so its values are rounded as they are: the
    halves, and the floats just below and above them, are where rounding rules differ."""
    below_half = np.nextafter(np.float32(0.5), np.float32(0))
    values = [127.0, 0.5, -0.5, 1.5, 2.5, 126.5, -126.5, float(below_half), -float(below_half),
              float(np.nextafter(np.float32(2.5), np.float32(0))), float(np.nextafter(np.float32(2.5), np.float32(3))),
              float(np.nextafter(np.float32(126.5), np.float32(0))), 0.0, -0.0, 3.0, 64.5]
    x = torch.tensor((values * 2)[:32], dtype=torch.float32).reshape(1, 32)
    ours = b"".join(encode(memoryview(x.view(torch.uint8).numpy()).cast("B"), "F32", 32, "Q8_0"))
    assert ours == gguf.quants.quantize(x.numpy(), QTYPES["Q8_0"]).tobytes()
    assert list(np.frombuffer(ours[2:18], np.int8)) == [127, 1, -1, 2, 3, 127, -127, 0, 0, 2, 3, 126, 0, 0, 3, 65]
