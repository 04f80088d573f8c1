"""Two merges of the same inputs are byte-identical, manifest included, and equal what iter_merged
yields. The tensors here span several row blocks large enough to be written on the writer thread,
each followed by a small last block: the pattern that once let a tensor's first block overwrite the
previous tensor's block while it was still being written."""

from __future__ import annotations

from builders import locate, tensor_bytes, tree_hash, write_linear_pair

from qwen_merge import iter_merged, merge_shards

ROWS, COLS, RANK, BLOCK = 3 * 256 + 3, 1024, 8, 1 << 20  # 256-row blocks (512 KiB of bf16), then 3 rows


def test_repeated_merges_are_byte_identical_and_match_the_stream(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    write_linear_pair(base, adapter, {"model.safetensors": [(f"model.layers.{i}.mlp.up_proj.weight", ROWS, COLS, True)
                                                            for i in range(6)]}, rank=RANK, alpha=13, seed=0)
    runs = []
    for i in range(3):
        out = tmp_path / f"out{i}"
        merge_shards(base, adapter, out, progress=False, block_bytes=BLOCK)
        runs.append(tree_hash(out))
    assert runs[0] == runs[1] == runs[2]
    assert "qwen_merge.json" in runs[0]
    data = (tmp_path / "out0" / "model.safetensors").read_bytes()
    for name, tensor in iter_merged(base, adapter, block_bytes=BLOCK):
        _, start, entry = locate(tmp_path / "out0", name)
        written = data[start:start + entry["data_offsets"][1] - entry["data_offsets"][0]]
        assert written == tensor_bytes(tensor), name
