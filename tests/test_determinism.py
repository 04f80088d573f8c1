"""Two merges of the same inputs are byte-identical, manifest included, and equal what iter_merged
yields. The tensors here span several row blocks large enough to be written on the writer thread,
each followed by a small last block: the pattern that once let a tensor's first block overwrite the
previous tensor's block while it was still being written."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import save_file

from qwen_merge import iter_merged, merge_shards
from qwen_merge.tensorfile import read_header

ROWS, COLS, RANK, BLOCK = 3 * 256 + 3, 1024, 8, 1 << 20  # 256-row blocks (512 KiB of bf16), then 3 rows


def _inputs(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)]
    save_file({n: (torch.randn(ROWS, COLS, generator=g) * 0.02).to(torch.bfloat16) for n in names},
              base / "model.safetensors", metadata={"format": "pt"})
    factors = {}
    for n in names:
        key = "base_model.model." + n.removesuffix(".weight")
        factors[key + ".lora_A.weight"] = torch.randn(RANK, COLS, generator=g)
        factors[key + ".lora_B.weight"] = torch.randn(ROWS, RANK, generator=g)
    save_file(factors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 13}))
    return base, adapter


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_repeated_merges_are_byte_identical_and_match_the_stream(tmp_path):
    base, adapter = _inputs(tmp_path)
    runs = []
    for i in range(3):
        out = tmp_path / f"out{i}"
        merge_shards(base, adapter, out, progress=False, block_bytes=BLOCK)
        runs.append(_digests(out))
    assert runs[0] == runs[1] == runs[2]
    assert "qwen_merge.json" in runs[0]
    shard = tmp_path / "out0" / "model.safetensors"
    header = read_header(shard)
    data = shard.read_bytes()
    for name, tensor in iter_merged(base, adapter, block_bytes=BLOCK):
        entry = header.entry_map()[name]
        written = data[header.data_offset + entry.start:header.data_offset + entry.end]
        assert written == tensor.contiguous().view(torch.uint8).numpy().tobytes(), name
