"""The scatter writer: whatever the order and alignment of the writes, the file holds exactly what was
written where (zeros in the padding), with O_DIRECT for whole pages and without it."""

import os
import random

import pytest

from qwen_merge.sinks import scatter
from qwen_merge.sinks.scatter import ScatterWriter


@pytest.mark.parametrize("direct", [True, False])
def test_scattered_writes_land_where_they_were_written(tmp_path, monkeypatch, direct):
    if not direct:
        monkeypatch.setattr(scatter, "open_direct", lambda path: -1)
    monkeypatch.setattr(scatter, "CHUNK_BYTES", 3 * 4096)  # runs longer than a chunk, and chunk boundaries
    rng = random.Random(5)
    # tensors of ragged sizes, each padded to 32 bytes, written in pieces in a shuffled order of tensors
    sizes = [rng.randrange(1, 20000) for _ in range(40)]
    offsets, at = [], 100  # the data starts after a header, at an offset not page-aligned
    for size in sizes:
        offsets.append(at)
        at += -(-size // 32) * 32
    expected = bytearray(at)
    padding = {o + s: n for o, s, n in zip(offsets, sizes, offsets[1:])}
    path = tmp_path / "file"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    writer = ScatterWriter(path, fd, padding)
    shuffled = list(range(20))
    rng.shuffle(shuffled)  # the first half out of order (experts), the rest in file order (a dense model)
    order = shuffled + list(range(20, len(sizes)))
    for k in order:
        data = rng.randbytes(sizes[k])
        expected[offsets[k]:offsets[k] + sizes[k]] = data
        cut = rng.randrange(0, sizes[k])
        writer.write(memoryview(data)[:cut], offsets[k])
        writer.write(memoryview(data)[cut:], offsets[k] + cut)
    writer.wait()
    writer.close()
    os.ftruncate(fd, at)
    os.close(fd)
    assert path.read_bytes() == bytes(expected)
