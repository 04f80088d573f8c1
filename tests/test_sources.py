"""Reading input bytes: the read-ahead gives the bytes a plain positioned read gives, for every access
pattern the merge makes (row blocks in a row, small tensors between copied ones, the next layer's
experts a little past the guess, a jump elsewhere); the finiteness check and the background hash."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import torch

from qwen_merge.compute.arithmetic import all_finite
from qwen_merge.inputs.digest import Hashes, sha256_file
from qwen_merge.inputs.sources import SMALL_READ, TAIL_ROOM, Files, ReadAhead

MIB = 1 << 20


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sources") / "data.bin"
    data = random.Random(7).randbytes(12 * MIB + 12345)
    path.write_bytes(data)
    return path, data


def _reads(path, data, pattern):
    with Files() as files:
        reader = ReadAhead(files)
        try:
            fd = files.fd(path)
            for offset, length in pattern:
                assert bytes(reader.read(fd, offset, length, path)) == data[offset:offset + length], (offset, length)
        finally:
            reader.close()


def test_sequential_blocks_and_the_last_short_one(data_file):
    path, data = data_file
    block = 2 * MIB
    _reads(path, data, [(o, min(block, len(data) - o)) for o in range(0, len(data), block)])


def test_small_reads_between_large_ones_neither_wait_nor_discard_the_guess(data_file):
    path, data = data_file
    big = SMALL_READ + 1
    # a large read, small ones inside and outside the range fetched ahead, then the large one it guessed
    _reads(path, data, [(0, big), (big + 100, 4096), (9 * MIB, 300), (big, big), (2 * big + 5, 17),
                        (2 * big, big)])


def test_a_read_a_little_past_the_guess_reads_only_the_rest(data_file):
    path, data = data_file
    big = 2 * MIB
    gap = TAIL_ROOM // 2  # the next layer's experts start after the attention tensors between them
    _reads(path, data, [(0, big), (big + gap, big), (2 * big + gap + TAIL_ROOM + 1, big)])


def test_reads_that_miss_the_guess(data_file):
    path, data = data_file
    big = SMALL_READ + 4096
    _reads(path, data, [(6 * MIB, big), (0, big), (3 * MIB, big), (3 * MIB - 10, big), (len(data) - big, big)])


def test_random_pattern(data_file):
    path, data = data_file
    rng = random.Random(3)
    pattern = []
    for _ in range(200):
        length = rng.choice([1, 100, 4096, SMALL_READ, SMALL_READ + 1, 3 * MIB])
        offset = rng.randrange(0, len(data) - length)
        if pattern and rng.random() < 0.5:  # often right after the last read, or a little past it
            last = pattern[-1][0] + pattern[-1][1]
            offset = min(last + rng.choice([0, 0, 1, 4096, TAIL_ROOM // 3]), len(data) - length)
        pattern.append((offset, length))
    _reads(path, data, pattern)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite(dtype):
    values = torch.randn(64, 33).to(dtype)
    assert all_finite(values) and all_finite(values[:, 1::3]) and all_finite(values[:0])
    assert all_finite(torch.full((5,), torch.finfo(dtype).max, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = values.clone()
        broken[40, 7] = bad
        assert not all_finite(broken), bad
        assert not all_finite(broken[:, 7]), bad


def test_background_hash_is_the_file_hash_and_a_rewritten_file_is_hashed_again(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(os.urandom(3 * MIB))
    hashes = Hashes()
    hashes.start(path)
    assert hashes.sha256(path) == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    hashes.start(path)
    path.write_bytes(b"changed")  # a new size and mtime: the started hash is not used for it
    assert hashes.sha256(path) == hashlib.sha256(b"changed").hexdigest()


def test_a_run_s_started_hashes_end_with_it(tmp_path):
    """Hashes belong to the run that started them: closing it forgets them, and another run's hashes
    are its own (no state shared by the process)."""
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"weights")
    first, second = Hashes(), Hashes()
    first.start(path)
    assert second._started == {}
    first.close()
    assert first._started == {}
    assert first.sha256(path) == hashlib.sha256(b"weights").hexdigest()
