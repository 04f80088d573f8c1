"""The safetensors layer: our header encoding reads back in the reference library, and every
validation rule of format-io.md §1.3 produces a one-line FormatError naming the file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen_merge.errors import FormatError
from qwen_merge.inputs.tensorfile import TensorEntry, encode_header, read_header


def test_reads_reference_writer_output(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"big": torch.zeros(2, 3), "small": torch.ones(3, dtype=torch.float16)}, path, metadata={"format": "pt"})
    tf = read_header(path)
    assert tf.metadata == {"format": "pt"}
    assert [(e.name, e.dtype, e.shape, e.nbytes) for e in tf.entries] == [("big", "F32", (2, 3), 24),
                                                                          ("small", "F16", (3,), 6)]
    assert tf.data_offset + tf.entries[-1].end == tf.size


def test_golden_header_bytes_and_reference_reads_them(tmp_path):
    entries = [TensorEntry("x", "I32", (2, 2), 0, 16)]
    header = encode_header(entries, {"format": "pt"})
    raw = b'{"__metadata__":{"format":"pt"},"x":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}'
    assert header == struct.pack("<Q", 88) + raw.ljust(88, b" ")
    path = tmp_path / "g.safetensors"
    path.write_bytes(header + struct.pack("<4i", 1, 2, 3, 4))
    with safe_open(path, "pt") as f:
        assert f.get_tensor("x").tolist() == [[1, 2], [3, 4]]
        assert f.metadata() == {"format": "pt"}


def test_pad_to_keeps_source_offsets():
    entries = [TensorEntry("x", "F32", (1,), 0, 4)]
    assert len(encode_header(entries, {"format": "pt"}, pad_to=203)) == 8 + 203


def _file(tmp_path, header: object, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None):
    body = raw if raw is not None else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD = {
    "header past end": (dict(header={}, length=10_000), "runs past the end"),
    "header over limit": (dict(header={}, length=100_000_001), "exceeds the format limit"),
    "not utf8": (dict(raw=b"\xff\xfe{}"), "not UTF-8"),
    "not json": (dict(raw=b"{nope"), "not valid JSON"),
    "not object": (dict(raw=b"[1,2]"), "must be a JSON object"),
    "unknown dtype": (dict(header={"t": entry(dtype="Q7")}, data=b"\0" * 8), "unknown dtype 'Q7'"),
    "negative dim": (dict(header={"t": entry(shape=(-2,))}, data=b"\0" * 8), "non-negative integers"),
    "size mismatch": (dict(header={"t": entry(shape=(3,))}, data=b"\0" * 8), "needs 12 bytes"),
    "hole": (dict(header={"t": entry(offsets=(4, 12))}, data=b"\0" * 12), "leaves a hole"),
    "overlap": (dict(header={"a": entry(), "b": entry(offsets=(4, 12))}, data=b"\0" * 12), "overlaps"),
    "trailing": (dict(header={"t": entry()}, data=b"\0" * 9), "trailing bytes"),
    "truncated": (dict(header={"t": entry()}, data=b"\0" * 7), "is truncated"),
    "bad metadata": (dict(header={"__metadata__": {"a": 1}}), "__metadata__"),
    "bad offsets": (dict(header={"t": entry(offsets=(8, 0))}, data=b""), "data_offsets"),
    "overflowing product": (dict(header={"t": entry(shape=(2**62, 2**62))}, data=b"\0" * 8), "needs"),
    "duplicate": (dict(raw=b'{"t":' + json.dumps(entry()).encode() + b',"t":' + json.dumps(entry()).encode() + b"}",
                       data=b"\0" * 8), "twice"),
}


def test_file_shorter_than_the_length_prefix(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\0\0")
    with pytest.raises(FormatError, match="8-byte header length is missing"):
        read_header(path)


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_headers_are_one_line_format_errors(tmp_path, case):
    kwargs, expected = BAD[case]
    header = kwargs.pop("header", None)
    path = _file(tmp_path, header, **kwargs)
    with pytest.raises(FormatError) as err:
        read_header(path)
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message
