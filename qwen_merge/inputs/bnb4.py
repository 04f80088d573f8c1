"""The per-weight JSON of a bitsandbytes 4-bit checkpoint, read from its shards.

transformers' `save_pretrained` of a `load_in_4bit` model stores beside each quantized weight `X.weight` a
tensor `X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): a JSON document stored as uint8 bytes, which
gives the weight's logical shape, dtype, block size and (with double quantization) the nested block size
and offset. The planner needs the shape before it can lay out the output, so these small tensors are read
here, once, when a base says it is bitsandbytes 4-bit; everything else comes from headers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import FormatError
from .checkpoint import Checkpoint
from .sources import read_exact

STATE_MARK = ".quant_state.bitsandbytes__"  # X.weight + this + "nf4" | "fp4"
QUANT_TYPES = ("nf4", "fp4")
MAX_STATE_BYTES = 1 << 16  # a quant_state is ~200 bytes of JSON; anything far larger is not one


@dataclass(frozen=True, slots=True)
class QuantState:
    """What the JSON says of one 4-bit weight: `quant_type` ("nf4" or "fp4"), values per absmax block,
    the weight's dtype when it was quantized, its logical shape, and for double quantization the nested
    block size and the offset added to every dequantized absmax (None without)."""

    quant_type: str
    blocksize: int
    dtype: str
    shape: tuple[int, ...]
    nested_blocksize: int | None = None
    nested_offset: float | None = None

    @property
    def nested(self) -> bool:
        return self.nested_blocksize is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def state_names(names: Iterable[str]) -> dict[str, str]:
    """weight name -> the name of its quant_state tensor, for every quant_state among `names`."""
    found = {}
    for name in names:
        weight, mark, kind = name.partition(STATE_MARK)
        if mark and kind in QUANT_TYPES:
            found[weight] = name
    return found


def read_quant_states(base: Checkpoint) -> dict[str, QuantState]:
    """weight name -> its QuantState, for every quant_state tensor of `base` when its config says it is
    quantized by bitsandbytes (read from disk; from a Hub base's shard that is not cached yet with one range
    request each, as its header was read).

    Raises:
        FormatError: a quant_state that is not the JSON bitsandbytes writes (one line: file, tensor, what).
    """
    quantization = (base.config or {}).get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "bitsandbytes":
        return {}  # another checkpoint's tensors of such a name are not read: they are copied as they are
    where = base.locations()
    states = {}
    for weight, name in state_names(where).items():
        file, entry = where[name]
        offset = file.data_offset + entry.start
        if entry.nbytes > MAX_STATE_BYTES:
            raise FormatError(f"{file.path}: tensor {name!r} holds {entry.nbytes} bytes; a bitsandbytes quant_state "
                              f"is a JSON document of a few hundred bytes")
        if base.hub is not None:
            from .hub import read_range  # huggingface_hub is imported for Hub bases only

            raw = read_range(base.hub, file.path.name, offset, entry.nbytes)
        else:
            raw = _read(file.path, offset, entry.nbytes)
        states[weight] = _parse(file.path, entry.name, raw, name.rsplit("__", 1)[1])
    return states


def _read(path, offset: int, nbytes: int) -> bytes:
    buffer = bytearray(nbytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        read_exact(fd, buffer, offset, path)
    finally:
        os.close(fd)
    return bytes(buffer)


def _parse(path, name: str, raw: bytes, kind: str) -> QuantState:
    """The JSON of tensor `name`, checked field by field."""
    def bad(what: str) -> FormatError:
        return FormatError(f"{path}: tensor {name!r} is not a bitsandbytes quant_state: {what}")

    try:
        doc = json.loads(raw.rstrip(b"\0").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"its bytes are not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise bad(f"expected a JSON object, found {type(doc).__name__}")
    quant_type, blocksize, shape = doc.get("quant_type"), doc.get("blocksize"), doc.get("shape")
    if quant_type != kind:
        raise bad(f"quant_type {quant_type!r}, expected {kind!r} as its name says")
    if type(blocksize) is not int or blocksize <= 0 or blocksize % 2:
        raise bad(f"blocksize {blocksize!r}, expected a positive even integer (e.g. 64)")
    if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
        raise bad(f"shape {shape!r}, expected a list of positive integers")
    nested = doc.get("nested_blocksize")
    offset = doc.get("nested_offset")
    if nested is not None:
        if type(nested) is not int or nested <= 0 or not isinstance(offset, (int, float)):
            raise bad(f"nested_blocksize {nested!r} and nested_offset {offset!r}, expected a positive integer "
                      f"and a number")
        offset = float(offset)
    else:
        offset = None
    return QuantState(quant_type, blocksize, str(doc.get("dtype")), tuple(shape), nested, offset)
