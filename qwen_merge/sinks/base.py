"""The seam between a run and the place its output goes: a `Sink` takes the run's output shards, in order,
as `ShardStream`s, and makes the output whole.

A run (`qwen_merge.run`) opens the inputs, makes the plan and produces each output shard's bytes; a sink
decides where they go and when the output becomes visible. Three sinks exist:

* `FolderSink` (`sinks.folder`): a local folder. Shards are written, hashed and synced by the `ShardWriter`
  into a hidden partial folder, then the side files, the index and the manifest; one rename publishes it.
  It resumes: `done()` names the shards an interrupted run completed.
* `TensorSink` (`sinks.tensors`): `iter_merged`. Each tensor is assembled and yielded to the caller.
* `HubSink` (`sinks.hubrepo`): a Hub repo. Shards go through a `FolderSink`, each uploaded once finished;
  one commit publishes them with the small files and a model card.

A new sink (a GGUF file, say) implements the same two methods: `done()` and `consume(streams)`, and is a
context manager when it holds something that a failure must clean up. It picks the form of the bytes it
wants per shard: `runs()` (file order, adjacent unchanged bytes as one span, small experts batched: the
cheapest way to copy a shard) or `tensors()` (tensor by tensor, for a sink that renames, reorders or
converts tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..compute.pieces import Piece, shard_pieces, shard_runs

if TYPE_CHECKING:  # for annotations only
    from ..inputs.sources import Files
    from ..inputs.tensorfile import TensorEntry
    from ..planning.plan import ShardPlan

Result = TypeVar("Result", covariant=True)


@dataclass(frozen=True, slots=True)
class ShardStream:
    """One output shard as a run produces it: its plan, and its bytes in either form (each computed when
    iterated, once). `finished()` tells the run that the sink holds the shard for good (written and synced,
    or handed on), so the input files no later shard reads can go (`--low-disk`)."""

    shard: ShardPlan
    files: Files
    compute: Callable  # the run's computer: `compute(op)` yields a tensor's blocks, `compute.batch(ops)` a batch's
    finished: Callable[[], None]

    def runs(self) -> Iterator[Piece]:
        """The shard's pieces in file order, for writing it as one file."""
        return shard_runs(self.shard, self.files, self.compute, self.compute.batch)

    def tensors(self) -> Iterator[tuple[TensorEntry, Iterator[Piece]]]:
        """Each output tensor's entry and pieces, in the shard's order."""
        return shard_pieces(self.shard, self.files, self.compute)


class Sink(Protocol[Result]):
    """Where a run's output goes."""

    ring_size: int  # computed blocks alive at once: more than one when the sink holds blocks while the next compute

    def done(self) -> Collection[str]:
        """The output shards already complete (an interrupted run's, when resuming); the run skips them."""
        ...

    def consume(self, streams: Iterator[ShardStream]) -> Result:
        """Take every other shard, in the plan's order, then complete the output (side files, index,
        manifest; make it visible as a whole). An exception leaves no partial output visible."""
        ...
