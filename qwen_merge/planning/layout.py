"""Where each output tensor goes: the output's shard files, the tensors' offsets in them, their headers,
and the index — from the planned tensors alone (names, dtypes, shapes), never their bytes.

Two layouts:
* the base's (default): the same shard names and tensor-to-shard assignment. A shard whose tensors keep
  their dtypes and shapes keeps the base's offsets and header bytes; one that changes (a converted
  dtype, a resized vocabulary, a new or dropped tensor, new block scales) is packed afresh;
* `max_shard_size`: shards filled greedily in checkpoint order, a new one started when the next tensor
  would pass the limit (a larger tensor gets a shard of its own), named `model-0000k-of-0000n.safetensors`
  as `save_pretrained` names them; a result that fits in one shard is a single `model.safetensors`
  without an index, as Hugging Face writes it.
Packed shards use the reference writer's order (largest element first, then name), which keeps every
tensor aligned to its element size. A shard that holds requantized FP8 weights is packed smallest element
first instead, when every tensor stays aligned that way: the new block scales then come after their
weights, so they are computed in the weight's own pass (a checkpoint stores them first, and writing them
first would mean merging each weight twice).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..dtypes import DTYPE_BITS
from ..files import INDEX_NAME, SINGLE_NAME
from ..inputs.tensorfile import TensorEntry, TensorFile, encode_header

FORMAT_PT = {"format": "pt"}


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """One output header entry before `pack` gives it offsets: its name, dtype and shape, and the base shard it comes
    from (for a new tensor, the shard of the tensor it is stored beside)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    origin: TensorFile

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BITS[self.dtype] // 8


@dataclass(frozen=True, slots=True)
class FileLayout:
    """One output shard: its file name, the base shard it is made from (or the first one, when re-sharded),
    its entries with output offsets, and its header bytes."""

    name: str
    origin: TensorFile
    entries: tuple[TensorEntry, ...]
    header: bytes


def base_layout(shards: list[tuple[TensorFile, list[PendingEntry] | None]], late: frozenset[str] = frozenset()
                ) -> list[FileLayout]:
    """The base's shard names and assignment. `None`: every tensor of the shard keeps its dtype and shape,
    so its offsets and header are kept (the planner decides that); otherwise the slots are packed afresh.
    `late`: tensors better written after the others (the new scales of requantized weights)."""
    files = []
    for source, slots in shards:
        metadata = {**(source.metadata or {}), **FORMAT_PT}
        if slots is None:
            header = (source.header if metadata == source.metadata and source.header
                      else encode_header(source.entries, metadata, pad_to=source.data_offset - 8))
            files.append(FileLayout(source.path.name, source, source.entries, header))
        elif slots:  # (an empty list: every tensor of it was dropped, the block scales of a dequantized model)
            entries = pack(slots, late)
            files.append(FileLayout(source.path.name, source, tuple(entries), encode_header(entries, metadata)))
    return files


def resharded_layout(slots: list[PendingEntry], max_shard_size: int, late: frozenset[str] = frozenset()
                     ) -> list[FileLayout]:
    """Greedy shards of at most `max_shard_size` payload bytes, in checkpoint order."""
    groups: list[list[PendingEntry]] = []
    size = 0
    for slot in slots:
        if not groups or (size + slot.nbytes > max_shard_size and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(slot)
        size += slot.nbytes
    names = shard_names(len(groups))
    files = []
    for name, group in zip(names, groups):
        entries = pack(group, late)
        files.append(FileLayout(name, group[0].origin, tuple(entries), encode_header(entries, FORMAT_PT)))
    return files


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def index_name(base_index: str | None, files: list[FileLayout], resharded: bool) -> str | None:
    """The output's index file name: the base's, or when re-sharded the standard one if there is more
    than one shard."""
    if resharded:
        return INDEX_NAME if len(files) > 1 else None
    return base_index


def pack(slots: list[PendingEntry], late: frozenset[str] = frozenset()) -> list[TensorEntry]:
    """Offsets in the reference writer's order (largest element first, then name), so every tensor stays
    aligned to its element size; smallest element first when the shard holds `late` tensors and that
    order keeps every tensor aligned too."""
    if any(s.name in late for s in slots):
        entries = _offsets(sorted(slots, key=lambda s: (DTYPE_BITS[s.dtype], s.name)))
        if all(e.start % max(DTYPE_BITS[e.dtype] // 8, 1) == 0 for e in entries):
            return entries
    return _offsets(sorted(slots, key=lambda s: (-DTYPE_BITS[s.dtype], s.name)))


def _offsets(slots: list[PendingEntry]) -> list[TensorEntry]:
    entries, offset = [], 0
    for slot in slots:
        entries.append(TensorEntry(slot.name, slot.dtype, tuple(slot.shape), offset, offset + slot.nbytes))
        offset += slot.nbytes
    return entries


def index_json(document: dict) -> bytes:
    """`json.dumps(document, indent=2)` and a newline, as transformers writes an index, with the weight
    map's lines built directly: json's indenting encoder is pure Python, and a map of 20,000 tensors took
    it longer than the rest of the plan."""
    weight_map = document["weight_map"]
    head = json.dumps({**document, "weight_map": {}}, indent=2)
    if not weight_map or not head.endswith('"weight_map": {}\n}'):  # (the map is last in our documents)
        return (json.dumps(document, indent=2) + "\n").encode()
    quote = json.encoder.encode_basestring_ascii
    lines = ",\n".join(f"    {quote(name)}: {quote(shard)}" for name, shard in weight_map.items())
    return (head[:-len("{}\n}")] + "{\n" + lines + "\n  }\n}\n").encode()
