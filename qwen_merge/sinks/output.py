"""The destination: refuse unsafe ones, build the output in a temporary folder beside it, copy side files
and write JSON there durably, and move the folder into place only when everything is complete and synced.
(The shards themselves are written by `writer`.)
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import DiskFullError, DownloadError, OutputError
from ..files import json_bytes
from ..units import human_bytes


def check_destination(dest: Path, inputs: Iterable[Path], *, overwrite: bool, resume: bool = False) -> None:
    """Refuse a destination that is, contains or lies inside an input, a file, or a non-empty folder.
    With `resume` and no interrupted run beside it, a non-empty folder is left for the caller to judge:
    it may be this very merge, finished (`manifest.finished_merge`)."""
    target = dest.resolve()
    for path in inputs:
        source = path.resolve()
        if target == source or source in target.parents or target in source.parents:
            how = "is" if target == source else "lies inside" if source in target.parents else "contains"
            raise OutputError(f"{dest}: destination {how} the input {path}; choose a separate folder")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{dest}: destination exists and is not a folder")
    judged_later = resume and not partial_folder_of(dest).exists()  # by manifest.finished_merge
    if target.is_dir() and any(target.iterdir()) and not (overwrite or judged_later):
        raise OutputError(f"{dest}: destination folder is not empty; pass overwrite=True (--overwrite) to replace it")


def check_file_destination(dest: Path, inputs: Iterable[Path], *, overwrite: bool) -> None:
    """For an output that is one file (a GGUF file): refuse a destination that is or lies inside an input,
    a folder, or an existing file unless `overwrite`."""
    target = dest.resolve()
    for path in inputs:
        source = path.resolve()
        if target == source or source in target.parents:
            how = "is" if target == source else "lies inside"
            raise OutputError(f"{dest}: destination {how} the input {path}; choose a path outside the inputs")
    if target.is_dir():
        raise OutputError(f"{dest}: destination is a folder; name the file to write (ending in .gguf)")
    if target.exists() and not overwrite:
        raise OutputError(f"{dest}: destination file exists; pass overwrite=True (--overwrite) to replace it")


def partial_folder_of(dest: Path) -> Path:
    """Where a merge into `dest` is built: hidden, beside it, with a fixed name so `resume` can find it."""
    return dest.parent / f".{dest.name}.qwen-merge-partial"


@contextmanager
def staging_folder(dest: Path, *, resume: bool) -> Iterator[tuple[Path, bool]]:
    """The folder the output is built in, and whether it is new. An error removes a folder this run
    created; a resumed one is kept (a refused resume or a full disk must not throw away completed shards),
    and an interrupt (Ctrl-C) or a kill leaves it, so a later run with `resume` continues from it."""
    folder = partial_folder_of(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fresh = not folder.exists()
        if not fresh and not resume:
            raise OutputError(f"{folder}: an interrupted merge (or one still running) left this folder; pass "
                              f"resume=True (--resume) to continue it, or remove it to start over")
        if fresh:
            folder.mkdir()
    except OSError as e:
        raise OutputError(f"{dest}: cannot create a folder beside the destination: {e.strerror or e}") from e
    try:
        yield folder, fresh
    except Exception as e:
        if fresh and not isinstance(e, DownloadError):  # a download that failed can continue with resume
            shutil.rmtree(folder, ignore_errors=True)
        raise


def check_free_space(dest: Path, needed: int) -> None:
    """Fail before writing when the destination's filesystem clearly cannot hold the output."""
    free = free_bytes(dest)
    if free is not None and free < needed:
        raise DiskFullError(f"{dest}: the merge writes {human_bytes(needed)} ({needed} bytes) but only "
                            f"{human_bytes(free)} ({free} bytes) are free there")


def check_free_space_for(needs: list[tuple[Path, int, str]], hint: str = "") -> None:
    """Like `check_free_space` for several needs — (folder, bytes, what for) — that may share a filesystem."""
    by_device: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, count, what in needs:
        existing = next((f for f in (folder, *folder.parents) if f.exists()), None)
        if existing is not None and count > 0:
            by_device.setdefault(existing.stat().st_dev, []).append((existing, count, what))
    for group in by_device.values():
        total, free = sum(n for _, n, _ in group), free_bytes(group[0][0])
        if free is not None and free < total:
            parts = " and ".join(f"{human_bytes(n)} for {what}" for _, n, what in group)
            raise DiskFullError(f"{group[0][0]}: the merge needs {parts} ({total} bytes) on this filesystem but only "
                                f"{human_bytes(free)} ({free} bytes) are free{hint}")


def free_bytes(dest: Path) -> int | None:
    for folder in (dest, *dest.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def publish(temp: Path, dest: Path) -> None:
    """Move the finished folder to `dest`, replacing an existing one only after the new one is complete."""
    _fsync_dir(temp)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.qwen-merge-old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(temp, dest)
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_error(path: Path, e: OSError) -> OutputError:
    """One-line error for a failed write; running out of space (or of the file-size limit) is DiskFullError."""
    if e.errno == errno.EFBIG:
        return DiskFullError(f"{path}: the file-size limit (ulimit -f) stopped the write; "
                             f"{_free_text(path.parent)} are free on that filesystem")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"{path}: {e.strerror}: {_free_text(path.parent)} free on that filesystem")
    return OutputError(f"{path}: write failed: {e.strerror or e}")


def _free_text(folder: Path) -> str:
    free = free_bytes(folder) or 0
    return f"{human_bytes(free)} ({free} bytes)"  # the exact count too: it is what a user compares


def write_json(path: Path, value: dict) -> int:
    """Write JSON the way transformers does (indent 2, trailing newline); returns the byte count."""
    return write_bytes(path, json_bytes(value))


def write_bytes(path: Path, data: bytes) -> int:
    """Write a small file durably; returns the byte count."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(path, e) from e
    return len(data)


def write_json_atomic(path: Path, value: dict) -> None:
    """Replace `path` with `value` as JSON (sorted keys, so equal values give equal bytes), durably."""
    temp = path.with_name(path.name + ".tmp")
    data = json_bytes(value, sort_keys=True)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as e:
        raise write_error(path, e) from e


def copy_side_file(source: Path, folder: Path) -> int:
    try:
        shutil.copyfile(source, folder / source.name)
    except OSError as e:
        raise write_error(folder / source.name, e) from e
    return source.stat().st_size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
