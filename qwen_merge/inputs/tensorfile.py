"""The safetensors format, and nothing else: parse and validate a header, encode one.

A file is `u64 LE N` + `N` bytes of JSON + the data buffer. Tensors are described by coordinates only
(`TensorEntry`); reading bytes is the caller's job. Validation follows the Rust reference reader
(the `safetensors` crate) and is stricter in one place: duplicate JSON keys are rejected.
"""

from __future__ import annotations

import json
import math
import operator
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import DTYPE_BITS
from ..errors import FormatError

MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor lives: offsets are relative to the start of the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class TensorFile:
    """A parsed safetensors file: entries in data order, plus where the data buffer starts."""

    path: Path
    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str] | None
    data_offset: int
    size: int
    header: bytes = b""  # the file's first `data_offset` bytes as read: length prefix and JSON

    def entry_map(self) -> dict[str, TensorEntry]:
        return {e.name: e for e in self.entries}


def read_header(path: str | os.PathLike) -> TensorFile:
    """Parse and validate the header of a safetensors file, reading only the header bytes.

    Raises:
        FormatError: with one line naming the file and the rule it breaks.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise FormatError(f"{path}: not a safetensors file: {size} bytes, the 8-byte header length is missing")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"{path}: header length {n} exceeds the format limit of {MAX_HEADER_BYTES} bytes")
            if 8 + n > size:
                raise FormatError(f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_header(path, prefix + raw, size)


def parse_header(path: Path, header_bytes: bytes, size: int) -> TensorFile:
    """Parse the first bytes of a safetensors file of `size` bytes (the 8-byte length and the JSON it
    announces; a remote file's header arrives this way, without the data).

    Raises:
        FormatError: with one line naming `path` and the rule it breaks.
    """
    if len(header_bytes) < 8:
        raise FormatError(f"{path}: not a safetensors file: the 8-byte header length is missing")
    (n,) = struct.unpack("<Q", header_bytes[:8])
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: header length {n} exceeds the format limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > size or len(header_bytes) < 8 + n:
        raise FormatError(f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?)")
    prefix, raw = header_bytes[:8], header_bytes[8:8 + n]
    header = _decode_json(path, raw)
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    entries = [_parse_entry(path, k, v) for k, v in header.items()]
    entries.sort(key=_DATA_ORDER)
    _check_tiling(path, entries, size - 8 - n)
    return TensorFile(path, tuple(entries), metadata, 8 + n, size, prefix + raw)


_DATA_ORDER = operator.attrgetter("start", "end")


def _decode_json(path: Path, raw: bytes) -> dict:
    def no_duplicates(pairs: list) -> dict:
        found = dict(pairs)
        if len(found) != len(pairs):  # the reference reader keeps the last value; a header this odd is refused
            keys = [k for k, _ in pairs]
            dup = next(k for k in keys if keys.count(k) > 1)
            raise FormatError(f"{path}: header names tensor {dup!r} twice")
        return found

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: header is not UTF-8 (byte {e.start})") from e
    try:
        header = json.loads(text)
        # A repeated tensor name would silently keep its last entry. Every entry has one "data_offsets"
        # key, and quotes inside names are escaped, so the count tells without a Python hook per object.
        if isinstance(header, dict) and text.count('"data_offsets"') != len(header) - ("__metadata__" in header):
            header = json.loads(text, object_pairs_hook=no_duplicates)  # finds the repeated name
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: header is not valid JSON: {e.msg} at char {e.pos}") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object, found {type(header).__name__}")
    return header


def _check_metadata(path: Path, meta: object) -> dict[str, str] | None:
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings, found {json.dumps(meta)[:80]}")
    return dict(meta)


def _parse_entry(path: Path, name: str, info: object) -> TensorEntry:
    # The common case, checked with plain comparisons: a checkpoint has thousands of entries to vouch for.
    if type(info) is dict and len(info) == 3:
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype in DTYPE_BITS and type(shape) is list and type(offsets) is list and len(offsets) == 2:
            begin, end = offsets
            if type(begin) is int and type(end) is int and 0 <= begin <= end:
                count = 1
                for d in shape:
                    if type(d) is not int or d < 0:
                        break
                    count *= d
                else:
                    bits = count * DTYPE_BITS[dtype]
                    if bits % 8 == 0 and bits // 8 == end - begin:
                        return TensorEntry(name, dtype, tuple(shape), begin, end)
    return _refuse_entry(path, name, info)


def _refuse_entry(path: Path, name: str, info: object) -> TensorEntry:
    """The full checks, one message per broken rule (an entry may also carry extra keys, as some writers add)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise FormatError(f"{where}: entry must be an object, found {type(info).__name__}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise FormatError(f"{where}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape must be a list of non-negative integers, found {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise FormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, found {offsets!r}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise FormatError(f"{where}: shape {shape} of {dtype} needs {bits / 8:g} bytes "
                          f"but data_offsets span {offsets[1] - offsets[0]}")
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(path: Path, entries: list[TensorEntry], data_len: int) -> None:
    cursor = 0
    for e in entries:
        if e.start != cursor:
            what = "overlaps the previous tensor" if e.start < cursor else f"leaves a hole at byte {cursor}"
            raise FormatError(f"{path}: tensor {e.name!r} at data offset {e.start} {what}")
        cursor = e.end
    if cursor > data_len:
        past = next(e for e in entries if e.end > data_len)
        raise FormatError(f"{path}: file is truncated: tensor {past.name!r} ends at data byte {past.end}, "
                          f"the file holds {data_len}")
    if cursor < data_len:
        raise FormatError(f"{path}: file has trailing bytes: tensors cover {cursor} data bytes, the file holds "
                          f"{data_len}")


def encode_header(entries: list[TensorEntry] | tuple[TensorEntry, ...], metadata: dict[str, str],
                  pad_to: int = 0) -> bytes:
    """Encode `u64 N` + JSON header, space-padded to `pad_to` bytes when it fits, else to a multiple of 8.

    Entries keep the given order and offsets; `__metadata__` comes first, as the reference writer does.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.start, e.end]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Matching the source's header length keeps every data offset, so untouched spans stay aligned
    # with the source (reflink-friendly); otherwise pad to 8 as the reference writer does.
    length = pad_to if pad_to >= len(raw) else len(raw) + (-len(raw) % 8)
    return struct.pack("<Q", length) + raw.ljust(length, b" ")
