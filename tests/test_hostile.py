"""Hostile and broken inputs (issue 5, item 1): a table of malformed bases, adapters and destinations.

For every case, on a fresh copy of a tiny 3-shard bf16 checkpoint and a PEFT-format LoRA adapter
(qwen_merge.demo) edited to break one rule:

* `merge_shards` raises the expected `QwenMergeError` subclass (exactly that class) with a one-line
  message that names the file (and the tensor or field where one is at fault) and the problem;
* `python -m qwen_merge merge ...` exits 1 with exactly one `error: ...` line on stderr, no traceback;
* nothing appears at the destination, no `.qwen-merge-partial` folder is left, and every file under the
  case's folder (inputs, destination parent) is byte-identical afterwards (hashed before and after).

The CLI runs of all cases are launched together (two at a time) by a module fixture, on their own copies,
because starting Python with torch costs ~1.7 s per run.

Also here: the unedited inputs merge (so each refusal comes from its edit), `allow_nonfinite` lets NaN/Inf
through, and the Hugging Face cache layout (`snapshots/<rev>/x -> ../../blobs/<hash>`) merges.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from builders import (ADAPTER_CFG, ADAPTER_ST, DROP, INDEX, PREFIX, REPO, copy_tree, edit_json, edit_tensors,
                      file_sha256, read_header, run_cli, run_python, tree_hash, write_checkpoint, write_lora_adapter)
from safetensors.torch import load_file

from qwen_merge import (AdapterError, AlreadyMergedError, FormatError, MismatchError, NonFiniteError, OutputError,
                        QwenMergeError, merge_shards)

pytestmark = pytest.mark.slow  # a real process per hostile input

S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
Q0 = "model.layers.0.self_attn.q_proj"
MOUNTS: list[Path] = []  # tmpfs mounts made by cases, unmounted when the module ends


# ----------------------------------------------------------------------------------------------- helpers

def read_st(path: Path) -> tuple[dict, bytes]:
    """(header, data buffer) of a safetensors file."""
    n, header = read_header(path)
    return header, path.read_bytes()[8 + n:]


def write_st(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    """A safetensors file from a header (a dict, or raw bytes that need not be valid) and a data buffer, with the
    given length field."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def tensors_in_order(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def cli(*args: object) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=120)


def try_mount(target: Path, options: str) -> bool:
    """Mount a tmpfs at `target`; False when this machine does not allow it (checked by a real attempt)."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if done.returncode == 0:
        MOUNTS.append(target)
    return done.returncode == 0


@pytest.fixture(scope="module", autouse=True)
def _unmount_at_end():
    yield
    while MOUNTS:
        subprocess.run(["umount", "-l", str(MOUNTS.pop())], capture_output=True)


@dataclass
class Workspace:
    """One case's folder: copies of the inputs, the destination, the options, and names the edit chose."""

    root: Path
    base: Path
    adapter: Path
    dest: Path
    base_arg: Path
    kwargs: dict = field(default_factory=dict)
    vars: dict = field(default_factory=dict)
    outside: list = field(default_factory=list)  # folders outside `root` to hash too


@pytest.fixture(scope="session")
def pristine(demo_inputs) -> Path:
    """The folder holding the unedited tiny base and adapter (conftest's demo_inputs, built once)."""
    return demo_inputs[0].parent


def new_workspace(pristine: Path, root: Path) -> Workspace:
    root.mkdir(parents=True)
    base = copy_tree(pristine / "base", root / "base")
    adapter = copy_tree(pristine / "adapter", root / "adapter")
    (root / "dest_parent").mkdir()
    return Workspace(root, base, adapter, root / "dest_parent" / "out", base)


# ------------------------------------------------------------------------------------------------- edits
# Each edit breaks one thing in a workspace and may record names in ws.vars for the expected message.

def edit_header(shard: str, change: Callable[[dict, Workspace], None]):
    def edit(ws: Workspace) -> None:
        header, data = read_st(ws.base / shard)
        change(header, ws)
        write_st(ws.base / shard, header, data)
    return edit


def edit_raw(shard: str, change: Callable[[bytes], bytes]):
    def edit(ws: Workspace) -> None:
        path = ws.base / shard
        path.write_bytes(change(path.read_bytes()))
    return edit


def raw_header(shard: str, header: bytes):
    """Replace the JSON header of `shard` by `header` (the data buffer kept)."""
    def edit(ws: Workspace) -> None:
        _, data = read_st(ws.base / shard)
        write_st(ws.base / shard, header, data)
    return edit


def nth(header: dict, ws: Workspace, i: int, var: str = "t") -> tuple[str, dict]:
    name = tensors_in_order(header)[i]
    ws.vars[var] = name
    return name, header[name]


def _overlap(h: dict, ws: Workspace) -> None:
    _, e = nth(h, ws, 1)
    e["data_offsets"] = [e["data_offsets"][0] - 2, e["data_offsets"][1] - 2]


def _hole(h: dict, ws: Workspace) -> None:
    _, e = nth(h, ws, 1)
    e["data_offsets"] = [e["data_offsets"][0] + 2, e["data_offsets"][1] + 2]


def _past_end(h: dict, ws: Workspace) -> None:
    _, e = nth(h, ws, -1)  # the last tensor: one more row, offsets consistent with the shape (BF16)
    assert e["dtype"] == "BF16", e
    e["shape"] = [e["shape"][0] + 1, *e["shape"][1:]]
    e["data_offsets"][1] += 2 * math.prod(e["shape"][1:])


def _set_shape(shape_of: Callable[[list], object]):
    def change(h: dict, ws: Workspace) -> None:
        _, e = nth(h, ws, 0)
        e["shape"] = shape_of(e["shape"])
    return change


def _set_entry(key: str, value: object):
    def change(h: dict, ws: Workspace) -> None:
        _, e = nth(h, ws, 0)
        e[key] = value(e) if callable(value) else value
    return change


def _wrapping_product(h: dict, ws: Workspace) -> None:
    """A zero-byte tensor whose shape product is 2**64: an unchecked u64 product wraps to 0 and matches."""
    end = max(e["data_offsets"][1] for k, e in h.items() if k != "__metadata__")
    h["model.evil.weight"] = {"dtype": "BF16", "shape": [2**33, 2**31], "data_offsets": [end, end]}
    ws.vars["t"] = "model.evil.weight"


def _bad_metadata(h: dict, ws: Workspace) -> None:
    h["__metadata__"] = {"format": 1}


def _duplicate_key(ws: Workspace) -> None:
    header, data = read_st(ws.base / S1)
    name = tensors_in_order(header)[0]
    ws.vars["t"] = name
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    write_st(ws.base / S1, (text[:-1] + ", " + entry + "}").encode(), data)


def _not_utf8(ws: Workspace) -> None:
    header, data = read_st(ws.base / S1)
    raw = json.dumps(header).encode()
    raw = raw.replace(b'"format"', b'"f\xffrmat"', 1)
    assert b"\xff" in raw
    write_st(ws.base / S1, raw, data)


def _duplicate_across_shards(ws: Workspace) -> None:
    one = load_file(ws.base / S1)
    name = sorted(one)[0]
    ws.vars["t"] = name
    edit_tensors(ws.base / S2, lambda two: two.__setitem__(name, one[name]))


def edit_index(change: Callable[[dict, Workspace], None]):
    def edit(ws: Workspace) -> None:
        index = json.loads((ws.base / INDEX).read_text())
        change(index, ws)
        (ws.base / INDEX).write_text(json.dumps(index, indent=2))
    return edit


def _first_in(index: dict, shard: str) -> str:
    return next(t for t, s in index["weight_map"].items() if s == shard)


def _index_points_to(shard_name: Callable[[Workspace], str], outside_copy: Callable[[Workspace], Path] | None = None):
    """weight_map of the first tensor of S1 names `shard_name`; optionally a valid copy of S1 is put where that
    name leads, so only the path rule can refuse it."""
    def change(index: dict, ws: Workspace) -> None:
        name = _first_in(index, S1)
        ws.vars["t"] = name
        if outside_copy is not None:
            target = outside_copy(ws)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ws.base / S1, target)
        index["weight_map"][name] = shard_name(ws)
    return change


def _absolute_target(ws: Workspace) -> Path:
    return ws.root / "elsewhere" / S1


def _index_missing_shard(index: dict, ws: Workspace) -> None:
    name = _first_in(index, S1)
    ws.vars["t"] = name
    index["weight_map"][name] = "model-00009-of-00009.safetensors"


def _index_ghost_tensor(index: dict, ws: Workspace) -> None:
    index["weight_map"]["model.ghost.weight"] = S1
    ws.vars["t"] = "model.ghost.weight"


def _index_wrong_shard(index: dict, ws: Workspace) -> None:
    name = _first_in(index, S1)
    ws.vars["t"] = name
    index["weight_map"][name] = S2


def _write(rel: str, text: str, where: str = "base"):
    def edit(ws: Workspace) -> None:
        (getattr(ws, where) / rel).write_text(text)
    return edit


def _symlink_outside(ws: Workspace) -> None:
    outside = ws.root / "elsewhere"
    outside.mkdir()
    shutil.move(ws.base / S1, outside / S1)
    (ws.base / S1).symlink_to(outside / S1)


def _hf_cache_link_outside_blobs(ws: Workspace) -> None:
    """A cache-shaped repo whose snapshot links one shard to a file that is not in the repo's blobs."""
    repo = ws.root / "models--org--name"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    shutil.move(ws.base, snap)
    ws.base = ws.base_arg = snap
    outside = ws.root / "elsewhere"
    outside.mkdir()
    shutil.move(snap / S1, outside / S1)
    (snap / S1).symlink_to(os.path.relpath(outside / S1, snap))


def _empty_base(ws: Workspace) -> None:
    empty = ws.root / "empty"
    empty.mkdir()
    ws.base_arg = empty


def _missing_base(ws: Workspace) -> None:
    ws.base_arg = ws.root / "no-such-model"


def _cfg_set(key: str, value: object):
    return lambda ws: edit_json(ws.adapter / ADAPTER_CFG, {key: value})  # NaN is written as NaN, as json does


def _cfg_drop(key: str):
    def edit(ws: Workspace) -> None:
        assert key in json.loads((ws.adapter / ADAPTER_CFG).read_text()), key
        edit_json(ws.adapter / ADAPTER_CFG, {key: DROP})
    return edit


def edit_factors(change: Callable[[dict, Workspace], None]):
    return lambda ws: edit_tensors(ws.adapter / ADAPTER_ST, lambda tensors: change(tensors, ws))


def _rank_mismatch(t: dict, ws: Workspace) -> None:
    key = PREFIX + Q0 + ".lora_B.weight"
    t[key] = torch.randn(t[key].shape[0], 4) * 0.1


def _other_base(t: dict, ws: Workspace) -> None:
    key = PREFIX + Q0 + ".lora_A.weight"
    t[key] = torch.randn(t[key].shape[0], 96) * 0.1  # hidden 96 instead of 64


def _poison(role: str, value: float):
    def change(t: dict, ws: Workspace) -> None:
        key = PREFIX + Q0 + f".lora_{role}.weight"
        t[key] = t[key].clone()
        t[key][1, 2] = value
    return change


def _all_keys_miss(t: dict, ws: Workspace) -> None:
    for key in list(t):
        t[key.replace(".layers.", ".blocks.")] = t.pop(key)


def _drop_prefix(t: dict, ws: Workspace) -> None:
    key = PREFIX + Q0 + ".lora_A.weight"
    t[key[len(PREFIX):]] = t.pop(key)
    ws.vars["t"] = key[len(PREFIX):]


def _truncate_adapter(ws: Workspace) -> None:
    path = ws.adapter / ADAPTER_ST
    path.write_bytes(path.read_bytes()[:-100])


def _fp16_overflow(ws: Workspace) -> None:
    """A single-file fp16 base near the top of the fp16 range: W + s*B@A overflows to Inf."""
    base = write_checkpoint(ws.root / "fp16-base", {"model.safetensors": {
        "model.layers.0.mlp.up_proj.weight": torch.full((32, 16), 60000.0, dtype=torch.float16)}})
    adapter = write_lora_adapter(ws.root / "fp16-adapter", {  # delta 2*4*1e4
        "model.layers.0.mlp.up_proj": (torch.full((4, 16), 1.0), torch.full((32, 4), 1e4))},
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"]})
    ws.base = ws.base_arg = base
    ws.adapter = adapter


def _already_merged(ws: Workspace) -> None:
    """The base is the output of merging this very adapter (its qwen_merge.json says so): merging again
    would apply the delta twice (unsloth #3633)."""
    merged = ws.root / "merged-once"
    merge_shards(ws.base, ws.adapter, merged, progress=False)
    ws.base = ws.base_arg = merged


def _dest(where: Callable[[Workspace], Path], **kwargs):
    def edit(ws: Workspace) -> None:
        ws.dest = where(ws)
        ws.kwargs.update(kwargs)
    return edit


def _dest_is_file(ws: Workspace) -> None:
    ws.dest.write_text("a file, not a folder\n")


def _dest_under_file(ws: Workspace) -> None:
    blocker = ws.root / "dest_parent" / "blocker"
    blocker.write_text("a file where a folder is needed\n")
    ws.dest = blocker / "out"


def _dest_read_only(ws: Workspace) -> None:
    mount = ws.root.parent / f"{ws.root.name}-ro"
    if not try_mount(mount, "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here (not root, or mount not permitted)")
    ws.dest = mount / "out"
    ws.outside.append(mount)


# -------------------------------------------------------------------------------------------------- table

@dataclass(frozen=True)
class Case:
    id: str
    edit: Callable[[Workspace], None]
    exc: type
    needles: tuple[str, ...]  # every one must be in the message; "{t}" is the tensor the edit picked
    files: tuple[str, ...]  # at least one must be in the message; "{adapter}", "{base}", "{dest}" expand


ADAPTER_FILES = ("{adapter}",)
CASES = [
    # --- safetensors files of the base (format-io.md §1.3)
    Case("truncated_shard", edit_raw(S1, lambda b: b[:-10]), FormatError, ("truncated",), (S1,)),
    Case("shard_shorter_than_8_bytes", edit_raw(S1, lambda b: b[:5]), FormatError, ("8-byte",), (S1,)),
    Case("empty_shard_file", edit_raw(S1, lambda b: b""), FormatError, ("0 bytes",), (S1,)),
    Case("header_length_beyond_file", edit_raw(S1, lambda b: struct.pack("<Q", len(b)) + b[8:]), FormatError,
         ("runs past the end",), (S1,)),
    Case("header_over_format_limit", edit_raw(S1, lambda b: struct.pack("<Q", 100_000_001) + b[8:]), FormatError,
         ("format limit",), (S1,)),
    Case("header_u64_max", edit_raw(S1, lambda b: b"\xff" * 8 + b[8:]), FormatError, ("format limit",), (S1,)),
    Case("header_not_utf8", _not_utf8, FormatError, ("UTF-8",), (S1,)),
    Case("header_not_json", raw_header(S1, b'{"model.x": {"dtype": "BF16", '), FormatError, ("JSON",), (S1,)),
    Case("header_json_array", raw_header(S1, b"[1, 2, 3]"), FormatError, ("JSON object", "list"), (S1,)),
    Case("header_json_number", raw_header(S1, b"42"), FormatError, ("JSON object",), (S1,)),
    Case("entry_not_object", edit_header(S1, lambda h, ws: h.update({"model.x.weight": 7})), FormatError,
         ("model.x.weight",), (S1,)),
    Case("duplicate_key_in_header", _duplicate_key, FormatError, ("{t}", "twice"), (S1,)),
    Case("metadata_not_strings", edit_header(S1, _bad_metadata), FormatError, ("__metadata__",), (S1,)),
    Case("unknown_dtype", edit_header(S1, _set_entry("dtype", "BF17")), FormatError, ("{t}", "BF17"), (S1,)),
    Case("missing_dtype", edit_header(S1, lambda h, ws: nth(h, ws, 0)[1].pop("dtype")), FormatError,
         ("{t}", "dtype"), (S1,)),
    Case("offsets_overlap", edit_header(S1, _overlap), FormatError, ("{t}", "overlaps"), (S1,)),
    Case("offsets_leave_hole", edit_header(S1, _hole), FormatError, ("{t}", "hole"), (S1,)),
    Case("offsets_past_end", edit_header(S1, _past_end), FormatError, ("{t}",), (S1,)),
    Case("trailing_bytes", edit_raw(S1, lambda b: b + b"\0" * 16), FormatError, ("trailing",), (S1,)),
    Case("offsets_reversed", edit_header(S1, _set_entry("data_offsets", lambda e: e["data_offsets"][::-1])),
         FormatError, ("{t}", "data_offsets"), (S1,)),
    Case("offsets_not_integers", edit_header(S1, _set_entry("data_offsets", lambda e: [str(o) for o in
                                                                                       e["data_offsets"]])),
         FormatError, ("{t}", "data_offsets"), (S1,)),
    Case("shape_dtype_span_mismatch", edit_header(S1, _set_shape(lambda s: [s[0], s[1] - 1])), FormatError,
         ("{t}", "span"), (S1,)),
    Case("dtype_span_mismatch", edit_header(S1, _set_entry("dtype", "F32")), FormatError, ("{t}", "span"), (S1,)),
    Case("negative_dimension", edit_header(S1, _set_shape(lambda s: [-s[0], -s[1]])), FormatError,
         ("{t}", "non-negative"), (S1,)),
    Case("float_dimension", edit_header(S1, _set_shape(lambda s: [float(s[0]), s[1]])), FormatError,
         ("{t}", "shape"), (S1,)),
    Case("absurd_dimension", edit_header(S1, _set_shape(lambda s: [2**62, s[1]])), FormatError, ("{t}",), (S1,)),
    Case("dimension_beyond_u64", edit_header(S1, _set_shape(lambda s: [2**64 + s[0], s[1]])), FormatError,
         ("{t}",), (S1,)),
    Case("product_wraps_u64", edit_header(S1, _wrapping_product), FormatError, ("{t}",), (S1,)),
    # --- the checkpoint: index, shards, folder
    Case("duplicate_tensor_across_shards", _duplicate_across_shards, FormatError, ("{t}",), (S1, S2)),
    Case("index_names_missing_shard", edit_index(_index_missing_shard), FormatError,
         ("{t}", "model-00009-of-00009.safetensors"), (INDEX,)),
    Case("index_tensor_absent_from_shard", edit_index(_index_ghost_tensor), FormatError, ("{t}",), (INDEX, S1)),
    Case("index_disagrees_with_shard", edit_index(_index_wrong_shard), FormatError, ("{t}",), (INDEX,)),
    Case("index_path_dotdot", edit_index(_index_points_to(lambda ws: "../" + S1, lambda ws: ws.root / S1)),
         FormatError, ("{t}", "../"), (INDEX,)),
    Case("index_path_absolute", edit_index(_index_points_to(lambda ws: str(_absolute_target(ws)),
                                                            _absolute_target)),
         FormatError, ("{t}",), (INDEX,)),
    Case("index_path_drive_letter", edit_index(_index_points_to(lambda ws: "C:\\" + S1)), FormatError,
         ("{t}", "C:"), (INDEX,)),
    Case("index_path_drive_relative", edit_index(_index_points_to(lambda ws: "C:" + S1)), FormatError,
         ("{t}", "C:"), (INDEX,)),
    Case("index_path_subfolder_escape", edit_index(_index_points_to(lambda ws: "sub/../../" + S1,
                                                                    lambda ws: ws.root / S1)),
         FormatError, ("{t}",), (INDEX,)),
    Case("index_not_json", _write(INDEX, '{"weight_map": {'), FormatError, ("JSON",), (INDEX,)),
    Case("index_without_weight_map", _write(INDEX, '{"metadata": {}}'), FormatError, ("weight_map",), (INDEX,)),
    Case("symlinked_shard_outside", _symlink_outside, FormatError, ("outside",), (S1,)),
    Case("hf_cache_link_outside_blobs", _hf_cache_link_outside_blobs, FormatError, ("outside",), (S1,)),
    Case("empty_folder", _empty_base, FormatError, ("model.safetensors",), ("empty",)),
    Case("missing_base", _missing_base, FormatError, ("not found",), ("no-such-model",)),
    Case("config_not_json", _write("config.json", '{"model_type": "qwen3",'), FormatError, ("JSON",),
         ("config.json",)),
    Case("config_not_object", _write("config.json", '["qwen3"]'), FormatError, ("JSON object",), ("config.json",)),
    # --- the adapter
    Case("adapter_config_not_json", _write(ADAPTER_CFG, "{'r': 8}", where="adapter"), FormatError, ("JSON",),
         (ADAPTER_CFG,)),
    Case("adapter_config_missing", lambda ws: (ws.adapter / ADAPTER_CFG).unlink(), AdapterError, (),
         (ADAPTER_CFG,)),
    Case("r_missing", _cfg_drop("r"), AdapterError, ("'r'",), (ADAPTER_CFG,)),
    Case("r_negative", _cfg_set("r", -8), AdapterError, ("'r'", "-8"), (ADAPTER_CFG,)),
    Case("r_zero", _cfg_set("r", 0), AdapterError, ("'r'", "0"), (ADAPTER_CFG,)),
    Case("r_string", _cfg_set("r", "8"), AdapterError, ("'r'",), (ADAPTER_CFG,)),
    Case("alpha_string", _cfg_set("lora_alpha", "16"), AdapterError, ("lora_alpha",), (ADAPTER_CFG,)),
    Case("alpha_nan", _cfg_set("lora_alpha", math.nan), AdapterError, ("lora_alpha",), (ADAPTER_CFG,)),
    Case("alpha_null", _cfg_set("lora_alpha", None), AdapterError, ("lora_alpha",), (ADAPTER_CFG,)),
    Case("peft_type_unknown", _cfg_set("peft_type", "SUPERLORA"), AdapterError, ("SUPERLORA",), (ADAPTER_CFG,)),
    Case("peft_type_missing", _cfg_drop("peft_type"), AdapterError, ("peft_type",), (ADAPTER_CFG,)),
    Case("adapter_weights_missing", lambda ws: (ws.adapter / ADAPTER_ST).unlink(), AdapterError, (),
         (ADAPTER_ST,)),
    Case("adapter_weights_truncated", _truncate_adapter, FormatError, ("truncated",), (ADAPTER_ST,)),
    Case("adapter_key_without_prefix", edit_factors(_drop_prefix), AdapterError, ("{t}",), (ADAPTER_ST,)),
    Case("ab_rank_mismatch", edit_factors(_rank_mismatch), MismatchError, (Q0,), ADAPTER_FILES),
    Case("adapter_for_other_base", edit_factors(_other_base), MismatchError, (Q0,), ADAPTER_FILES),
    Case("nan_in_lora_a", edit_factors(_poison("A", math.nan)), NonFiniteError, (Q0, "NaN"), ADAPTER_FILES),
    Case("inf_in_lora_b", edit_factors(_poison("B", math.inf)), NonFiniteError, (Q0, "Inf"), ADAPTER_FILES),
    Case("all_keys_miss_base", edit_factors(_all_keys_miss), MismatchError, ("blocks",), ADAPTER_FILES),
    Case("merge_overflows_fp16", _fp16_overflow, NonFiniteError, ("model.layers.0.mlp.up_proj.weight", "Inf"),
         ("{adapter}", "model.safetensors")),
    Case("adapter_already_merged_into_base", _already_merged, AlreadyMergedError, ("already merged",),
         ("qwen_merge.json",)),
    # --- the destination
    Case("dest_is_file", _dest_is_file, OutputError, ("not a folder",), ("{dest}",)),
    Case("dest_is_file_overwrite", lambda ws: (_dest_is_file(ws), ws.kwargs.update(overwrite=True)), OutputError,
         ("not a folder",), ("{dest}",)),
    Case("dest_under_a_file", _dest_under_file, OutputError, (), ("{dest}", "blocker")),
    Case("dest_on_read_only_fs", _dest_read_only, OutputError, (), ("{dest}",)),
    Case("dest_is_base", _dest(lambda ws: ws.base, overwrite=True), OutputError, (), ("{dest}",)),
    Case("dest_inside_base", _dest(lambda ws: ws.base / "merged"), OutputError, (), ("{dest}",)),
    Case("dest_inside_adapter", _dest(lambda ws: ws.adapter / "merged"), OutputError, (), ("{dest}",)),
    Case("dest_contains_inputs", _dest(lambda ws: ws.root, overwrite=True), OutputError, (), ("{dest}",)),
]
assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


def expand(texts: tuple[str, ...], ws: Workspace) -> list[str]:
    names = {"adapter": str(ws.adapter), "base": str(ws.base), "dest": str(ws.dest), **ws.vars}
    return [t.format(**names) for t in texts]


def check_message(message: str, case: Case, ws: Workspace) -> None:
    assert message.strip(), "empty error message"
    assert "\n" not in message.strip(), f"message is not one line: {message!r}"
    assert "Traceback" not in message
    for needle in expand(case.needles, ws):
        assert needle in message, f"message does not mention {needle!r}: {message!r}"
    files = expand(case.files, ws)
    assert any(f in message for f in files), f"message names none of the files {files}: {message!r}"


def all_roots(ws: Workspace) -> list[Path]:
    return [ws.root, *ws.outside]


def state_of(ws: Workspace) -> dict:
    return {str(r): tree_hash(r) for r in all_roots(ws)}


def check_nothing_written(ws: Workspace, before: dict, dest_existed: bool) -> None:
    after = state_of(ws)
    if after != before:
        for root in before:
            added = sorted(set(after[root]) - set(before[root]))
            removed = sorted(set(before[root]) - set(after[root]))
            changed = sorted(k for k in set(before[root]) & set(after[root]) if before[root][k] != after[root][k])
            assert not (added or removed or changed), (f"under {root}: created {added}, removed {removed}, "
                                                       f"changed {changed}")
    if not dest_existed:
        assert not os.path.lexists(ws.dest), f"destination {ws.dest} was created"
    partial = ws.dest.parent / f".{ws.dest.name}.qwen-merge-partial"
    assert not os.path.lexists(partial), f"partial folder {partial} left behind"
    for root in all_roots(ws):
        leftovers = [p for p in root.rglob("*qwen-merge*")]
        assert not leftovers, f"temporary files left: {leftovers}"


def cli_args(ws: Workspace) -> list[object]:
    flags = {"overwrite": "--overwrite", "allow_nonfinite": "--allow-nonfinite", "force": "--force"}
    return ["merge", ws.base_arg, ws.adapter, ws.dest, "--quiet", *(flags[k] for k, v in ws.kwargs.items() if v)]


# The CLI of every case runs in a child forked from one process that imported qwen_merge.cli (and so
# torch) once: the same `main()` that `python -m qwen_merge` runs, with its real exit status and stderr,
# and an uncaught exception printed and turned into status 1 exactly as the interpreter does. Forking
# per case keeps ~75 runs at a few seconds instead of ~1.7 s of imports each;
# test_forked_cli_matches_a_real_process checks that the two agree.
FORK_SERVER = """
import json, os, sys, traceback
import qwen_merge.cli as cli
jobs, running, codes = json.load(sys.stdin), {}, {}

def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)

for key, job in jobs.items():
    while len(running) >= 2:
        reap()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        try:
            code = cli.main(job["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    running[pid] = key
while running:
    reap()
print(json.dumps(codes))
"""


def cli_many(jobs: dict[str, list[object]], scratch: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run `qwen-merge <argv>` for every job (forked from one interpreter, two at a time)."""
    spec = {key: {"argv": [str(a) for a in argv], "stdout": str(scratch / f"{key}.out"),
                  "stderr": str(scratch / f"{key}.err")} for key, argv in jobs.items()}
    server = run_python(FORK_SERVER, input=json.dumps(spec), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert server.returncode == 0, server.stderr
    codes = json.loads(server.stdout.strip().splitlines()[-1])
    return {key: subprocess.CompletedProcess(job["argv"], codes[key], Path(job["stdout"]).read_text(),
                                             Path(job["stderr"]).read_text()) for key, job in spec.items()}


@dataclass
class CliRun:
    ws: Workspace | None
    proc: subprocess.CompletedProcess | None
    before: dict | None
    dest_existed: bool
    skipped: str | None = None


@pytest.fixture(scope="module")
def cli_runs(pristine, tmp_path_factory) -> dict[str, CliRun]:
    """Every case run through the CLI on its own copy (see FORK_SERVER)."""
    root = tmp_path_factory.mktemp("hostile-cli")
    scratch = tmp_path_factory.mktemp("hostile-cli-output")
    prepared: dict[str, CliRun] = {}
    for case in CASES:
        ws = new_workspace(pristine, root / case.id)
        try:
            case.edit(ws)
        except pytest.skip.Exception as e:
            prepared[case.id] = CliRun(None, None, None, False, skipped=str(e))
            continue
        prepared[case.id] = CliRun(ws, None, state_of(ws), os.path.lexists(ws.dest))
    jobs = {key: cli_args(item.ws) for key, item in prepared.items() if item.ws is not None}
    for key, proc in cli_many(jobs, scratch).items():
        prepared[key].proc = proc
    return prepared


# -------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_by_api(case: Case, pristine, tmp_path):
    ws = new_workspace(pristine, tmp_path / "case")
    case.edit(ws)
    before, dest_existed = state_of(ws), os.path.lexists(ws.dest)
    with pytest.raises(QwenMergeError) as info:
        merge_shards(ws.base_arg, ws.adapter, ws.dest, progress=False, **ws.kwargs)
    assert type(info.value) is case.exc, f"{type(info.value).__name__} instead of {case.exc.__name__}: {info.value}"
    check_message(str(info.value), case, ws)
    check_nothing_written(ws, before, dest_existed)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_by_cli(case: Case, cli_runs):
    item = cli_runs[case.id]
    if item.skipped:
        pytest.skip(item.skipped)
    proc, ws = item.proc, item.ws
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line: {proc.stderr!r}"
    assert proc.stdout == "", proc.stdout
    check_message(lines[0][len("error: "):], case, ws)
    check_nothing_written(ws, item.before, item.dest_existed)


@pytest.mark.parametrize("case_id", ["truncated_shard", "nan_in_lora_a", "dest_under_a_file"])
def test_forked_cli_matches_a_real_process(case_id, cli_runs, pristine, tmp_path):
    """Guard for FORK_SERVER: `python -m qwen_merge` in a fresh interpreter answers the same."""
    case = next(c for c in CASES if c.id == case_id)
    ws = new_workspace(pristine, tmp_path / "case")
    case.edit(ws)
    real, forked = cli(*cli_args(ws)), cli_runs[case_id].proc
    assert real.returncode == forked.returncode == 1
    assert (real.stderr.replace(str(ws.root), "<ROOT>")
            == forked.stderr.replace(str(cli_runs[case_id].ws.root), "<ROOT>")), (real.stderr, forked.stderr)


def test_unedited_inputs_merge(pristine, tmp_path):
    """Guard: the workspace every case starts from merges, so each refusal comes from its edit."""
    ws = new_workspace(pristine, tmp_path / "case")
    before = tree_hash(ws.base), tree_hash(ws.adapter)
    report = merge_shards(ws.base, ws.adapter, ws.dest, progress=False)
    assert report.merged == 28 and (ws.dest / S1).is_file()
    assert (tree_hash(ws.base), tree_hash(ws.adapter)) == before


@pytest.mark.parametrize("role,value", [("A", math.nan), ("B", math.inf)])
def test_allow_nonfinite_lets_it_through(pristine, tmp_path, role, value):
    ws = new_workspace(pristine, tmp_path / "case")
    edit_factors(_poison(role, value))(ws)
    merge_shards(ws.base, ws.adapter, ws.dest, progress=False, allow_nonfinite=True)
    index = json.loads((ws.dest / INDEX).read_text())
    name = Q0 + ".weight"
    merged = load_file(ws.dest / index["weight_map"][name])[name]
    assert not bool(torch.isfinite(merged.float()).all()), "the NaN/Inf did not reach the merged tensor"
    others = load_file(ws.dest / S2)
    assert all(bool(torch.isfinite(t.float()).all()) for t in others.values())

    proc = cli("merge", ws.base, ws.adapter, ws.root / "cli_out", "--quiet", "--allow-nonfinite")
    assert proc.returncode == 0, proc.stderr
    assert tree_hash(ws.root / "cli_out") == tree_hash(ws.dest)


def test_fp16_overflow_written_with_allow_nonfinite(pristine, tmp_path):
    ws = new_workspace(pristine, tmp_path / "case")
    _fp16_overflow(ws)
    merge_shards(ws.base, ws.adapter, ws.dest, progress=False, allow_nonfinite=True)
    merged = load_file(ws.dest / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert bool(torch.isinf(merged).all())


def test_force_merges_again_and_other_adapters_are_fine(pristine, tmp_path):
    """The double-merge refusal is about the same adapter: force=True overrides it, and another adapter
    merges into an already merged base without it."""
    ws = new_workspace(pristine, tmp_path / "case")
    _already_merged(ws)
    merge_shards(ws.base, ws.adapter, tmp_path / "forced", progress=False, force=True)
    other = Path(shutil.copytree(ws.adapter, tmp_path / "other"))
    edit_factors(lambda t, _: t.__setitem__(PREFIX + Q0 + ".lora_A.weight",
                                            t[PREFIX + Q0 + ".lora_A.weight"] * 2))(Workspace(
        tmp_path, ws.base, other, tmp_path / "unused", ws.base))
    merge_shards(ws.base, other, tmp_path / "second", progress=False)
    history = json.loads((tmp_path / "second" / "qwen_merge.json").read_text())["base"]["merged_adapters"]
    assert len(history) == 1
    proc = cli("merge", ws.base, ws.adapter, tmp_path / "cli_forced", "--quiet", "--force")
    assert proc.returncode == 0, proc.stderr
    assert tree_hash(tmp_path / "cli_forced") == tree_hash(tmp_path / "forced")


def _hf_cache(plain: Path, repo: Path, rev: str = "0123456789abcdef") -> Path:
    """Lay `plain` out as the hub cache does: every file a blob named by its hash, linked from the snapshot."""
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for path in sorted(plain.iterdir()):
        digest = file_sha256(path)
        shutil.copyfile(path, repo / "blobs" / digest)
        (snap / path.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snap


def test_hf_cache_layout_merges(pristine, tmp_path):
    """`models--org--name/snapshots/<rev>/x -> ../../blobs/<hash>` is the cache's own layout: accepted, and
    the output is byte-identical to merging the same files from a plain folder."""
    snap = _hf_cache(pristine / "base", tmp_path / "hub" / "models--org--name")
    before = tree_hash(tmp_path / "hub")
    merge_shards(snap, pristine / "adapter", tmp_path / "from_cache", progress=False)
    merge_shards(pristine / "base", pristine / "adapter", tmp_path / "from_plain", progress=False)
    assert tree_hash(tmp_path / "from_cache") == tree_hash(tmp_path / "from_plain")
    assert not any(p.is_symlink() for p in (tmp_path / "from_cache").iterdir()), "output holds links"
    assert tree_hash(tmp_path / "hub") == before

    proc = cli("merge", snap, pristine / "adapter", tmp_path / "cli_out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert tree_hash(tmp_path / "cli_out") == tree_hash(tmp_path / "from_plain")


def test_symlink_inside_the_folder_is_fine(pristine, tmp_path):
    """A shard linked to a file that stays inside the model folder is not an escape."""
    base = Path(shutil.copytree(pristine / "base", tmp_path / "base"))
    (base / "store").mkdir()
    shutil.move(base / S1, base / "store" / S1)
    (base / S1).symlink_to(Path("store") / S1)
    merge_shards(base, pristine / "adapter", tmp_path / "out", progress=False)
    merge_shards(pristine / "base", pristine / "adapter", tmp_path / "plain", progress=False)
    assert tree_hash(tmp_path / "out") == tree_hash(tmp_path / "plain")
