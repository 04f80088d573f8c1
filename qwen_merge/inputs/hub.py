"""Hugging Face Hub repo ids as inputs, through `huggingface_hub` and its cache.

A `str` that is not an existing path and reads `org/name` or `org/name@revision` names a model repo. It
is resolved to one commit first, so every file comes from the same snapshot; files are read from the
standard cache (`HF_HUB_CACHE` / `HF_HOME`) and downloaded there when missing, with huggingface_hub's token
discovery (`HF_TOKEN`, the stored login), offline mode (`HF_HUB_OFFLINE`) and endpoint (`HF_ENDPOINT`).
Planning reads JSON files and each shard's header (range requests), never the weights.

huggingface_hub is imported inside the functions, so a merge of local folders never pays for it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import DownloadError, HubError
from ..files import (ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS, INDEX_NAME, MANIFEST_NAME, MODEL_CONFIG,
                     SINGLE_NAME, read_json)
from .checkpoint import Checkpoint, HubOrigin, check_index_matches, is_side_file, read_index, stored_map
from .tensorfile import MAX_HEADER_BYTES, TensorFile, parse_header, read_header

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
HEADER_GUESS = 1 << 16  # the first range request; a header larger than this takes a second one


@dataclass(frozen=True, slots=True)
class RepoRef:
    """A repo id as the user wrote it: `revision` is a branch, tag or commit, None for the default branch."""

    repo_id: str
    revision: str | None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def repo_ref(value: object) -> RepoRef | None:
    """The repo a `str` input names, or None for a path. A path that exists always wins, and a `Path`
    object is always a path."""
    if not isinstance(value, str) or os.path.exists(value):
        return None
    name, at, revision = value.partition("@")
    if not _NAME.fullmatch(name) or ".." in name or (at and not revision.strip()):
        return None
    return RepoRef(name, revision or None)


def _no_path(value: str) -> str:
    """The first half of the error for a repo id the Hub does not know: a `str` taken for a repo id is
    never an existing path, and it may be a mistyped one, so the error says that no path of that name
    exists either (relative to this directory)."""
    return f"{value}: no file or folder of that name in {Path.cwd()}, and"


def resolve(ref: RepoRef) -> HubOrigin:
    """The commit `ref` points at, and the repo's files at that commit with their sizes. Offline, or when
    the Hub cannot be reached, the cache alone answers (its `refs/<branch>` file names the commit)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return _resolve_offline(ref, "offline mode is on (HF_HUB_OFFLINE=1)")
    try:
        with hub_errors(ref.repo_id, ref.revision):
            info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    except DownloadError as e:  # no network: the cache may still have it, as huggingface_hub's downloads do
        return _resolve_offline(ref, f"the Hub cannot be reached ({e.reason})")
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or ()}
    folder = _repo_folder(ref.repo_id) / "snapshots" / info.sha
    if ref.revision != info.sha:  # so later offline runs find this commit by the name the user gave
        _remember_ref(ref.repo_id, ref.revision or "main", info.sha)
    cached = frozenset(n for n in sizes if (folder / n).is_file())
    return HubOrigin(ref.repo_id, ref.revision, info.sha, folder, sizes, cached)


def open_hub_checkpoint(origin: HubOrigin) -> Checkpoint:
    """A Hub repo as a base checkpoint, from its JSON files and shard headers: `config.json`, the index and
    a previous merge's `qwen_merge.json` are fetched; the weights are not.

    Raises:
        HubError: the repo has no safetensors weights (only pickles), or a file cannot be fetched.
        FormatError: the index or a header breaks the format.
    """
    top = [n for n in origin.sizes if "/" not in n]
    index_names = [n for n in top if n.endswith(".safetensors.index.json")]
    index_name = INDEX_NAME if INDEX_NAME in top else index_names[0] if len(index_names) == 1 else None
    if index_name is not None:
        weight_map, metadata = read_index(fetch(origin, index_name), listed=lambda n: _listed(origin, n))
        names = sorted(set(weight_map.values()))
    else:
        names, metadata = [_single_weights(origin, top)], {}
    shards = tuple(shard_header(origin, n) for n in names)
    if index_name is not None:
        weight_map = check_index_matches(origin.folder / index_name, weight_map, shards)
    else:
        weight_map = stored_map(shards)
    used = set(names) | {index_name, MANIFEST_NAME}
    if MANIFEST_NAME in top:  # a checkpoint qwen-merge made: it says which adapters are in it already
        fetch(origin, MANIFEST_NAME)
    config = read_json(fetch(origin, MODEL_CONFIG), MODEL_CONFIG) if MODEL_CONFIG in top else None
    side = tuple(origin.folder / n for n in sorted(top) if n not in used and is_side_file(n))
    skipped = tuple(sorted(n for n in top if n not in used and not is_side_file(n) and not n.startswith(".")))
    return Checkpoint(origin.folder, shards, weight_map, index_name, metadata, side, skipped, config, hub=origin)


def _listed(origin: HubOrigin, name: str) -> bool:
    if name not in origin.sizes and origin.offline:
        raise DownloadError(f"{origin}: {name}: not in the Hugging Face cache, and the Hub cannot be reached or "
                            f"offline mode is on (HF_HUB_OFFLINE); connect and run again", reason="not cached")
    return name in origin.sizes


def _single_weights(origin: HubOrigin, top: list[str]) -> str:
    weights = [n for n in top if n.endswith(".safetensors")]
    if SINGLE_NAME in weights or len(weights) == 1:
        return SINGLE_NAME if SINGLE_NAME in weights else weights[0]
    pickles = [n for n in top if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise HubError(f"{origin}: has only PyTorch pickle weights ({', '.join(sorted(pickles)[:3])}), no "
                       f"safetensors; qwen-merge reads safetensors only: use a safetensors revision of the model "
                       f"(or convert it, e.g. load and save_pretrained with transformers)")
    found = ", ".join(weights) or "none"
    raise HubError(f"{origin}: expected {SINGLE_NAME} or {INDEX_NAME} at commit {origin.commit[:12]}; "
                   f"safetensors files found: {found}")


def fetch_adapter(origin: HubOrigin, allow_pickle: bool, extra: Iterable[str] = ()) -> Path:
    """Download an adapter repo's config and weights (they are small), and the `extra` files it has at its
    top level (the tokenizer saved beside the adapter), and return its snapshot folder."""
    if ADAPTER_CONFIG not in origin.sizes:
        raise HubError(f"{origin}: not a PEFT adapter: the repo has no {ADAPTER_CONFIG} at commit "
                       f"{origin.commit[:12]} (a model repo given as ADAPTER? BASE comes first)")
    fetch(origin, ADAPTER_CONFIG)
    for name in (ADAPTER_WEIGHTS, ADAPTER_PICKLE if allow_pickle else None, *extra):
        if name in origin.sizes:
            fetch(origin, name)
    return origin.folder


def _resolve_offline(ref: RepoRef, why: str) -> HubOrigin:
    repo = _repo_folder(ref.repo_id)
    revision = ref.revision or "main"
    commit = revision if _COMMIT.fullmatch(revision) else _read_ref(repo, revision)
    folder = repo / "snapshots" / (commit or "?")
    if commit is None or not folder.is_dir():
        raise HubError(f"{_no_path(str(ref))} as a Hub repo id it is not in the Hugging Face cache "
                       f"({repo.parent}) and {why}; check the path, or run once with the Hub reachable "
                       f"(HF_HUB_OFFLINE unset)")
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return HubOrigin(ref.repo_id, ref.revision, commit, folder, sizes, frozenset(sizes), offline=True)


def _repo_folder(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _read_ref(repo: Path, revision: str) -> str | None:
    try:
        commit = (repo / "refs" / revision).read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def _remember_ref(repo_id: str, revision: str, commit: str) -> None:
    """Write `refs/<revision>` as huggingface_hub does when it downloads by that name."""
    path = _repo_folder(repo_id) / "refs" / revision
    try:
        if not path.is_file() or path.read_text().strip() != commit:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(commit)
    except OSError:  # a read-only cache: offline runs by branch name will not find it, nothing else breaks
        pass


def fetch(origin: HubOrigin, name: str, tqdm_class: type | None = None) -> Path:
    """The cached path of `name` at the origin's commit, downloaded first when it is not in the cache."""
    from huggingface_hub import hf_hub_download

    if name in origin.cached:
        return origin.folder / name
    with hub_errors(origin.repo_id, origin.revision, name):
        return Path(hf_hub_download(origin.repo_id, name, revision=origin.commit, tqdm_class=tqdm_class))


def shard_header(origin: HubOrigin, name: str) -> TensorFile:
    """The parsed header of a shard, from the cache, or else from the Hub with range requests (the
    first 64 KiB, then the rest of a larger header): the weights are not downloaded. Its `path` is where
    the shard will be in the cache."""
    path = origin.folder / name
    if name in origin.cached:
        return read_header(path)
    size = origin.sizes.get(name, 0)
    first = _range(origin, name, 0, min(HEADER_GUESS, size) - 1) if size else b""  # empty: parse_header says so
    length = int.from_bytes(first[:8], "little") if len(first) >= 8 else 0
    if len(first) < 8 + length <= 8 + MAX_HEADER_BYTES:
        first += _range(origin, name, len(first), 8 + length - 1)
    return parse_header(path, first, size)


def read_range(origin: HubOrigin, name: str, offset: int, length: int) -> bytes:
    """`length` bytes of file `name` from `offset`, from the cache or with one range request (the file is not
    downloaded): the small tensors a planner needs from a shard not fetched yet."""
    if name in origin.cached:
        with open(origin.folder / name, "rb") as f:
            f.seek(offset)
            return f.read(length)
    return _range(origin, name, offset, offset + length - 1)


def _range(origin: HubOrigin, name: str, start: int, end: int) -> bytes:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(origin.repo_id, name, revision=origin.commit)
    with hub_errors(origin.repo_id, origin.revision, name):
        response = get_session().get(url, headers={**build_hf_headers(), "Range": f"bytes={start}-{end}"},
                                     follow_redirects=True)
        hf_raise_for_status(response)
    data = response.content
    if response.status_code == 200:  # a server that ignores ranges sends the whole file
        data = data[start:end + 1]
    return data


def release(origin: HubOrigin, name: str) -> None:
    """Remove a file this run downloaded from the cache: its snapshot link and the blob, unless another
    snapshot links to the same blob. Files that were cached before the run are never removed."""
    if name in origin.cached:
        return
    link = origin.folder / name
    blob = link.resolve() if link.is_symlink() else None
    link.unlink(missing_ok=True)
    if blob is not None and blob.is_file() and not _linked_elsewhere(blob, origin.folder.parent):
        blob.unlink()


def _linked_elsewhere(blob: Path, snapshots: Path) -> bool:
    return any(p.is_symlink() and p.resolve() == blob for p in snapshots.rglob("*"))


def transfer_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a failed transfer that huggingface_hub lets through: its HTTP errors, whose class
    `HfHubHTTPError` derives from its HTTP client's `httpx2.HTTPError`; the client's own transport errors
    (connection refused or dropped, timeouts), which are `httpx2.HTTPError` too; and OSError."""
    import httpx2  # huggingface_hub 2's HTTP client

    return httpx2.HTTPError, OSError


@contextmanager
def hub_errors(repo_id: str, revision: str | None, name: str | None = None) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line HubErrors (DownloadError for a network failure)."""
    from huggingface_hub import errors

    where = str(RepoRef(repo_id, revision)) + (f": {name}" if name else "")
    try:
        yield
    except errors.GatedRepoError as e:
        raise HubError(f"{where}: gated repository: accept its conditions on the Hub with your account, then log "
                       f"in (`hf auth login`, or set HF_TOKEN) so this machine uses that account's token") from e
    except errors.RepositoryNotFoundError as e:
        raise HubError(f"{_no_path(str(RepoRef(repo_id, revision)))} no such repository on the Hub, or it is "
                       f"private: check the path or the id, or log in (`hf auth login`, or set HF_TOKEN) with an "
                       f"account that can read it") from e
    except errors.RevisionNotFoundError as e:
        raise HubError(f"{where}: revision {revision!r} not found in {repo_id} (a branch, tag or commit)") from e
    except errors.RemoteEntryNotFoundError as e:
        raise HubError(f"{where}: file not found in {repo_id} at this revision") from e
    except errors.LocalEntryNotFoundError as e:  # offline, or no connection, and not in the cache
        raise DownloadError(f"{where}: not in the Hugging Face cache, and the Hub cannot be reached or offline "
                            f"mode is on (HF_HUB_OFFLINE); connect and run again with --resume",
                            reason="not cached") from e
    except transfer_errors() as e:
        raise DownloadError(f"{where}: download failed ({_reason(e)}); run the same command again with --resume "
                            f"to continue (completed files are kept)", reason=_reason(e)) from e


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class Downloads:
    """The base shards a merge reads, fetched into the cache on a thread of their own in the order the
    merge reads them, so shard k+1 downloads while shard k is merged.

    `wait(path)` blocks until that file is in the cache (`sources.Files` calls it before opening one).
    With `low_disk`, at most two downloaded shards are kept ahead of the merge (more only when one output
    shard reads more at once), and `release(name)` deletes a shard this run downloaded once the output
    shards that read it are complete. `on_bytes(n)` is told of every downloaded byte."""

    def __init__(self, origin: HubOrigin, order: tuple[str, ...], *, low_disk: bool,
                 on_bytes: Callable[[int], None] = lambda n: None) -> None:
        self.origin, self.low_disk = origin, low_disk
        self._futures = {name: Future() for name in order}
        self._held: set[str] = set()  # downloaded by this run and not yet released
        self._wanted: set[str] = set()  # a reader waits for it: download it whatever the window
        self._stopped = False
        self._cond = threading.Condition()
        self._tqdm = _feeding(on_bytes)
        self._thread = threading.Thread(target=self._run, args=(order,), name="qwen-merge-download", daemon=True)
        self._thread.start()

    def wait(self, path: Path) -> None:
        future = self._futures.get(path.name) if path.parent == self.origin.folder else None
        if future is None:
            return
        with self._cond:
            self._wanted.add(path.name)
            self._cond.notify_all()
        future.result()

    def release(self, name: str) -> None:
        if not self.low_disk:
            return
        with self._cond:
            if name not in self._held:
                return
            self._held.discard(name)
            self._cond.notify_all()
        release(self.origin, name)

    def close(self) -> None:
        """Stop downloading ahead. After a finished merge every download is done; after an error the one in
        flight is not waited for (it may be a multi-GB file): its thread ends with the process."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)

    def _run(self, order: tuple[str, ...]) -> None:
        for i, name in enumerate(order):
            try:
                with self._cond:
                    while (self.low_disk and len(self._held) >= 2 and name not in self._wanted
                           and not self._stopped):
                        self._cond.wait()
                    if self._stopped:
                        raise DownloadError(f"{self.origin.repo_id}: {name}: download stopped", reason="stopped")
                fetch(self.origin, name, self._tqdm)
            except BaseException as e:  # noqa: BLE001 - handed to the readers that wait for these files
                for rest in order[i:]:
                    self._futures[rest].set_exception(e)
                return
            with self._cond:
                self._held.add(name)  # `order` holds only files the cache lacked
            self._futures[name].set_result(None)


def _feeding(on_bytes: Callable[[int], None]) -> type:
    """A tqdm class for huggingface_hub's downloads that shows nothing and forwards each byte count."""
    from tqdm import tqdm

    class Feed(tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            on_bytes(int(kwargs.get("initial") or 0))  # a resumed download's bytes already on disk

        def update(self, n: float | None = 1) -> bool | None:
            on_bytes(int(n or 0))
            return super().update(n)

    return Feed
