"""Plans from plain values: a base checkpoint and a PEFT adapter written as Python dicts of tensor name ->
(dtype, shape), made into the `Checkpoint` and `Adapter` that `qwen_merge.planning.plan.make_plan` takes,
with no file on disk and no torch.

    base = checkpoint({"model.safetensors": {"model.layers.0.self_attn.q_proj.weight": ("BF16", [8, 8])}},
                      config={"model_type": "qwen3"})
    lora = adapter({"r": 2, "lora_alpha": 4}, lora_pair("model.layers.0.self_attn.q_proj", 2, (8, 8)))
    merge = plan(base, lora, dtype="float16")

Each header is encoded and parsed by qwen_merge's own safetensors code, so the entries have the offsets a
real file's header gives. Every path lies under a folder that does not exist (`ROOT`): the planner names
them in its messages, and a plan that tried to open one would fail.
"""

from __future__ import annotations

import math
from pathlib import Path

from qwen_merge.files import ADAPTER_WEIGHTS, INDEX_NAME, SINGLE_NAME
from qwen_merge.inputs.adapter import PREFIX, Adapter, adapter_from_header
from qwen_merge.inputs.checkpoint import Checkpoint, stored_map
from qwen_merge.inputs.tensorfile import DTYPE_BITS, TensorEntry, TensorFile, encode_header, parse_header
from qwen_merge.options import MergeOptions
from qwen_merge.planning.plan import MergePlan, make_plan

ROOT = Path("/nonexistent-planbuild")
BASE = ROOT / "base"
ADAPTER = ROOT / "adapter"
ADAPTER_FILE = ADAPTER / ADAPTER_WEIGHTS

Spec = tuple[str, list[int]]  # (safetensors dtype, shape)


def tensor_file(path: Path, tensors: dict[str, Spec]) -> TensorFile:
    """The parsed header of a safetensors file holding `tensors` in the given order (no data is made)."""
    entries, offset = [], 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * DTYPE_BITS[dtype] // 8
        entries.append(TensorEntry(name, dtype, tuple(shape), offset, offset + size))
        offset += size
    header = encode_header(entries, {"format": "pt"})
    return parse_header(path, header, len(header) + offset)


def checkpoint(shards: dict[str, dict[str, Spec]], config: dict | None = None) -> Checkpoint:
    """A base checkpoint of `shards` (file name -> its tensors). One shard named model.safetensors is a
    single-file model; any other layout has an index with `total_size`, as transformers writes it."""
    files = tuple(tensor_file(BASE / name, tensors) for name, tensors in sorted(shards.items()))
    single = list(shards) == [SINGLE_NAME]
    metadata = {} if single else {"total_size": sum(f.size - f.data_offset for f in files)}
    return Checkpoint(BASE, files, stored_map(files), None if single else INDEX_NAME, metadata,
                      side_files=(), skipped=(), config=config)


def adapter(config: dict, tensors: dict[str, Spec]) -> Adapter:
    """A LoRA adapter: `config` as in adapter_config.json (peft_type LORA unless given) and its tensors by
    in-model key (`base_model.model.` is prepended), checked and sorted as `open_adapter` does."""
    file = tensor_file(ADAPTER_FILE, {PREFIX + key: spec for key, spec in tensors.items()})
    return adapter_from_header(ADAPTER, {"peft_type": "LORA", **config}, file)


def lora_pair(module: str, r: int, shape: tuple[int, int], dtype: str = "F32") -> dict[str, Spec]:
    """The lora_A (r, in) and lora_B (out, r) of a Linear layer whose weight is `shape` (out, in)."""
    out, inp = shape
    return {f"{module}.lora_A.weight": (dtype, [r, inp]), f"{module}.lora_B.weight": (dtype, [out, r])}


def embedding_pair(module: str, r: int, shape: tuple[int, int], dtype: str = "F32") -> dict[str, Spec]:
    """The lora_embedding_A (r, vocab) and lora_embedding_B (dim, r) of an embedding of `shape` (vocab, dim)."""
    vocab, dim = shape
    return {f"{module}.lora_embedding_A": (dtype, [r, vocab]), f"{module}.lora_embedding_B": (dtype, [dim, r])}


def never_same(x: TensorEntry, y: TensorEntry, transposed: bool) -> bool:
    """`same_values` for adapters whose tensors all differ (as trained tensors do)."""
    return False


def always_same(x: TensorEntry, y: TensorEntry, transposed: bool) -> bool:
    """`same_values` for adapters that save one matrix (or one pair, transposed) under two names."""
    return True


def plan(base: Checkpoint, lora: Adapter, same_values=never_same, **options) -> MergePlan:
    """`make_plan` with `MergeOptions(**options)`."""
    return make_plan(base, lora, MergeOptions(**options), same_values)


def steps(merge: MergePlan) -> dict[str, str]:
    """Output tensor -> what happens to it (`merge`, `replace`, `→ F16`, ...), for every tensor not copied."""
    return {op.name: op.steps for op in merge.ops}


def landings(merge: MergePlan) -> dict[str, str]:
    """Output tensor -> the adapter key of the lora_A whose pair lands on it."""
    return {op.name: op.pair.a.name[len(PREFIX):] for op in merge.merges}


def scales(merge: MergePlan) -> dict[str, tuple[int, float]]:
    """Output tensor -> (rank, scale) of the LoRA pair that lands on it."""
    return {op.name: (op.pair.rank, op.pair.scale) for op in merge.merges}


def expert_slices(merge: MergePlan) -> dict[str, tuple[int | None, tuple[int, int] | None]]:
    """Output tensor -> (expert, rows of that expert's delta) of the fused-expert LoRA that lands on it."""
    return {op.name: (op.pair.expert, op.pair.rows) for op in merge.merges}


def sources(merge: MergePlan) -> dict[str, str]:
    """Output tensor -> the tensor its bytes start from: `base:<name>` or `adapter:<key>`, for every tensor
    not copied."""
    return {op.name: ("adapter:" + op.source.entry.name[len(PREFIX):] if op.source.in_adapter
                      else "base:" + op.source.entry.name) for op in merge.ops}


def files(merge: MergePlan) -> dict[str, list[str]]:
    """Output file -> its tensors, in the order they are stored."""
    return {shard.name: [e.name for e in shard.entries] for shard in merge.shards}


def dtypes(merge: MergePlan) -> dict[str, str]:
    """Output tensor -> its dtype."""
    return {e.name: e.dtype for shard in merge.shards for e in shard.entries}
