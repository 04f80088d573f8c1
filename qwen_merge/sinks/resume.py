"""A partial folder's state file: the run's identity and the shards completed so far, so that an
interrupted merge can be resumed from them (and a changed input or option refuses to)."""

from __future__ import annotations

import threading
from pathlib import Path

from ..errors import OutputError
from ..files import STATE_NAME, read_json
from ..planning.manifest import differences
from .output import write_json_atomic


class ResumeState:
    """The state file of a partial folder: the run's identity and the shards completed so far, rewritten
    atomically at every change so an interrupted run can be resumed from it."""

    def __init__(self, folder: Path, identity: dict, done: dict[str, dict]) -> None:
        self.path, self.identity, self.done = folder / STATE_NAME, identity, dict(done)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path, identity: dict) -> ResumeState:
        """The shards an interrupted run left complete in `folder`, if it ran with the same identity.

        Raises:
            OutputError: the run had other inputs or options (each difference named), or a shard it
                recorded is missing or has another size."""
        path = folder / STATE_NAME
        if not path.is_file():
            return cls(folder, identity, {})  # killed before the first record: nothing was complete
        state = read_json(path, STATE_NAME)
        if changes := differences(state.get("identity") or {}, identity):
            raise OutputError(f"{folder}: cannot resume, the interrupted merge had other inputs or options "
                              f"({'; '.join(changes)}); rerun with the same ones, or remove the folder to start over")
        done = state.get("done", {})
        for name, info in done.items():
            if not (folder / name).is_file() or (folder / name).stat().st_size != info.get("size"):
                raise OutputError(f"{folder / name}: a shard recorded as complete is missing or has the wrong size")
        return cls(folder, identity, done)

    def save(self) -> None:
        with self._lock:
            write_json_atomic(self.path, {"identity": self.identity, "done": self.done})

    def record(self, name: str, info: dict) -> None:
        with self._lock:
            self.done[name] = info
        self.save()

    def remove(self) -> None:
        self.path.unlink()
