"""The sink that yields: each merged tensor assembled from its pieces and handed to the caller as a torch
tensor (`iter_merged`). Only the tensor being yielded is held; torch is imported when the first is made."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..compute.pieces import Block, Piece
from ..errors import FormatError
from ..inputs.sources import read_exact

if TYPE_CHECKING:  # for annotations only: torch is imported where tensors are made
    import torch

    from ..inputs.tensorfile import TensorEntry
    from .base import ShardStream


class TensorSink:
    """`consume(streams)` yields `(name, tensor)` for every tensor of the output, in checkpoint order."""

    ring_size = 1  # a tensor is assembled from each block before the next is computed

    def done(self) -> Collection[str]:
        return ()

    def consume(self, streams: Iterator[ShardStream]) -> Iterator[tuple[str, torch.Tensor]]:
        for stream in streams:
            for entry, pieces in stream.tensors():
                yield entry.name, assemble(entry, pieces, stream.shard.source.path)
            stream.finished()


def assemble(entry: TensorEntry, pieces: Iterator[Piece], path: Path) -> torch.Tensor:
    """One tensor from its pieces: computed blocks copied in, unchanged bytes read in."""
    from ..compute.arithmetic import TORCH_DTYPES, as_tensor

    if entry.dtype not in TORCH_DTYPES:
        raise FormatError(f"{path}: tensor {entry.name!r} has dtype {entry.dtype}, which torch cannot hold")
    buffer = bytearray(entry.nbytes)
    view = memoryview(buffer)
    for piece in pieces:
        if isinstance(piece, Block):
            view[piece.offset:piece.offset + len(piece.data)] = piece.data
            piece.release()
        else:
            read_exact(piece.fd, buffer, piece.offset, path)
    return as_tensor(buffer, entry.dtype, entry.shape)
