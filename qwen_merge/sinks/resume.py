"""A partial folder's state file: the run's identity and the shards completed so far, so that an
interrupted merge can be resumed from them (and a changed input or option refuses to)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import OutputError
from ..files import STATE_NAME, read_json
from ..planning.manifest import Fields, FileStat, Kind, MergeIdentity, ShardRecord, differences
from .output import staging_folder, write_json_atomic

STATS = Kind("an object of [size, mtime, inode] lists of integers",
             lambda v: isinstance(v, dict) and all(isinstance(s, list) and all(type(x) is int for x in s)
                                                   for s in v.values()))


@dataclass(frozen=True, slots=True)
class ResumeRecord:
    """What the state file records: the run's identity, the size, mtime and inode of each base file (so a
    rewritten base file is noticed too; none for a Hub base) and the shards completed so far, by name."""

    identity: MergeIdentity
    base_files: dict[str, FileStat]
    done: dict[str, ShardRecord]

    def to_json(self) -> dict:
        stats = {name: list(stat) for name, stat in self.base_files.items()}
        return {"identity": {**self.identity.to_json(), "base_files": stats},
                "done": {name: shard.to_json() for name, shard in self.done.items()}}

    @classmethod
    def from_json(cls, doc: Mapping, path: Path, where: str = "") -> ResumeRecord:
        """The state `doc` read from `path`; what it lacks reads as not recorded.

        Raises:
            FormatError: a field holds a value of the wrong kind (named, with the file)."""
        read = Fields(doc, path, where)
        identity = read.section("identity", Fields)
        stats = identity.get("base_files", STATS) or {}
        return cls(MergeIdentity.from_json(identity.doc, path, identity.where),
                   {name: tuple(stat) for name, stat in stats.items()}, read.records("done", ShardRecord.from_json))


class ResumeState:
    """The state file of a partial folder: the run's record, its `done` shards updated as they complete and
    rewritten atomically at every change so an interrupted run can be resumed from it."""

    def __init__(self, folder: Path, run: ResumeRecord) -> None:
        self.path, self.run, self.done = folder / STATE_NAME, run, dict(run.done)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path, run: ResumeRecord, *, shard_files: bool = True) -> ResumeState:
        """The shards an interrupted run left complete in `folder`, if it ran with the same identity and base
        files as `run`. `shard_files`: each shard is a file of `folder` (a folder output), checked to be there
        with its recorded size; False where the shards are parts of one file (a GGUF output).

        Raises:
            OutputError: the run had other inputs or options (each difference named), or a shard it
                recorded is missing or has another size.
            FormatError: the state file is not valid JSON, or a field holds a value of the wrong kind."""
        path = folder / STATE_NAME
        if not path.is_file():
            return cls(folder, run)  # killed before the first record: nothing was complete
        state = ResumeRecord.from_json(read_json(path, STATE_NAME), path)
        if changes := differences(state.identity, run.identity, state.base_files, run.base_files):
            raise OutputError(f"{folder}: cannot resume, the interrupted merge had other inputs or options "
                              f"({'; '.join(changes)}); rerun with the same ones, or remove the folder to start over")
        for name, shard in state.done.items() if shard_files else ():
            if not (folder / name).is_file() or (folder / name).stat().st_size != shard.size:
                raise OutputError(f"{folder / name}: a shard recorded as complete is missing or has the wrong size")
        return cls(folder, replace(run, done=state.done))

    def save(self) -> None:
        with self._lock:
            write_json_atomic(self.path, replace(self.run, done=self.done).to_json())

    def record(self, name: str, size: int, sha256: str) -> None:
        """Shard `name` is complete: `size` bytes with this SHA-256."""
        with self._lock:
            self.done[name] = ShardRecord(sha256, size)
        self.save()

    def remove(self) -> None:
        self.path.unlink()


def staged(stack: ExitStack, dest: Path, run: ResumeRecord, *, resume: bool, shard_files: bool = True) -> ResumeState:
    """The partial folder beside `dest` entered on `stack` (`output.staging_folder`: an error removes one this
    run created) and its resume state: a new one, or with `resume` the interrupted run's (`ResumeState.load`),
    saved at once so a run killed from now on can be resumed."""
    folder, fresh = stack.enter_context(staging_folder(dest, resume=resume))
    state = ResumeState(folder, run) if fresh else ResumeState.load(folder, run, shard_files=shard_files)
    state.save()
    return state
