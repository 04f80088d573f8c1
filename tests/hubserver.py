"""A fake Hugging Face Hub, served over HTTP on 127.0.0.1, for tests that must not touch the network.

`FakeHub` serves *model* repos registered from local folders, with the endpoints and headers that
huggingface_hub 2.4 needs for `hf_hub_download`, `snapshot_download`, `HfApi.model_info` / `repo_info`
(`files_metadata=True` too), `list_repo_files`, `list_repo_tree`, `get_paths_info`, `list_repo_refs`,
`file_exists`, `resolve_revision`, `get_safetensors_metadata` and `parse_safetensors_file_metadata`::

    with FakeHub() as hub:
        sha = hub.add_repo("org/tiny", folder)        # branch "main" -> the commit of folder's files
        use_hub(monkeypatch, hub, tmp_path / "cache") # in-process huggingface_hub now talks to it
        hf_hub_download("org/tiny", "config.json")

Served routes (repo ids "org/name" or "name"; revisions are branches, tags, `refs/heads/x`,
`refs/tags/x` or full 40-hex commit shas, URL-quoted or not):

* `HEAD|GET /{repo}/resolve/{revision}/{path}`: the file, directly (never a redirect). Headers: `ETag`
  (quoted; the git blob sha1 of regular files, the sha256 of LFS files), `X-Repo-Commit`,
  `Content-Length`, `Accept-Ranges: bytes`, and for LFS files `X-Linked-Etag` (sha256) and
  `X-Linked-Size`. `Range: bytes=a-b`, `bytes=a-` and `bytes=-n` give 206 + `Content-Range` (the end is
  clamped to the file; a start past the end gives 416). A file is LFS if its suffix is in
  `FakeHub.lfs_suffixes` (`.safetensors`, `.bin`, ...) or it is 10 MiB or more.
* `GET /api/models/{repo}` and `/api/models/{repo}/revision/{revision}`: model info JSON (`id`, `sha`,
  `siblings`, `private`, `gated`, `lastModified`, `usedStorage`, `safetensors` {parameters, total} computed
  from the headers, `config` {architectures, model_type}); `?blobs=true` adds `size`, `blobId` and `lfs`
  {sha256, size, pointerSize} to the siblings; `?expand=x&expand=y` keeps only those keys.
* `GET /api/models/{repo}/tree/{revision}[/{path}]?recursive=&expand=`: tree listing (files and
  directories), one page unless `hub.tree_page_size` is set (then `Link: <...>; rel="next"` pages).
* `POST /api/models/{repo}/paths-info/{revision}` (form `paths`, `expand`) and `GET /api/models/{repo}/refs`.
* `GET /api/agent-harnesses`: an empty registry (huggingface_hub fetches it once per process to build its
  user agent unless telemetry is disabled; `use_hub` / `hub_env` disable telemetry so it is never asked).

Errors carry `X-Error-Code` / `X-Error-Message` like the real Hub, which is what `hf_raise_for_status`
reads: unknown repo -> 404 `RepoNotFound` (`RepositoryNotFoundError`); private repo without a valid token
-> 401 `RepoNotFound` (`RepositoryNotFoundError`); unknown revision -> 404 `RevisionNotFound`
(`RevisionNotFoundError`); unknown file -> 404 `EntryNotFound` with `X-Repo-Commit`
(`RemoteEntryNotFoundError`, a subclass of `EntryNotFoundError`; huggingface_hub then caches the absence
under `.no_exist/`); gated repo file without a valid token -> 401 `GatedRepo` (`GatedRepoError`; like the
real Hub, model info and tree listings of a gated repo stay public); an `Authorization` header with a token
that is not in `hub.tokens` -> 401 "Invalid credentials in Authorization header" (plain `HfHubHTTPError`).
Tokens are sent as `Authorization: Bearer <token>`; `hub.tokens` defaults to {"hf_test_token"}.

Failure injection:

* `hub.fail_once(repo, path, after_bytes)`: the next GET of that file sends its headers with the full
  Content-Length, `after_bytes` of the body, then drops the connection. `mode="reset"` (default) closes
  with a TCP RST: httpx2 raises `httpx2.ReadError` (a `httpx2.TransportError`, neither an `OSError` nor an
  `HfHubHTTPError`), which `http_get` does not retry, so `hf_hub_download` / `snapshot_download` raise
  `httpx2.ReadError`; nothing is left in the cache (the per-process temporary file is deleted) and the next
  call downloads from byte 0. `mode="close"` closes cleanly (FIN) mid-body: httpx2 raises
  `httpx2.RemoteProtocolError`, which `http_get` catches; after `time.sleep(1)` it resumes *within the same
  call* (up to 5 times), so `hf_hub_download` succeeds. It resumes from the bytes it has written, and it
  writes in `constants.DOWNLOAD_CHUNK_SIZE` (10 MiB) pieces: a file cut in its first 10 MiB is fetched
  again from 0 without a Range header; further in, with `Range: bytes=<k * 10 MiB>-`.
* `hub.offline_all("refuse")`: the port is closed (connection refused, `httpx2.ConnectError`):
  `hf_hub_download` returns the cached file, or raises `LocalEntryNotFoundError` (`__cause__` the
  ConnectError) after retrying the HEAD call with back-off (1+2+4+8+8 s of sleeps!); `HfApi` calls raise the
  bare `httpx2.ConnectError`. `hub.offline_all("503")`: every request gets 503: `hf_hub_download` returns the
  cached file or retries (same back-off) then raises `LocalEntryNotFoundError`; `HfApi().model_info` raises
  `HfHubHTTPError` (503) at once; tree listings retry with back-off. `hub.online()` restores service on the
  same port. `use_hub(..., fast_retries=True)` removes huggingface_hub's back-off sleeps in-process.

Every request is logged in `hub.requests` as `(method, path_with_query, range_header_or_None)`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import threading
import time
import types
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeHub", "HubFile", "Req", "hub_env", "use_hub"]

_SHA_RE_CHARS = frozenset("0123456789abcdef")
_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)
_CHUNK = 1 << 16


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _is_sha(text: str) -> bool:
    return len(text) == 40 and set(text) <= _SHA_RE_CHARS


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Repo model


@dataclass(frozen=True)
class HubFile:
    """One file of a commit. `etag` is what the Hub sends as ETag (sha256 for LFS, git blob sha1 otherwise)."""

    path: str
    data: bytes
    sha256: str
    git_oid: str  # git blob sha1 of the content, or of the LFS pointer for LFS files
    lfs: bool
    pointer_size: int  # size of the LFS pointer (0 for regular files)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid

    @classmethod
    def make(cls, path: str, data: bytes, lfs: bool) -> HubFile:
        sha256 = hashlib.sha256(data).hexdigest()
        if lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
            return cls(path, data, sha256, _git_blob_sha1(pointer), True, len(pointer))
        return cls(path, data, sha256, _git_blob_sha1(data), False, 0)


@dataclass
class _Commit:
    sha: str
    files: dict[str, HubFile]
    date: datetime

    def directories(self) -> set[str]:
        dirs: set[str] = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs


@dataclass
class _Repo:
    repo_id: str
    gated: bool = False
    private: bool = False
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[str, str] = field(default_factory=dict)  # "refs/pr/1" -> commit
    lfs: dict[str, bytes] = field(default_factory=dict)  # LFS objects uploaded and verified, by sha256

    def resolve(self, revision: str) -> _Commit | None:
        if revision.startswith("refs/heads/"):
            sha = self.branches.get(revision[len("refs/heads/"):])
        elif revision.startswith("refs/tags/"):
            sha = self.tags.get(revision[len("refs/tags/"):])
        elif revision.startswith("refs/pr/"):
            sha = self.prs.get(revision)
        else:
            sha = self.branches.get(revision) or self.tags.get(revision)
            if sha is None and _is_sha(revision):
                sha = revision
        return self.commits.get(sha) if sha else None


class Req(NamedTuple):
    """One served request: method, path (with the query string, as sent) and the Range header (or None)."""

    method: str
    path: str
    range: str | None


# --------------------------------------------------------------------------------------------------
# Server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, hub: FakeHub):
        self.hub = hub
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self):
        conn, addr = super().get_request()
        with self.live_lock:
            self.live.add(conn)
        return conn, addr

    def shutdown_request(self, request):
        with self.live_lock:
            self.live.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):  # dropped connections are expected: stay quiet
        pass

    def drop_live_connections(self) -> None:
        with self.live_lock:
            conns = list(self.live)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Dropped(Exception):
    """Raised inside the handler once a connection has been dropped on purpose."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    server: _Server

    def log_message(self, format, *args):
        pass

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ---- plumbing

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        hub._record(Req(method, self.path, self.headers.get("Range")))
        body = b"" if method == "PUT" else self.read_body()  # an upload's body is read (throttled) by its route
        try:
            if hub._outage == "503":
                self._error(503, None, "Service Unavailable (FakeHub outage)", head_only=method == "HEAD")
                return
            hub._route(self, method, body)
        except _Dropped:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def read_body(self, throttle: _Throttle | None = None, stop_after: int | None = None) -> bytes:
        """The request body (Content-Length or chunked), read through `throttle`; with `stop_after`, the
        connection is reset once that many bytes have arrived (a connection dropped mid-upload)."""
        parts, got = [], 0
        for piece in self._body_pieces():
            if throttle is not None:
                throttle.take(len(piece))
            parts.append(piece)
            got += len(piece)
            if stop_after is not None and got >= stop_after:
                self._drop("reset")
        if stop_after is not None:
            self._drop("reset")
        return b"".join(parts)

    def _body_pieces(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            piece = self.rfile.read(min(left, _CHUNK))
            if not piece:
                return
            left -= len(piece)
            yield piece

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", *, head_only: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None, head_only: bool = False) -> None:
        body = json.dumps(payload).encode()
        self._send(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body,
                   head_only=head_only)

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None,
               head_only: bool = False) -> None:
        extra = {"X-Error-Message": message, **(headers or {})}
        if code is not None:
            extra["X-Error-Code"] = code
        self._json(status, {"error": message}, extra, head_only=head_only)

    def _drop(self, mode: str) -> None:
        """Drop the connection now: 'reset' sends a TCP RST, 'close' a clean FIN (mid-body for the client)."""
        sock = self.connection
        try:
            self.wfile.flush()
        except OSError:
            pass
        if mode == "reset":
            time.sleep(0.05)  # let the bytes already written reach the client before the reset
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.rfile.close()  # the fd is really closed (and RST sent) when no makefile refers to it
            sock.close()
        else:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        raise _Dropped


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, end) inclusive, "unsatisfiable", or None to serve the whole file."""
    if not header or size == 0:
        return None
    spec = header.strip()
    if not spec.lower().startswith("bytes=") or "," in spec:
        return None
    first, sep, last = spec[6:].strip().partition("-")
    first, last = first.strip(), last.strip()
    if not sep or not (first or last) or not (first.isdigit() or not first) or not (last.isdigit() or not last):
        return None
    if not first:
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored, the whole file is served
    if start >= size:
        return "unsatisfiable"
    return start, min(int(last), size - 1) if last else size - 1


def _safetensors_params(files: list[HubFile]) -> dict | None:
    """{"parameters": {dtype: n}, "total": n} over the safetensors files, as the Hub computes; None if none parse."""
    params: dict[str, int] = {}
    found = False
    for f in files:
        if not f.path.endswith(".safetensors") or f.size < 8:
            continue
        (n,) = struct.unpack("<Q", f.data[:8])
        try:
            header = json.loads(f.data[8 : 8 + n])
        except (ValueError, UnicodeDecodeError):
            continue
        found = True
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            params[info["dtype"]] = params.get(info["dtype"], 0) + count
    if not found:
        return None
    return {"parameters": params, "total": sum(params.values())}


# --------------------------------------------------------------------------------------------------
# The upload side


class _Throttle:
    """A bandwidth limit shared by every connection in one direction: `take(n)` returns when n more bytes fit."""

    def __init__(self, bytes_per_second: float) -> None:
        self.rate, self._next, self._lock = float(bytes_per_second), time.monotonic(), threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + n / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)


class _Refusal(Exception):
    """An upload-side request the Hub refuses: status, X-Error-Code (or None) and message."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


class _UploadSide:
    """The routes `HfApi.create_repo`, `create_branch`, `preupload_lfs_files`, `create_commit` and
    `upload_folder` use when Xet is off (`HF_HUB_DISABLE_XET=1`):

    * `POST /api/repos/create` (JSON name, organization, visibility/private): a new repo whose first commit
      holds `.gitattributes`, as the Hub makes it; 409 (with `url`) when it exists.
    * `POST /api/models/{repo}/branch/{branch}` (JSON startingPoint): a new branch; 409 when it exists.
    * `POST /api/models/{repo}/preupload/{revision}`: each file's upload mode ("lfs" for `lfs_suffixes` or
      `lfs_min_size` bytes, else "regular") and the oid of the file already at that path.
    * `POST /{repo}.git/info/lfs/objects/batch`: per object, no `actions` when the repo holds it already,
      else an upload action — basic (`PUT /lfs/{repo}/{oid}`) or, from `multipart_min_size` bytes, multipart
      (`header` with `chunk_size` and part URLs `PUT /lfs/{repo}/{oid}/part/{k}`, completion `POST` to the
      action's href) — and a verify action (`POST /lfs/{repo}/{oid}/verify`).
    * `POST /api/models/{repo}/commit/{revision}[?create_pr=1]`: the NDJSON commit (header, file, lfsFile,
      deletedFile, deletedFolder), stored as a commit that the download routes serve; with `create_pr`, on
      a new `refs/pr/N`. `POST /api/validate-yaml` accepts any card.

    An object is stored only once its bytes hash to its oid (a PUT of other bytes is a 400). Writing needs
    a valid token (401 otherwise) and, when `write_namespaces` is set, a repo in one of those namespaces
    (403 otherwise). `upload_throttle` / `download_throttle` (`limit_bandwidth`) cap the bytes per second
    of PUT bodies and of file downloads. Failure injection: `fail_uploads` (PUTs reset mid-body or answered
    with a status), `fail_batch` and `fail_commit` (answered with a status). `commits_of(repo)` counts
    commits; every request is in `requests` as for downloads.
    """

    multipart_min_size: int = 1 << 62  # objects of at least this many bytes take the multipart transfer
    multipart_chunk_size: int = 5 * 1024 * 1024

    def _init_upload_side(self) -> None:
        self.write_namespaces: set[str] | None = None  # None: a valid token may write anywhere
        self.upload_throttle: _Throttle | None = None
        self.download_throttle: _Throttle | None = None
        self._put_failures: list[int | None] = []  # per PUT: None = reset mid-body, else a status
        self._batch_failures: list[int] = []
        self._commit_failures: list[int] = []
        self._parts: dict[tuple[str, str], dict[int, bytes]] = {}
        self.puts: list[str] = []  # oid of every object PUT completely (basic) or completed (multipart)

    # ---- controls

    def limit_bandwidth(self, bytes_per_second: float | None, *, uploads: bool = True, downloads: bool = True) -> None:
        """Cap uploads and downloads (each, or only those asked for) at `bytes_per_second` (None: no limit)."""
        if uploads:
            self.upload_throttle = _Throttle(bytes_per_second) if bytes_per_second else None
        if downloads:
            self.download_throttle = _Throttle(bytes_per_second) if bytes_per_second else None

    def fail_uploads(self, times: int = 1, status: int | None = None) -> None:
        """The next `times` object PUTs fail: reset after part of the body (status None) or answered `status`."""
        with self._lock:
            self._put_failures.extend([status] * times)

    def fail_batch(self, status: int = 500, times: int = 1) -> None:
        with self._lock:
            self._batch_failures.extend([status] * times)

    def fail_commit(self, status: int = 500, times: int = 1) -> None:
        with self._lock:
            self._commit_failures.extend([status] * times)

    def commits_of(self, repo_id: str) -> int:
        with self._lock:
            return len(self._repos[repo_id].commits)

    def lfs_objects(self, repo_id: str) -> set[str]:
        with self._lock:
            return set(self._repos[repo_id].lfs)

    def _take(self, failures: list):
        with self._lock:
            return failures.pop(0) if failures else False

    # ---- routes

    def _route_upload(self, h, method: str, path: str, query: dict[str, list[str]], body: bytes) -> bool:
        """Answer an upload-side request outside /api/models/; False when `path` is not one."""
        try:
            if path == "/api/repos/create" and method == "POST":
                self._create_repo(h, json.loads(body or b"{}"))
            elif path == "/api/validate-yaml" and method == "POST":
                h._json(200, {"errors": [], "warnings": []})
            elif path.endswith(".git/info/lfs/objects/batch") and method == "POST":
                self._batch(h, unquote(path[1:-len(".git/info/lfs/objects/batch")]), json.loads(body))
            elif path.startswith("/lfs/") and method in ("PUT", "POST"):
                self._lfs(h, method, [unquote(p) for p in path[len("/lfs/"):].split("/")], body)
            else:
                return False
        except _Refusal as e:
            h._error(e.status, e.code, e.message)
        return True

    def _write_api(self, h, repo, action: str, revision: str, query: dict[str, list[str]], body: bytes) -> None:
        try:
            self._may_write(h, repo.repo_id)
            if action == "preupload":
                self._preupload(h, repo, revision, json.loads(body))
            elif action == "branch":
                self._branch(h, repo, revision, json.loads(body or b"{}"))
            else:
                create_pr = any(v in ("1", "true") for v in query.get("create_pr", []))
                self._commit_ndjson(h, repo, revision, body, create_pr)
        except _Refusal as e:
            h._error(e.status, e.code, e.message)

    def _may_write(self, h, repo_id: str) -> None:
        sent, valid = self._auth(h)
        if not valid:
            raise _Refusal(401, None, "Invalid credentials in Authorization header" if sent else
                           "You must be authenticated to write to a repository")
        namespace = repo_id.split("/")[0]
        if self.write_namespaces is not None and namespace not in self.write_namespaces:
            raise _Refusal(403, None, f"You don't have the rights to write to {repo_id}: the token has no "
                                      f"write access to the namespace {namespace}")

    def _create_repo(self, h, payload: dict) -> None:
        name, org = payload.get("name") or "", payload.get("organization")
        repo_id = f"{org}/{name}" if org else name
        self._may_write(h, repo_id)
        if not name or len(name) > 96 or not all(c.isalnum() or c in "-_." for c in name):
            raise _Refusal(400, None, f"Repository name {name!r} is invalid")
        with self._lock:
            if repo_id in self._repos:
                h._json(409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"},
                        {"X-Error-Message": "You already created this model repo"})
                return
        private = payload.get("private") or payload.get("visibility") == "private"
        self.add_files(repo_id, {".gitattributes": _GITATTRIBUTES}, private=bool(private))
        h._json(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})

    def _branch(self, h, repo, branch: str, payload: dict) -> None:
        with self._lock:
            if branch in repo.branches:
                raise _Refusal(409, None, f"Branch {branch} already exists")
            start = repo.resolve(payload.get("startingPoint") or "main")
            if start is None:
                raise _Refusal(404, "RevisionNotFound", f"Invalid rev id: {payload.get('startingPoint')}")
            repo.branches[branch] = start.sha
        h._json(200, {})

    def _preupload(self, h, repo, revision: str, payload: dict) -> None:
        with self._lock:
            commit = repo.resolve(revision)
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = path.endswith(self.lfs_suffixes) or size >= self.lfs_min_size
            present = commit.files.get(path) if commit is not None else None
            oid = None if present is None else present.sha256 if present.lfs else present.git_oid
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        h._json(200, {"files": files, "commitOid": commit.sha if commit else None})

    def _batch(self, h, repo_id: str, payload: dict) -> None:
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            raise _Refusal(404, "RepoNotFound", "Repository not found")
        self._may_write(h, repo_id)
        if (status := self._take(self._batch_failures)) is not False:
            raise _Refusal(status, None, f"FakeHub: LFS batch refused ({status})")
        base = f"{self.endpoint}/lfs/{repo_id}"
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs:
                upload: dict[str, Any] = {"href": f"{base}/{oid}"}
                if size >= self.multipart_min_size:
                    chunk = self.multipart_chunk_size
                    parts = -(-size // chunk)
                    upload["header"] = {"chunk_size": str(chunk),
                                        **{str(k): f"{base}/{oid}/part/{k}" for k in range(1, parts + 1)}}
                entry["actions"] = {"upload": upload, "verify": {"href": f"{base}/{oid}/verify"}}
            objects.append(entry)
        h._json(200, {"transfer": "basic", "objects": objects})

    def _lfs(self, h, method: str, parts: list[str], body: bytes) -> None:
        # parts: org, name, oid[, "part", k | "verify"] (or name, oid, ...)
        cut = 2 if len(parts) >= 3 and len(parts[1]) != 64 else 1
        repo_id, oid, rest = "/".join(parts[:cut]), parts[cut], parts[cut + 1:]
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            raise _Refusal(404, "RepoNotFound", "Repository not found")
        if method == "PUT":
            failure = self._take(self._put_failures)
            if failure is None:
                h.read_body(self.upload_throttle, stop_after=1)
            data = h.read_body(self.upload_throttle)
            if failure not in (False, None):
                raise _Refusal(failure, None, f"FakeHub: upload refused ({failure})")
            if rest[:1] == ["part"]:
                with self._lock:
                    self._parts.setdefault((repo_id, oid), {})[int(rest[1])] = data
                h._send(200, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
                return
            self._store(repo, oid, data)
            h._send(200, {})
        elif rest == ["verify"]:
            if json.loads(body)["oid"] not in repo.lfs:
                raise _Refusal(404, None, f"object {oid} was not uploaded")
            h._json(200, {})
        else:  # the completion of a multipart upload
            with self._lock:
                pieces = self._parts.pop((repo_id, oid), {})
            numbers = [p["partNumber"] for p in json.loads(body)["parts"]]
            self._store(repo, oid, b"".join(pieces[k] for k in numbers))
            h._json(200, {})

    def _store(self, repo, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Refusal(400, None, f"the uploaded bytes do not hash to {oid}")
        with self._lock:
            repo.lfs[oid] = data
            self.puts.append(oid)

    def _commit_ndjson(self, h, repo, revision: str, body: bytes, create_pr: bool) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if (status := self._take(self._commit_failures)) is not False:
            raise _Refusal(status, None, f"FakeHub: commit refused ({status})")
        with self._lock:
            parent = repo.resolve(revision)
            if parent is None:
                raise _Refusal(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files = dict(parent.files)
            header = {}
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    files[value["path"]] = HubFile.make(value["path"], base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    data = repo.lfs.get(value["oid"])
                    if data is None:
                        raise _Refusal(422, None, f"{value['path']}: LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = HubFile.make(value["path"], data, True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise _Refusal(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for path in [p for p in files if p.startswith(prefix)]:
                        del files[path]
            if header.get("parentCommit") not in (None, parent.sha):
                raise _Refusal(412, None, "A commit has happened since. Please refresh and try again.")
            digest = hashlib.sha1(f"{parent.sha}\0{header.get('summary')}\0".encode())
            for path in sorted(files):
                digest.update(f"{path}\0{files[path].sha256}\0".encode())
            sha = digest.hexdigest()
            repo.commits[sha] = _Commit(sha, files, _EPOCH + timedelta(minutes=len(repo.commits)))
            reply: dict[str, Any] = {"commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{sha}", "commitOid": sha,
                                     "pullRequestUrl": None}
            if create_pr:
                number = len(repo.prs) + 1
                repo.prs[f"refs/pr/{number}"] = sha
                reply["pullRequestUrl"] = f"{self.endpoint}/{repo.repo_id}/discussions/{number}"
            else:
                branch = revision.removeprefix("refs/heads/")
                repo.branches[branch] = sha
        h._json(200, reply)


# --------------------------------------------------------------------------------------------------
# The fake Hub


class FakeHub(_UploadSide):
    """A threaded HTTP server on 127.0.0.1:<ephemeral port> that answers like the Hub for model repos.

    Use as a context manager (or call `start()` / `close()`). State (repos, tokens, failures) may be changed
    while it runs; every method is thread-safe.
    """

    lfs_suffixes: tuple[str, ...] = (
        ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".model",
        ".pkl", ".npy", ".npz", ".zip", ".tar", ".gz",
    )
    lfs_min_size: int = 10 * 1024 * 1024

    def __init__(self) -> None:
        self.tokens: set[str] = {"hf_test_token"}
        self.tree_page_size: int | None = None  # None: tree listings come in one page (no Link header)
        self.requests: list[Req] = []
        self._repos: dict[str, _Repo] = {}
        self._failures: dict[tuple[str, str], list[tuple[int, str]]] = {}
        self.fail_ranges = False  # fail_once also applies to range requests (header reads)
        self._lock = threading.RLock()
        self._outage: str | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int = 0
        self._init_upload_side()

    # ---- lifecycle

    def start(self) -> FakeHub:
        if self._server is None:
            self._server = _Server(("127.0.0.1", self._port), self)
            self._port = self._server.server_address[1]
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"FakeHub:{self._port}", daemon=True)
            self._thread.start()
        return self

    def _stop_server(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.drop_live_connections()
        if thread is not None:
            thread.join(timeout=5)

    def close(self) -> None:
        self._stop_server()

    def __enter__(self) -> FakeHub:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        """The value for HF_ENDPOINT: http://127.0.0.1:PORT (no trailing slash)."""
        if not self._port:
            raise RuntimeError("FakeHub not started")
        return f"http://127.0.0.1:{self._port}"

    # ---- repos

    def add_repo(self, repo_id: str, folder: str | os.PathLike, *, revision: str = "main", commit: str | None = None,
                 gated: bool | None = None, private: bool | None = None) -> str:
        """Register the files under `folder` (recursively; posix relative paths) as a commit of model repo
        `repo_id`, and point branch `revision` at it. Returns the 40-hex commit sha: `commit` if given, else a
        sha1 of the repo id and the files' paths and sha256 (deterministic; the same content gives the same
        commit). Adding another folder later adds a commit and moves the branch; old commits stay reachable by
        sha. `gated` / `private` set the repo flags (None: keep them, False for a new repo). Contents are read
        now and held in memory: later changes to `folder` are not seen.
        """
        root = Path(folder)
        if not root.is_dir():
            raise NotADirectoryError(root)
        files: dict[str, HubFile] = {}
        for path in sorted(root.rglob("*")):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                data = path.read_bytes()
                lfs = rel.endswith(self.lfs_suffixes) or len(data) >= self.lfs_min_size
                files[rel] = HubFile.make(rel, data, lfs)
        return self.add_commit(repo_id, files, revision=revision, commit=commit, gated=gated, private=private)

    def add_files(self, repo_id: str, files: dict[str, bytes], *, revision: str = "main", commit: str | None = None,
                  gated: bool | None = None, private: bool | None = None) -> str:
        """Like `add_repo`, from {posix path: bytes}."""
        made = {p: HubFile.make(p, bytes(d), p.endswith(self.lfs_suffixes) or len(d) >= self.lfs_min_size)
                for p, d in files.items()}
        return self.add_commit(repo_id, made, revision=revision, commit=commit, gated=gated, private=private)

    def add_commit(self, repo_id: str, files: dict[str, HubFile], *, revision: str = "main",
                   commit: str | None = None, gated: bool | None = None, private: bool | None = None) -> str:
        if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
            raise ValueError(f"bad repo id {repo_id!r}")
        if _is_sha(revision) or revision.startswith("refs/"):
            raise ValueError(f"bad branch name {revision!r}")
        if commit is None:
            h = hashlib.sha1(f"fakehub\0{repo_id}\0".encode())
            for path in sorted(files):
                h.update(f"{path}\0{files[path].sha256}\0".encode())
            commit = h.hexdigest()
        elif not _is_sha(commit):
            raise ValueError(f"commit must be 40 lowercase hex characters, got {commit!r}")
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                repo = self._repos[repo_id] = _Repo(repo_id)
            if gated is not None:
                repo.gated = gated
            if private is not None:
                repo.private = private
            existing = repo.commits.get(commit)
            if existing is not None:
                if {p: f.sha256 for p, f in existing.files.items()} != {p: f.sha256 for p, f in files.items()}:
                    raise ValueError(f"commit {commit} of {repo_id} already exists with other files")
            else:
                repo.commits[commit] = _Commit(commit, dict(files), _EPOCH + timedelta(minutes=len(repo.commits)))
            repo.branches[revision] = commit
        return commit

    def tag(self, repo_id: str, tag: str, commit: str) -> None:
        """Create or move tag `tag` to `commit` (a sha, or a branch/tag name resolved now)."""
        self._set_ref(repo_id, "tags", tag, commit)

    def branch(self, repo_id: str, name: str, commit: str) -> None:
        """Create or move branch `name` to `commit` (a sha, or a branch/tag name resolved now)."""
        self._set_ref(repo_id, "branches", name, commit)

    def _set_ref(self, repo_id: str, kind: str, name: str, commit: str) -> None:
        with self._lock:
            repo = self._repos[repo_id]
            target = repo.resolve(commit)
            if target is None:
                raise KeyError(f"{repo_id}: unknown revision {commit!r}")
            getattr(repo, kind)[name] = target.sha

    def set_flags(self, repo_id: str, *, gated: bool | None = None, private: bool | None = None) -> None:
        with self._lock:
            repo = self._repos[repo_id]
            if gated is not None:
                repo.gated = gated
            if private is not None:
                repo.private = private

    def commit_of(self, repo_id: str, revision: str = "main") -> str:
        with self._lock:
            found = self._repos[repo_id].resolve(revision)
            if found is None:
                raise KeyError(f"{repo_id}: unknown revision {revision!r}")
            return found.sha

    def file(self, repo_id: str, path: str, revision: str = "main") -> HubFile:
        with self._lock:
            found = self._repos[repo_id].resolve(revision)
            if found is None:
                raise KeyError(f"{repo_id}: unknown revision {revision!r}")
            return found.files[path]

    # ---- request log

    def _record(self, req: Req) -> None:
        with self._lock:
            self.requests.append(req)

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def snapshot_requests(self) -> list[Req]:
        with self._lock:
            return list(self.requests)

    def count(self, method: str | None = None, path_contains: str | None = None, *,
              ranged: bool | None = None) -> int:
        """How many requests match: `method` (e.g. "GET"), a substring of the path (the raw, quoted path with
        its query string), and `ranged` (True: with a Range header, False: without)."""
        with self._lock:
            reqs = list(self.requests)
        return sum(
            1
            for r in reqs
            if (method is None or r.method == method)
            and (path_contains is None or path_contains in r.path)
            and (ranged is None or (r.range is not None) == ranged)
        )

    # ---- failure injection

    def fail_once(self, repo_id: str, filename: str, after_bytes: int, *, mode: str = "reset", times: int = 1) -> None:
        """The next `times` GETs of the whole of `filename` in `repo_id` (any revision; range requests too
        when `hub.fail_ranges` is set) send the headers (full Content-Length), `after_bytes` of the body,
        then drop the connection: "reset" = TCP RST
        (`httpx2.ReadError`: hf_hub_download raises it), "close" = clean close mid-body
        (`httpx2.RemoteProtocolError`: hf_hub_download resumes by itself with a Range request)."""
        if mode not in ("reset", "close"):
            raise ValueError("mode must be 'reset' or 'close'")
        with self._lock:
            self._failures.setdefault((repo_id, filename), []).extend([(int(after_bytes), mode)] * times)

    def pending_failures(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._failures.values())

    def _take_failure(self, repo_id: str, filename: str) -> tuple[int, str] | None:
        with self._lock:
            queue = self._failures.get((repo_id, filename))
            if queue:
                return queue.pop(0)
        return None

    def offline_all(self, mode: str = "refuse") -> None:
        """Simulate an outage: "refuse" closes the port (connection refused), "503" answers 503 to everything."""
        if mode == "refuse":
            self._outage = None
            self._stop_server()
        elif mode == "503":
            self._outage = "503"
        else:
            raise ValueError("mode must be 'refuse' or '503'")

    def online(self) -> None:
        """End an outage; the server comes back on the same port."""
        self._outage = None
        if self._server is None and self._port:
            self.start()

    # ---- routing

    def _auth(self, handler: _Handler) -> tuple[bool, bool]:
        """(an Authorization header was sent, its bearer token is valid)."""
        value = handler.headers.get("Authorization")
        if not value:
            return False, False
        scheme, _, token = value.partition(" ")
        return True, scheme.lower() == "bearer" and token.strip() in self.tokens

    def _route(self, h: _Handler, method: str, body: bytes) -> None:
        split = urlsplit(h.path)
        path, query = split.path, parse_qs(split.query, keep_blank_values=True)
        if path == "/api/agent-harnesses" and method == "GET":
            h._json(200, {"standardEnvVars": [], "harnesses": {}})
            return
        if path.startswith("/api/models/"):
            self._route_api(h, method, path[len("/api/models/"):], query, body)
            return
        if self._route_upload(h, method, path, query, body):
            return
        if "/resolve/" in path and method in ("GET", "HEAD"):
            repo_part, _, rest = path.lstrip("/").partition("/resolve/")
            revision, _, filename = rest.partition("/")
            self._serve_file(h, method, unquote(repo_part), unquote(revision), unquote(filename))
            return
        h._error(404, None, f"FakeHub: no route for {method} {path}", head_only=method == "HEAD")

    def _access(self, h: _Handler, repo_id: str, *, head_only: bool = False) -> _Repo | None:
        """The repo if the request may see it, else None after answering the error (gating not checked)."""
        sent, valid = self._auth(h)
        if sent and not valid:
            h._error(401, None, "Invalid credentials in Authorization header", head_only=head_only)
            return None
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not valid):
            status = 401 if repo is not None else 404
            h._error(status, "RepoNotFound", "Repository not found", head_only=head_only)
            return None
        return repo

    def _gate(self, h: _Handler, repo: _Repo, head_only: bool = False) -> bool:
        """True if file contents of `repo` may be served, else answer 401 GatedRepo and return False."""
        if repo.gated and not self._auth(h)[1]:
            h._error(401, "GatedRepo",
                     f"Access to model {repo.repo_id} is restricted. You must have access to it and be"
                     " authenticated to access it. Please log in.", head_only=head_only)
            return False
        return True

    def _commit(self, h: _Handler, repo: _Repo, revision: str, head_only: bool = False) -> _Commit | None:
        with self._lock:
            found = repo.resolve(revision)
        if found is None:
            h._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head_only=head_only)
        return found

    def _serve_file(self, h: _Handler, method: str, repo_id: str, revision: str, filename: str) -> None:
        head = method == "HEAD"
        repo = self._access(h, repo_id, head_only=head)
        if repo is None:
            return
        commit = self._commit(h, repo, revision, head_only=head)
        if commit is None or not self._gate(h, repo, head_only=head):
            return
        f = commit.files.get(filename)
        if f is None:
            h._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha}, head_only=head)
            return
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{f.etag}"',
            "X-Repo-Commit": commit.sha,
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        status, start, end = 200, 0, f.size - 1
        rng = None if head else _parse_range(h.headers.get("Range"), f.size)
        if rng == "unsatisfiable":
            h._send(416, {**headers, "Content-Range": f"bytes */{f.size}"}, b"")
            return
        if isinstance(rng, tuple):
            status, (start, end) = 206, rng
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        length = end - start + 1 if f.size else 0
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if head:
            return
        # a download of the whole file fails; a range request (a header read) is served, unless asked for
        failure = self._take_failure(repo_id, filename) if start == 0 and end == f.size - 1 or self.fail_ranges else None
        stop = start + length if failure is None else start + min(max(failure[0], 0), length)
        view = memoryview(f.data)
        for pos in range(start, stop, _CHUNK):
            if self.download_throttle is not None:
                self.download_throttle.take(min(_CHUNK, stop - pos))
            h.wfile.write(view[pos : min(pos + _CHUNK, stop)])
        if failure is not None:
            h._drop(failure[1])

    # ---- API

    def _route_api(self, h: _Handler, method: str, rest: str, query: dict[str, list[str]], body: bytes) -> None:
        # repo id: "org/name" or "name"; then ("revision"|"tree"|"paths-info", rev, *path) or ("refs",) or nothing
        repo_id, tail = self._split_repo(rest.split("/"))
        head = method == "HEAD"
        repo = self._access(h, repo_id, head_only=head)
        if repo is None:
            return
        if not tail and method in ("GET", "HEAD"):
            self._model_info(h, repo, "main", query, head)
        elif len(tail) == 2 and tail[0] == "revision" and method in ("GET", "HEAD"):
            self._model_info(h, repo, unquote(tail[1]), query, head)
        elif len(tail) >= 2 and tail[0] == "tree" and method == "GET":
            self._tree(h, repo, unquote(tail[1]), unquote("/".join(tail[2:])), query)
        elif len(tail) == 2 and tail[0] == "paths-info" and method == "POST":
            self._paths_info(h, repo, unquote(tail[1]), parse_qs(body.decode(), keep_blank_values=True))
        elif len(tail) >= 2 and tail[0] in ("preupload", "commit", "branch") and method == "POST":
            self._write_api(h, repo, tail[0], unquote("/".join(tail[1:])), query, body)
        elif tail == ["refs"] and method == "GET":
            with self._lock:
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()]
                tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in repo.tags.items()]
                prs = [{"name": r.split("/")[-1], "ref": r, "targetCommit": s} for r, s in repo.prs.items()]
            h._json(200, {"branches": branches, "converts": [], "tags": tags, "pullRequests": prs})
        else:
            h._error(404, None, f"FakeHub: no route for {method} /api/models/{rest}", head_only=head)

    _API_WORDS = frozenset({"revision", "tree", "paths-info", "refs", "preupload", "commit", "branch"})

    def _split_repo(self, parts: list[str]) -> tuple[str, list[str]]:
        """("org/name" or "name", the rest of the path) for /api/models/<parts>."""
        with self._lock:
            known = set(self._repos)
        two = "/".join(unquote(p) for p in parts[:2])
        if len(parts) >= 2 and two in known:
            return two, parts[2:]
        one = unquote(parts[0])
        if one in known:
            return one, parts[1:]
        if len(parts) >= 2 and parts[1] not in self._API_WORDS:  # an unknown "org/name" (answered with a 404)
            return two, parts[2:]
        return one, parts[1:]

    def _entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict:
        f = commit.files.get(path)
        if f is not None:
            entry: dict[str, Any] = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            if expand:
                entry["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                               "pickleImportScan": None}
        else:
            oid = hashlib.sha1(f"tree\0{commit.sha}\0{path}".encode()).hexdigest()
            entry = {"type": "directory", "oid": oid, "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": "FakeHub commit", "date": _iso(commit.date)}
        return entry

    def _model_info(self, h: _Handler, repo: _Repo, revision: str, query: dict[str, list[str]], head: bool) -> None:
        commit = self._commit(h, repo, revision, head_only=head)
        if commit is None:
            return
        blobs = any(v.lower() in ("1", "true") for v in query.get("blobs", []))
        siblings = []
        for path in sorted(commit.files):
            f = commit.files[path]
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib["size"] = f.size
                sib["blobId"] = f.git_oid
                if f.lfs:
                    sib["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(sib)
        with self._lock:
            first = min(c.date for c in repo.commits.values())
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(first),
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        st = _safetensors_params(list(commit.files.values()))
        if st is not None:
            info["safetensors"] = st
        cfg = commit.files.get("config.json")
        if cfg is not None:
            try:
                parsed = json.loads(cfg.data)
                info["config"] = {k: parsed[k] for k in ("architectures", "model_type") if k in parsed}
            except (ValueError, TypeError):
                pass
        expand = query.get("expand") or query.get("expand[]")
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        h._json(200, info, head_only=head)

    def _tree(self, h: _Handler, repo: _Repo, revision: str, path: str, query: dict[str, list[str]]) -> None:
        commit = self._commit(h, repo, revision)
        if commit is None:
            return
        truthy = ("1", "true")
        recursive = any(v.lower() in truthy for v in query.get("recursive", []))
        expand = any(v.lower() in truthy for v in query.get("expand", []))
        path = path.strip("/")
        dirs = commit.directories()
        if path and path not in dirs:
            h._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", {"X-Repo-Commit": commit.sha})
            return
        prefix = f"{path}/" if path else ""

        def wanted(p: str) -> bool:
            if not p.startswith(prefix):
                return False
            return recursive or "/" not in p[len(prefix):]

        names = sorted(d for d in dirs if wanted(d)) + sorted(p for p in commit.files if wanted(p))
        entries = [self._entry(repo, commit, p, expand) for p in names]
        headers: dict[str, str] = {}
        if self.tree_page_size:
            offset = int((query.get("cursor") or ["0"])[0])
            page = entries[offset : offset + self.tree_page_size]
            if offset + self.tree_page_size < len(entries):
                host = h.headers.get("Host") or f"127.0.0.1:{self._port}"
                raw = urlsplit(h.path).path
                nxt = (f"http://{host}{raw}?recursive={str(recursive).lower()}&expand={str(expand).lower()}"
                       f"&cursor={offset + self.tree_page_size}")
                headers["Link"] = f'<{nxt}>; rel="next"'
            entries = page
        h._json(200, entries, headers)

    def _paths_info(self, h: _Handler, repo: _Repo, revision: str, form: dict[str, list[str]]) -> None:
        commit = self._commit(h, repo, revision)
        if commit is None:
            return
        expand = any(v.lower() in ("1", "true") for v in form.get("expand", []))
        dirs = commit.directories()
        out = []
        for p in form.get("paths", []):
            p = p.strip("/")
            if p in commit.files or p in dirs:
                out.append(self._entry(repo, commit, p, expand))
        h._json(200, out)


# --------------------------------------------------------------------------------------------------
# Pointing huggingface_hub at a FakeHub


def hub_env(hub: FakeHub | str, cache_dir: str | os.PathLike, *, offline: bool = False, token: str | None = None,
            home: str | os.PathLike | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a *subprocess* that must use `hub` (env vars are all a fresh process needs).

    Starts from `base` (default: a copy of os.environ) and sets HF_ENDPOINT, HF_HUB_CACHE, HF_HOME (`home`,
    default `<cache_dir>.home` next to the cache: no stored token, no xet cache, no agent registry of the
    user's), HF_HUB_DISABLE_TELEMETRY=1, HF_HUB_OFFLINE explicitly to "1" or "0" (tests/conftest.py and
    builders.cli_env default it to "1"!) and HF_TOKEN (removed when `token` is None). Removes
    TRANSFORMERS_OFFLINE, HUGGING_FACE_HUB_TOKEN, HUGGINGFACE_HUB_CACHE, HF_OIDC_RESOURCE, HUGGINGFACE_CO_STAGING.
    """
    env = dict(os.environ if base is None else base)
    cache = Path(cache_dir)
    endpoint = hub if isinstance(hub, str) else hub.endpoint
    env["HF_ENDPOINT"] = endpoint
    env["HF_HUB_CACHE"] = str(cache)
    env["HF_HOME"] = str(Path(home) if home is not None else cache.with_name(cache.name + ".home"))
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    for name in ("TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "HF_OIDC_RESOURCE",
                 "HUGGINGFACE_CO_STAGING", "HF_TOKEN"):
        env.pop(name, None)
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def use_hub(monkeypatch, hub: FakeHub | str, cache_dir: str | os.PathLike, *, offline: bool = False,
            token: str | None = None, home: str | os.PathLike | None = None,
            fast_retries: bool = False) -> dict[str, str]:
    """Point the *in-process* huggingface_hub (already imported or not) and child processes at `hub`.

    Sets the environment of `hub_env` (so subprocesses inherit it) AND patches what huggingface_hub 2.4
    copied from the environment at import time (env vars alone are not enough in-process):

    * `constants.ENDPOINT` and `constants.HUGGINGFACE_CO_URL_TEMPLATE` (hf_hub_url builds every /resolve/ URL
      from the template; `endpoint=` overrides only apply to URLs that start with `constants.ENDPOINT`, so
      both must move together);
    * `hf_api.api.endpoint`: the module-level `HfApi()` behind `huggingface_hub.model_info`,
      `list_repo_files`, `get_safetensors_metadata`, ... captured the endpoint when hf_api was imported
      (a new `HfApi()` reads `constants.ENDPOINT` at construction, so it is fine after this call);
    * `constants.HF_URL_HOSTS` and `utils._http._HUB_ORIGINS` (hosts trusted for redirects and hf:// URL
      parsing; the fake never redirects, patched for consistency);
    * `constants.HF_HUB_CACHE` (+ legacy `HUGGINGFACE_HUB_CACHE`) and `utils._cache_manager.HF_HUB_CACHE`
      (`scan_cache_dir`'s copy): default cache of hf_hub_download / snapshot_download / try_to_load_from_cache;
    * `constants.HF_HUB_OFFLINE`: read by `is_offline_mode()` on every request (tests/conftest.py sets the env
      var to "1" before huggingface_hub is imported, so it is True in-process unless patched);
    * `constants.HF_HUB_DISABLE_TELEMETRY`: otherwise the first request of the process is preceded by a GET
      {ENDPOINT}/api/agent-harnesses (user-agent agent detection);
    * `constants.HF_HOME`, `HF_TOKEN_PATH`, `HF_STORED_TOKENS_PATH`, `AGENT_HARNESSES_PATH`, `HF_XET_CACHE`,
      `HF_ASSETS_CACHE`: under `home`, so a token stored by the user is never sent. The token comes from
      HF_TOKEN (read at each call), set to `token` or removed.

    `fast_retries=True` also removes huggingface_hub's back-off sleeps (`utils._http` retries of 5xx and
    connection errors, and `http_get`'s 1 s sleep before resuming) until the end of the test (a later
    `use_hub(..., fast_retries=False)` in the same test does not bring them back).
    Returns the environment dict (also applied to os.environ via monkeypatch), handy for subprocesses.
    """
    import huggingface_hub  # noqa: F401
    from huggingface_hub import constants, file_download, hf_api
    from huggingface_hub.utils import _cache_manager, _http

    env = hub_env(hub, cache_dir, offline=offline, token=token, home=home)
    for name in ("TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "HF_OIDC_RESOURCE",
                 "HUGGINGFACE_CO_STAGING", "HF_TOKEN"):
        if name not in env:
            monkeypatch.delenv(name, raising=False)
    for name in ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_HOME", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_OFFLINE", "HF_TOKEN"):
        if name in env:
            monkeypatch.setenv(name, env[name])

    endpoint = env["HF_ENDPOINT"].rstrip("/")
    home_dir = env["HF_HOME"]
    cache = env["HF_HUB_CACHE"]
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    parsed = urlsplit(endpoint)
    monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {parsed.hostname or ""}))
    monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", cache)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HOME", home_dir)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(home_dir, "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", os.path.join(home_dir, "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", os.path.join(home_dir, ".agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_XET_CACHE", os.path.join(home_dir, "xet"))
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", os.path.join(home_dir, "assets"))
    if fast_retries:
        shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
        shim.sleep = lambda seconds: None
        monkeypatch.setattr(_http, "time", shim)
        monkeypatch.setattr(file_download, "time", shim)
    return env
