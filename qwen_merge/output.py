"""The destination: refuse unsafe ones, build the output in a temporary folder beside it, write shard files
from a stream of pieces, and move the folder into place only when everything is complete and synced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from .compute import tensor_bytes
from .errors import DiskFullError, OutputError
from .stream import Piece, RawSpan
from .units import human_bytes

COPY_CHUNK = 64 << 20
INLINE_WRITE_BYTES = 256 << 10


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
        raise OutputError(f"{dest}: cannot create a folder beside the destination: {e.strerror or e}") from None
    try:
        yield folder, fresh
    except Exception:
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def check_free_space(dest: Path, needed: int) -> None:
    """Fail before writing when the destination's filesystem clearly cannot hold the output."""
    free = free_bytes(dest)
    if free is not None and free < needed:
        raise DiskFullError(f"{dest}: the merge writes {human_bytes(needed)} ({needed} bytes) but only "
                            f"{human_bytes(free)} ({free} bytes) are free there")


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


def write_shard(path: Path, header: bytes, pieces: Iterable[Piece],
                on_bytes: Callable[[int], None]) -> int:
    """Write a shard: header, then each piece at its place. Unchanged spans are coalesced and copied
    in the kernel. Writes run on one background thread while the next piece is computed; only one
    write is in flight, which is what lets `stream` reuse a block's buffer two blocks later.
    Returns the file size. The data is not yet synced: call `fsync_file` before publishing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-merge-write") as pool:
            in_flight: list[Future] = []

            def submit(job: Callable[[], None], nbytes: int) -> None:
                # Wait for the write in flight first, small or not: the stream reuses a block's buffer
                # two blocks later, so at most one block may ever be pending (a skipped wait here once
                # let a tensor's first block overwrite the previous tensor's block mid-write).
                if in_flight:
                    in_flight.pop().result()  # re-raises a failed write here, before more work is done
                if nbytes < INLINE_WRITE_BYTES:
                    job()  # handing a small write to the thread costs more than doing it
                else:
                    in_flight.append(pool.submit(job))

            size = _write_pieces(fd, header, pieces, path, submit, on_bytes)
            if in_flight:
                in_flight.pop().result()
    finally:
        os.close(fd)
    return size


def _write_pieces(fd: int, header: bytes, pieces: Iterable[Piece], path: Path,
                  submit: Callable[[Callable[[], None], int], None], on_bytes: Callable[[int], None]) -> int:
    _write_all(fd, memoryview(header), 0, path)
    pos, pending = len(header), None  # pending: a RawSpan of unchanged bytes not yet copied

    def flush() -> None:
        nonlocal pos
        if pending:
            submit(partial(_copy_span, pending.fd, fd, pending.offset, pos, pending.length, path, on_bytes),
                   pending.length)
            pos += pending.length

    for piece in pieces:
        if isinstance(piece, RawSpan):
            if pending and pending.fd == piece.fd and pending.offset + pending.length == piece.offset:
                pending = RawSpan(piece.fd, pending.offset, pending.length + piece.length)
                continue
            flush()
            pending = piece
        else:
            flush()
            pending = None
            data = tensor_bytes(piece.rows)
            submit(partial(_write_block, fd, data, pos, path, on_bytes), len(data))
            pos += len(data)
    flush()
    return pos


def _copy_span(src: int, fd: int, offset: int, pos: int, length: int, path: Path,
               on_bytes: Callable[[int], None]) -> None:
    for done in range(0, length, COPY_CHUNK):
        n = min(COPY_CHUNK, length - done)
        _copy_range(src, fd, offset + done, pos + done, n, path)
        on_bytes(n)


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, n: int, path: Path) -> int:
    """Copy n bytes in the kernel (reflink where the filesystem offers it), else through a buffer."""
    done = 0
    try:
        while done < n:
            got = os.copy_file_range(src, dst, n - done, src_off + done, dst_off + done)
            if got == 0:
                raise OutputError(f"{path}: source ended early while copying at byte {src_off + done}")
            done += got
        return done
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            raise write_error(path, e) from None
    data = os.pread(src, n - done, src_off + done)
    _write_all(dst, memoryview(data), dst_off + done, path)
    return n


def _write_block(fd: int, data: memoryview, pos: int, path: Path, on_bytes: Callable[[int], None]) -> None:
    _write_all(fd, data, pos, path)
    on_bytes(len(data))


def _write_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as e:
        raise write_error(path, e) from None


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


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read through one small reused buffer (no per-chunk allocations)."""
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def write_json(path: Path, value: dict) -> int:
    """Write JSON the way transformers does (indent 2, trailing newline); returns the byte count."""
    data = (json.dumps(value, indent=2) + "\n").encode("utf-8")
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(path, e) from None
    return len(data)


def copy_side_file(source: Path, folder: Path) -> int:
    try:
        shutil.copyfile(source, folder / source.name)
    except OSError as e:
        raise write_error(folder / source.name, e) from None
    return source.stat().st_size


def finish_file(part: Path, final: Path) -> dict:
    """Flush a written file to disk, hash it, and give it its final name; returns its size and SHA-256."""
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)  # Linux syncs a file's data through any descriptor of it
    except OSError as e:
        raise write_error(part, e) from None
    finally:
        os.close(fd)
    info = {"size": part.stat().st_size, "sha256": sha256_file(part)}
    os.replace(part, final)
    return info


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
