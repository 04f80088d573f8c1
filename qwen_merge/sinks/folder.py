"""The local folder sink: the output built in a hidden partial folder beside the destination, shard by shard,
then its side files, index and manifest, and published by one rename; and whether a destination already
holds this merge (for `resume`).

The partial folder holds the resume state (`ResumeState`): an interrupted run leaves it, and a run with
`resume` skips the shards it records as complete (`done()`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OutputError
from ..files import MANIFEST_NAME, MODEL_CONFIG
from ..planning.manifest import FileStat, MergeIdentity, differences, manifest, read_manifest
from ..planning.memory import RING_SIZE
from ..progress import progress_bar
from .output import copy_side_file, partial_folder_of, publish, write_bytes, write_json, write_json_atomic
from .resume import ResumeRecord, ResumeState, staged
from .writer import ShardWriter

if TYPE_CHECKING:  # for annotations only
    from ..planning.plan import MergePlan
    from .base import ShardStream


class FolderSink:
    """A merge into the folder `dest`, as a context manager: entering creates (or, with `resume`, reopens) the
    partial folder and its resume state; `consume` writes the shards, the side files, the index and the
    manifest, and publishes the folder at `dest`. An error removes a partial folder this run created (a
    resumed one, and one a failed download leaves, are kept for the next `resume`)."""

    ring_size = RING_SIZE  # computed blocks alive at once: the writer holds some while the next are computed

    def __init__(self, dest: Path, plan: MergePlan, identity: MergeIdentity, base_files: dict[str, FileStat], *,
                 resume: bool, progress: bool) -> None:
        self.dest, self.plan, self.identity, self.progress = dest, plan, identity, progress
        self._run_record = ResumeRecord(identity, base_files, {})  # resume also notices a rewritten base file
        self._resume, self._stack = resume, ExitStack()
        self.state: ResumeState | None = None

    def __enter__(self) -> FolderSink:
        with self._stack as stack:
            self.state = staged(stack, self.dest, self._run_record, resume=self._resume)
            self.folder = self.state.path.parent
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> bool | None:
        return self._stack.__exit__(*exc)

    def done(self) -> frozenset[str]:
        return frozenset(self.state.done)

    @property
    def remaining_bytes(self) -> int:
        """The bytes still to write: the whole output less the shards already complete."""
        return self.plan.output_bytes - sum(d.size for d in self.state.done.values())

    def consume(self, streams: Iterator[ShardStream]) -> None:
        self.write_shards(streams)
        self.complete()

    def write_shards(self, streams: Iterator[ShardStream]) -> None:
        """Each stream's shard written, hashed, synced and recorded (the first half of `consume`)."""
        plan, state = self.plan, self.state
        bar = progress_bar(sum(s.size for s in plan.shards), "merging", enabled=self.progress)
        bar.update(sum(s.size for s in plan.shards if s.name in state.done))
        finished: dict[str, Callable[[], None]] = {}
        with bar, ExitStack() as stack:
            writer = None
            for stream in streams:
                if writer is None:  # the shards' files are open only now (a Hub base's: downloading)
                    on_done = lambda name: finished.pop(name)()  # noqa: E731 - from the finisher thread
                    writer = stack.enter_context(ShardWriter(self.folder, state, stream.files, bar.update, on_done))
                finished[stream.shard.name] = stream.finished
                writer.write(stream.shard.name, stream.shard.header, stream.runs())
            if writer is not None:
                writer.close()

    def complete(self) -> None:
        """The side files, the index and the manifest, then the folder published at `dest` (the second half
        of `consume`: a sink built on this one acts between the two, as the Hub sink's uploads finish)."""
        plan, state = self.plan, self.state
        self._write_side_files()
        shards = {s.name: state.done[s.name] for s in plan.shards}
        write_json_atomic(self.folder / MANIFEST_NAME, manifest(self.identity, plan, shards).to_json())
        state.remove()
        publish(self.folder, self.dest)

    def _write_side_files(self) -> None:
        plan = self.plan
        for side in plan.side_files:
            if side.name == MODEL_CONFIG and plan.config is not None:
                write_json(self.folder / side.name, plan.config)
            else:
                copy_side_file(side, self.folder)
        if plan.index_name:
            write_bytes(self.folder / plan.index_name, plan.index_json)


def finished_merge(dest: Path, ident: MergeIdentity) -> bool:
    """For `resume`: whether `dest` holds a finished merge of exactly these inputs and options, so there
    is nothing to do. False when an interrupted run's folder waits beside it, or `dest` is empty or
    absent (a fresh start). Any other content is an OutputError naming what differs — another merge's
    manifest, a listed shard missing, no manifest at all — as resuming cannot turn it into this merge
    (a manifest that cannot be read is a FormatError)."""
    if partial_folder_of(dest).exists() or not dest.is_dir() or not any(dest.iterdir()):
        return False
    found = read_manifest(dest)
    if found is None:
        raise OutputError(f"{dest}: destination folder is not empty and holds no finished merge (no {MANIFEST_NAME}), "
                          f"so there is nothing to resume; pass overwrite=True (--overwrite) to replace it")
    if changes := differences(found.identity, ident):
        raise OutputError(f"{dest}: holds a finished merge of other inputs or options ({'; '.join(changes)}), "
                          f"so there is nothing to resume; pass overwrite=True (--overwrite) to replace it")
    for name, shard in found.shards.items():
        if not (dest / name).is_file() or (dest / name).stat().st_size != shard.size:
            raise OutputError(f"{dest / name}: the finished merge lists this shard but it is missing or has the "
                              f"wrong size; pass overwrite=True (--overwrite) to merge again")
    return True
