"""The Hub sink: a merge published to a Hugging Face Hub model repo in one commit, uploaded as it is made.

The shards are written by the folder sink (`FolderSink`, through the same `ShardWriter`) into a local folder:
`OUT` when the user keeps a copy, else a staging folder of its own. Each shard is uploaded as soon as it is
written, hashed and synced — `HfApi.preupload_lfs_files` on a thread of its own, while the next shard
merges — and its SHA-256 from the writer is its LFS object id, so nothing is read twice to hash it. The
merging thread waits before shard k+2 until shard k is uploaded, so at most about two output shards are on
disk at once. Without `OUT`, an uploaded shard's bytes are freed at once: the file stays as a sparse
placeholder of the same size (no disk blocks), so the folder sink's resume state still reads as complete.

Nothing is visible in the repo until the end: ONE `create_commit` holds the shards (already uploaded: the
commit only names their object ids), the index, config, generation config, tokenizer files,
`qwen_merge.json` and a model card, and with `overwrite` deletes the old model's files the new one does not
have. Uploaded LFS objects that no commit names are invisible, so a failure before the commit leaves the repo
exactly as it was.

Which shards are uploaded is recorded (name, SHA-256, size) in a small JSON file beside the local folder
(`UploadRecord`), rewritten atomically after each upload: `--resume` merges and uploads only the shards it
lacks, and the commit is made from the record alone. So the shards need not be uploaded by one process: any
process that uploads a shard with `upload_shard` and records it lets one process commit them all
(`commit_output`).

huggingface_hub does token discovery, `HF_ENDPOINT`, retries, and the transfer (Xet when available, else LFS).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FormatError, HubError, OptionError, UploadError
from ..files import read_json
from ..inputs.hub import transfer_errors
from ..planning.manifest import STRING, Fields, ShardRecord, read_manifest
from ..planning.memory import RING_SIZE
from .output import write_json_atomic

if TYPE_CHECKING:  # for annotations only
    from ..planning.plan import MergePlan
    from .base import ShardStream
    from .folder import FolderSink

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf",
                   ".h5", ".msgpack")
KEPT = frozenset({".gitattributes"})  # what `overwrite` never deletes: the Hub's own file
CARD = "README.md"
FINISH_GRACE_S = 60.0  # how long a shard whose pieces are all queued may take to be synced and renamed
_REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


@dataclass(frozen=True, slots=True)
class HubTarget:
    """Where a merge is published: `repo_id` ("org/name"), created `private` when new; the branch
    `revision` (None: the default branch; created from it when missing), or with `create_pr` a pull request
    against it; the commit message; and whether a repo that holds weights already may be replaced."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    overwrite: bool = False

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True, slots=True)
class Published:
    """The commit that published the merge: its URL and id, and the pull request's URL with `create_pr`."""

    commit_url: str
    commit: str
    pr_url: str | None
    deleted: tuple[str, ...]


def check_repo_id(repo_id: str) -> None:
    """A repo id the Hub accepts for a new model: "org/name" (letters, digits, '-', '_', '.').

    Raises:
        OptionError: it is not one (before anything is merged)."""
    org, slash, name = repo_id.partition("/")
    if not slash or not all(_REPO_NAME.fullmatch(part) and ".." not in part and not part.endswith((".", "-"))
                            for part in (org, name)) or name.endswith(".git"):
        raise OptionError(f"{repo_id!r}: not a valid Hub repo id for the merged model: expected 'org/name' (letters, "
                          f"digits, '-', '_' and '.', at most 96 characters each; not ending in '.', '-' or '.git')",
                          option="push_to_hub")


def check_credentials(target: HubTarget) -> None:
    """The Hub can be asked (not offline) and a token was found (`hf auth login`, HF_TOKEN): before planning.

    Raises:
        HubError: offline mode is on, or no token."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{target.repo_id}: pushing needs the Hub, and offline mode is on (HF_HUB_OFFLINE=1); unset "
                       f"it to push")
    if get_token() is None:
        raise HubError(f"{target.repo_id}: pushing needs a Hugging Face token with write access and none was found: "
                       f"log in with `hf auth login`, or set HF_TOKEN")


def prepare_repo(target: HubTarget, new_files: frozenset[str]) -> tuple[str, ...]:
    """Before anything is merged: a token is there, the repo exists (created, `private`, if not) and can be
    written, the branch exists, and the repo holds no weights unless `overwrite`. Returns the files the
    commit deletes: with `overwrite`, those of the repo's revision that `new_files` does not replace.

    Raises:
        HubError: not logged in, no write access, or the repo holds a model already (without `overwrite`).
        UploadError: the Hub cannot be reached."""
    from huggingface_hub import HfApi

    check_credentials(target)
    api = HfApi()
    with _upload_errors(target, "creating the repo"):
        api.create_repo(target.repo_id, private=target.private, exist_ok=True)
        if target.revision is not None and not target.create_pr:
            api.create_branch(target.repo_id, branch=target.revision, exist_ok=True)
        present = api.list_repo_files(target.repo_id, revision=target.revision)
    weights = sorted(f for f in present if f.endswith(WEIGHT_SUFFIXES))
    if weights and not target.overwrite:
        raise HubError(f"{target}: the repo already holds a model ({', '.join(weights[:3])}"
                       f"{', ...' if len(weights) > 3 else ''}); pass overwrite=True (--overwrite) to replace it "
                       f"(its files the new model does not have are deleted in the same commit)")
    if not target.overwrite:
        return ()
    return tuple(sorted(f for f in present if f not in new_files and f not in KEPT))


class UploadRecord:
    """The shards uploaded to one repo (name -> SHA-256 and size), in a JSON file rewritten atomically after
    each upload; a record of another repo is not reused."""

    def __init__(self, path: Path, repo_id: str, shards: dict[str, ShardRecord] | None = None) -> None:
        self.path, self.repo_id, self.shards = path, repo_id, dict(shards or {})
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, repo_id: str) -> UploadRecord:
        if not path.is_file():
            return cls(path, repo_id)
        read = Fields(read_json(path, path.name), path)  # a field of the wrong kind: one FormatError naming it
        if read.get("repo", STRING) != repo_id:
            return cls(path, repo_id)
        shards = read.records("uploaded", ShardRecord.from_json)
        if lacking := [name for name, shard in shards.items() if shard.sha256 is None or shard.size is None]:
            raise FormatError(f"{path}: the record of uploaded shard {lacking[0]!r} lacks its sha256 or size; remove "
                              f"the file and push again without --resume")
        return cls(path, repo_id, shards)

    def add(self, name: str, shard: ShardRecord) -> None:
        with self._lock:
            self.shards[name] = shard
            doc = {"repo": self.repo_id, "uploaded": {n: s.to_json() for n, s in self.shards.items()}}
        write_json_atomic(self.path, doc)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def record_path_of(dest: Path) -> Path:
    """Where the upload record of a merge built at `dest` is kept: beside it, hidden, with a fixed name."""
    return dest.parent / f".{dest.name}.qwen-merge-uploads.json"


def upload_shard(target: HubTarget, path: Path, shard: ShardRecord) -> None:
    """Upload one finished shard's bytes as an LFS object of the repo (not committed: invisible until a
    commit names it). `shard.sha256` is its object id: a repo that has the object already is sent nothing."""
    from huggingface_hub import CommitOperationAdd, HfApi

    operation = CommitOperationAdd(path.name, str(path))
    operation.upload_info.sha256 = bytes.fromhex(shard.sha256)  # the writer hashed it: no second read
    with _upload_errors(target, f"uploading {path.name}"):
        HfApi().preupload_lfs_files(target.repo_id, [operation], revision=target.revision,
                                    create_pr=target.create_pr)


def _uploaded(name: str, shard: ShardRecord):
    """The commit operation of a shard uploaded before, from its record alone (no local bytes), as
    huggingface_hub leaves an operation once `preupload_lfs_files` has freed its memory."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    operation = CommitOperationAdd(name, b"")
    operation.upload_info = UploadInfo(size=shard.size, sample=b"", sha256=bytes.fromhex(shard.sha256))
    operation._upload_mode, operation._is_uploaded = "lfs", True  # what preupload_lfs_files sets
    return operation


def commit_output(target: HubTarget, folder: Path, shards: dict[str, ShardRecord], card: bytes,
                  deletions: tuple[str, ...]) -> Published:
    """The one commit: the uploaded `shards` (by record), every other file of `folder` (index, config,
    tokenizer, manifest), the model card as README.md, and `deletions`.

    Raises:
        UploadError: the server refused the commit or could not be reached; the repo is unchanged."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    operations = [_uploaded(name, shard) for name, shard in shards.items()]
    operations += [CommitOperationAdd(p.name, str(p)) for p in sorted(folder.iterdir())
                   if p.is_file() and p.name not in shards and p.name != CARD]
    operations.append(CommitOperationAdd(CARD, card))
    operations += [CommitOperationDelete(path) for path in deletions]
    message = target.commit_message or "Upload merged model (qwen-merge)"
    with _upload_errors(target, "committing"):
        info = HfApi().create_commit(target.repo_id, operations, commit_message=message,
                                     revision=target.revision, create_pr=target.create_pr)
    return Published(info.commit_url, info.oid, info.pr_url, deletions)


@contextmanager
def _upload_errors(target: HubTarget, doing: str) -> Iterator[None]:
    """huggingface_hub's exceptions while writing to `target` as one line: an access problem is a HubError,
    anything else (a dropped connection, a refused upload or commit) an UploadError that says `--resume`."""
    from huggingface_hub import errors

    try:
        yield
    except errors.HFValidationError as e:
        raise OptionError(f"{target.repo_id!r}: not a valid Hub repo id: {e}", option="push_to_hub") from e
    except errors.RevisionNotFoundError as e:
        raise HubError(f"{target}: {doing}: branch {target.revision!r} not found in {target.repo_id}") from e
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403) or isinstance(e, errors.RepositoryNotFoundError):
            raise HubError(f"{target}: {doing}: the Hub refused ({status}: {_server_says(e)}); check that your "
                           f"token (`hf auth login`, or HF_TOKEN) has write access to "
                           f"{target.repo_id.split('/')[0]}") from e
        raise _failed(target, doing, e) from e
    except (*transfer_errors(), RuntimeError, ValueError) as e:
        # a dropped connection or a timeout, and huggingface_hub's RuntimeError or ValueError around a failed
        # LFS transfer
        raise _failed(target, doing, e) from e


def _failed(target: HubTarget, doing: str, e: BaseException) -> UploadError:
    reason = _reason(e)
    return UploadError(f"{target}: {doing} failed ({reason}); nothing was committed: run the same command again "
                       f"with --resume to send only what is missing", reason=reason)


def _server_says(e: Exception) -> str:
    text = getattr(e, "server_message", None) or str(e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _reason(e: BaseException) -> str:
    while e.__cause__ is not None and isinstance(e, RuntimeError):  # "Error while uploading 'x' to the Hub."
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class Uploader:
    """Shards uploaded on a thread of their own, in the order they finish; each recorded once the Hub has it.
    `keep_local` False: the shard's bytes are then freed (a sparse placeholder of the same size remains)."""

    def __init__(self, target: HubTarget, record: UploadRecord, keep_local: bool) -> None:
        self.target, self.record, self.keep_local = target, record, keep_local
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qwen-merge-upload")
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()

    def future(self, name: str) -> Future:
        """The upload of shard `name`: done once it is uploaded and recorded."""
        with self._lock:
            return self._futures.setdefault(name, Future())

    def submit(self, path: Path, shard: ShardRecord) -> None:
        done = self.future(path.name)
        self._pool.submit(self._upload, path, shard, done)

    def _upload(self, path: Path, shard: ShardRecord, done: Future) -> None:
        try:
            upload_shard(self.target, path, shard)
            self.record.add(path.name, shard)
            if not self.keep_local:
                _free_bytes(path, shard.size)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for this shard
            done.set_exception(e)
        else:
            done.set_result(None)

    def close(self) -> None:
        """Wait for every upload submitted; raise the first failure."""
        self._pool.shutdown(wait=True)
        for future in list(self._futures.values()):
            if future.done():
                future.result()

    def abort(self) -> None:
        for future in list(self._futures.values()):
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _free_bytes(path: Path, size: int) -> None:
    """The shard's disk blocks freed, its size kept (a sparse file): the folder still reads as complete."""
    with open(path, "r+b") as f:
        f.truncate(0)
        f.truncate(size)
        os.fsync(f.fileno())


class HubSink:
    """A merge published to the Hub: the shards through `folder` (a `FolderSink` into OUT or a staging folder;
    None when the folder is finished already and only the commit is left), each uploaded once written; then
    the folder completed and everything committed at once. `consume` returns the `Published` commit."""

    def __init__(self, plan: MergePlan, target: HubTarget, record: UploadRecord, deletions: tuple[str, ...],
                 card: Callable[[Path], bytes], *, keep_local: bool, folder: FolderSink | None = None) -> None:
        self.plan, self.target, self.record, self.deletions = plan, target, record, deletions
        self.card, self.keep_local, self.folder = card, keep_local, folder
        self.uploaded_now: list[str] = []

    ring_size = RING_SIZE

    def done(self) -> frozenset[str]:
        return self.folder.done()

    def consume(self, streams: Iterator[ShardStream]) -> Published:
        uploader = Uploader(self.target, self.record, self.keep_local)
        try:
            for name, shard in self.folder.state.done.items():  # written by an interrupted run, not uploaded
                if name not in self.record.shards:
                    self.uploaded_now.append(name)
                    uploader.submit(self.folder.folder / name, shard)
            self.folder.write_shards(self._uploading(streams, uploader))
            uploader.close()
        except BaseException:
            uploader.abort()
            raise
        self.folder.complete()
        return self.publish(self.folder.dest)

    def publish(self, dest: Path) -> Published:
        """Upload what the record lacks from the finished folder `dest` (its manifest has their SHA-256),
        then commit."""
        names = [s.name for s in self.plan.shards]
        if missing := [n for n in names if n not in self.record.shards]:
            uploader = Uploader(self.target, self.record, self.keep_local)
            listed = read_manifest(dest).shards
            for name in missing:
                uploader.submit(dest / name, listed[name])
            uploader.close()
            self.uploaded_now += [n for n in missing if n not in self.uploaded_now]
        shards = {n: self.record.shards[n] for n in names}
        published = commit_output(self.target, dest, shards, self.card(dest), self.deletions)
        self.record.remove()
        return published

    def _uploading(self, streams: Iterator[ShardStream], uploader: Uploader) -> Iterator[ShardStream]:
        """The streams, each shard handed to the uploader when finished; before shard k+2 is merged, shard k
        must be uploaded (disk: about two shards), and an upload failure stops the merge there."""
        behind: list[str] = []
        for stream in streams:
            if len(behind) >= 2:
                self._wait_uploaded(behind.pop(0), uploader)
            behind.append(stream.shard.name)
            self.uploaded_now.append(stream.shard.name)
            yield replace(stream, finished=self._finisher(stream, uploader))

    def _wait_uploaded(self, name: str, uploader: Uploader) -> None:
        """Wait until shard `name` is uploaded (raising its upload's error). It is handed over once the
        writer has synced and renamed it, which takes moments after its last piece was queued; a shard the
        writer failed never is, and the writer raises that failure in this thread once it is not waited for."""
        deadline = time.monotonic() + FINISH_GRACE_S
        while name not in self.folder.state.done:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        uploader.future(name).result()

    def _finisher(self, stream: ShardStream, uploader: Uploader) -> Callable[[], None]:
        folder, state, name, release = self.folder.folder, self.folder.state, stream.shard.name, stream.finished

        def finished() -> None:  # on the writer's finisher thread: the shard is synced, renamed and recorded
            uploader.submit(folder / name, state.done[name])
            release()
        return finished
