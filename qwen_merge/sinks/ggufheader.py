"""The GGUF header in bytes: magic, version, counts, the metadata (key, type, value) and the tensor infos
(name, dimensions in ggml's order, type, offset in the data section), all little-endian, as GGUF version 3
defines them and the `gguf` package's writer lays them out.

Why not that writer: it packs array items one Python call at a time, and a Qwen vocabulary is 300,000
strings (tokens and merges): 2.6 s of a 20 s merge, before the first tensor can be written. Here a string
array is packed in one join and a number array in one `struct.pack`. The tests compare the files with the ones
llama.cpp's converter writes through that writer, so the two layouts cannot drift apart.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING


if TYPE_CHECKING:  # for annotations only
    from ..planning.ggufmeta import MetaField
    from ..planning.gguflayout import GGUFTensor

MAGIC, VERSION = b"GGUF", 3
TYPES = {"UINT8": 0, "INT8": 1, "UINT16": 2, "INT16": 3, "UINT32": 4, "INT32": 5, "FLOAT32": 6, "BOOL": 7,
         "STRING": 8, "ARRAY": 9, "UINT64": 10, "INT64": 11, "FLOAT64": 12}  # GGUF value types, by their codes
SCALARS = {"UINT8": "B", "INT8": "b", "UINT16": "H", "INT16": "h", "UINT32": "I", "INT32": "i", "FLOAT32": "f",
           "BOOL": "?", "UINT64": "Q", "INT64": "q", "FLOAT64": "d"}  # struct formats (little-endian below)


def header_bytes(arch: str, fields: Sequence[MetaField], tensors: Sequence[GGUFTensor],
                 ggml_types: dict[str, int]) -> bytes:
    """The header of a GGUF file: `general.architecture` = `arch` first (as the writer puts it), then
    `fields`, then the infos of `tensors` (offsets from the start of the data section)."""
    parts = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(fields) + 1),
             _string("general.architecture"), _value("STRING", arch)]
    for field in fields:
        parts += [_string(field.key), _value(field.kind, field.value, field.item_kind)]
    for t in tensors:
        dims = tuple(reversed(t.shape))  # ggml counts dimensions from the fastest-varying one
        parts += [_string(t.name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_types[t.ggml_type],
                                               t.offset)]
    return b"".join(parts)


def _value(kind: str, value: object, item_kind: str | None = None) -> bytes:
    """A typed value: its type code, then the value."""
    return struct.pack("<I", TYPES[kind]) + _payload(kind, value, item_kind)


def _payload(kind: str, value: object, item_kind: str | None) -> bytes:
    if kind in SCALARS:
        return struct.pack("<" + SCALARS[kind], value)
    if kind == "STRING":
        return _string(value)
    if kind != "ARRAY":
        raise ValueError(f"unknown GGUF value type {kind}")
    items = list(value)
    if not items:
        raise ValueError("a GGUF array cannot be empty")
    item_kind = item_kind or _kind_of(items[0])
    head = struct.pack("<IQ", TYPES[item_kind], len(items))
    if item_kind == "STRING":
        return head + _strings(items)
    if item_kind in SCALARS:
        return head + struct.pack(f"<{len(items)}{SCALARS[item_kind]}", *items)
    return head + b"".join(_payload(item_kind, i, None) for i in items)  # arrays of arrays: rare and small


def _kind_of(value: object) -> str:
    """The type the `gguf` writer gives an array's items when none is named."""
    if isinstance(value, str):
        return "STRING"
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT32"
    if isinstance(value, float):
        return "FLOAT32"
    return "ARRAY"


def _string(value: object) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return struct.pack("<Q", len(data)) + data


def _strings(values: Iterable[str]) -> bytes:
    pack = struct.Struct("<Q").pack
    return b"".join(pack(len(e)) + e for e in (v.encode("utf-8") for v in values))
