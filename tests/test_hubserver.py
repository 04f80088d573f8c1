"""tests/hubserver.py's FakeHub against the real huggingface_hub client (2.4): downloads, cache layout, API
calls, ranges, injected failures, gating, not-found errors, offline mode, tags/shas, and a subprocess."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import httpx2
import huggingface_hub
import numpy as np
import pytest
from builders import run_python
from hubserver import FakeHub, hub_env, use_hub
from huggingface_hub import (
    HfApi,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import get_session
from safetensors.numpy import save_file

REPO = "org/tiny"
FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def _make_repo(folder: Path, *, seed: int = 0, hidden: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                                                    "hidden_size": hidden, "seed": seed}))
    rng = np.random.default_rng(seed)
    save_file({"model.embed_tokens.weight": rng.standard_normal((32, hidden)).astype(np.float32),
               "model.norm.weight": np.ones(hidden, dtype=np.float16)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return folder


@pytest.fixture
def repo_dir(tmp_path) -> Path:
    return _make_repo(tmp_path / "src")


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def hub(repo_dir, cache, monkeypatch):
    with FakeHub() as hub:
        hub.add_repo(REPO, repo_dir)
        use_hub(monkeypatch, hub, cache)
        yield hub


def _snapshot(cache: Path, sha: str) -> Path:
    return cache / "models--org--tiny" / "snapshots" / sha


def test_download_each_file_lands_in_cache_layout_and_is_not_fetched_twice(hub, repo_dir, cache):
    sha = hub.commit_of(REPO)
    for name in FILES:
        path = Path(hf_hub_download(REPO, name))
        assert path == _snapshot(cache, sha) / name
        assert path.read_bytes() == (repo_dir / name).read_bytes()
        # blobs are named by ETag: sha256 for LFS files (safetensors), git blob sha1 otherwise
        assert path.resolve().parent == cache / "models--org--tiny" / "blobs"
        assert path.resolve().name == hub.file(REPO, name).etag
    assert len(hub.file(REPO, "model.safetensors").etag) == 64 and len(hub.file(REPO, "config.json").etag) == 40
    assert (cache / "models--org--tiny" / "refs" / "main").read_text() == sha
    assert hub.count("GET", "/resolve/") == 3 and hub.count("HEAD", "/resolve/") == 3

    hub.reset_requests()
    for name in FILES:  # by branch name: one HEAD each (is main still there?), no body
        assert Path(hf_hub_download(REPO, name)) == _snapshot(cache, sha) / name
    assert hub.count("GET") == 0 and hub.count("HEAD") == 3

    hub.reset_requests()
    for name in FILES:  # by commit sha: served from the cache without any request
        assert Path(hf_hub_download(REPO, name, revision=sha)) == _snapshot(cache, sha) / name
    assert hub.requests == []


def test_model_info_with_files_metadata(hub, repo_dir):
    sha = hub.commit_of(REPO)
    info = HfApi().model_info(REPO, revision="main", files_metadata=True)
    assert info.id == REPO and info.sha == sha and info.private is False and info.gated is False
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes == {name: (repo_dir / name).stat().st_size for name in FILES}
    st = {s.rfilename: s for s in info.siblings}["model.safetensors"]
    assert st.lfs is not None and st.lfs.sha256 == hub.file(REPO, "model.safetensors").sha256
    assert st.lfs.size == sizes["model.safetensors"]
    assert {s.rfilename: s for s in info.siblings}["config.json"].lfs is None
    assert info.safetensors.parameters == {"F32": 32 * 64, "F16": 64} and info.safetensors.total == 32 * 64 + 64
    assert info.config == {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}

    # the module-level functions use hf_api.api, whose endpoint use_hub re-points
    plain = huggingface_hub.model_info(REPO)
    assert plain.sha == sha and all(s.size is None for s in plain.siblings)
    assert hub.count("GET", "/api/models/org/tiny/revision/main?blobs=true") == 1


def test_listing_tree_paths_info_and_refs(hub, tmp_path):
    nested = _make_repo(tmp_path / "nested")
    (nested / "sub" / "deeper").mkdir(parents=True)
    (nested / "sub" / "notes.txt").write_text("hello")
    (nested / "sub" / "deeper" / "x.bin").write_bytes(b"\0" * 10)
    sha = hub.add_repo("org/nested", nested)
    api = HfApi()
    expected = sorted([*FILES, "sub/notes.txt", "sub/deeper/x.bin"])
    assert sorted(api.list_repo_files("org/nested")) == expected
    assert sorted(huggingface_hub.list_repo_files(REPO)) == sorted(FILES)  # module-level function

    top = list(api.list_repo_tree("org/nested"))
    assert {e.path for e in top if isinstance(e, RepoFolder)} == {"sub"}
    assert {e.path for e in top if isinstance(e, RepoFile)} == set(FILES)
    sub = list(api.list_repo_tree("org/nested", path_in_repo="sub", recursive=True, expand=True))
    assert {e.path for e in sub} == {"sub/deeper", "sub/notes.txt", "sub/deeper/x.bin"}
    xbin = next(e for e in sub if e.path == "sub/deeper/x.bin")
    assert xbin.size == 10 and xbin.lfs.sha256 == hub.file("org/nested", "sub/deeper/x.bin").sha256
    assert xbin.last_commit.oid == sha

    hub.tree_page_size = 2  # paginated with Link headers: same result
    hub.reset_requests()
    assert sorted(api.list_repo_files("org/nested")) == expected
    assert hub.count("GET", "/tree/") == 4  # 7 entries (5 files, 2 folders) in pages of 2
    hub.tree_page_size = None

    infos = api.get_paths_info("org/nested", ["config.json", "sub", "missing.txt"])
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "config.json"), ("RepoFolder", "sub")]
    hub.tag("org/nested", "v1", "main")
    refs = api.list_repo_refs("org/nested")
    assert [(r.name, r.target_commit) for r in refs.branches] == [("main", sha)]
    assert [(r.name, r.ref) for r in refs.tags] == [("v1", "refs/tags/v1")]
    assert api.file_exists("org/nested", "sub/notes.txt") and not api.file_exists("org/nested", "nope")


def test_get_safetensors_metadata_single_and_sharded(hub, tmp_path):
    meta = HfApi().get_safetensors_metadata(REPO)
    assert not meta.sharded
    tensors = meta.files_metadata["model.safetensors"].tensors
    assert tensors["model.embed_tokens.weight"].dtype == "F32"
    assert tensors["model.embed_tokens.weight"].shape == [32, 64]
    assert tensors["model.norm.weight"].dtype == "F16"
    assert meta.files_metadata["model.safetensors"].metadata == {"format": "pt"}
    assert hub.count("GET", "/resolve/main/model.safetensors", ranged=True) >= 1

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": np.zeros((2, 3), np.float32)}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"b": np.zeros((4,), np.float16)}, str(sharded / "model-00002-of-00002.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": 32},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    hub.add_repo("org/sharded", sharded)
    meta = HfApi().get_safetensors_metadata("org/sharded")
    assert meta.sharded and meta.weight_map == {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}
    assert meta.files_metadata["model-00002-of-00002.safetensors"].tensors["b"].shape == [4]


def test_raw_range_requests_return_exact_bytes(hub, repo_dir):
    data = (repo_dir / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    url = hf_hub_url(REPO, "model.safetensors")
    assert url == f"{hub.endpoint}/org/tiny/resolve/main/model.safetensors"
    session = get_session()

    r = session.get(url, headers={"Range": "bytes=0-7"})
    assert r.status_code == 206 and r.content == data[:8]
    assert r.headers["Content-Range"] == f"bytes 0-7/{len(data)}"
    assert r.headers["X-Repo-Commit"] == hub.commit_of(REPO)
    r = session.get(url, headers={"Range": f"bytes=8-{8 + n - 1}"})
    assert r.status_code == 206 and r.content == data[8 : 8 + n]
    assert "model.embed_tokens.weight" in json.loads(r.content)
    r = session.get(url, headers={"Range": f"bytes={len(data) - 5}-"})
    assert r.content == data[-5:]
    r = session.get(url, headers={"Range": "bytes=-3"})
    assert r.content == data[-3:]
    r = session.get(url, headers={"Range": "bytes=0-100000000"})  # end clamped, as get_safetensors_metadata asks
    assert r.status_code == 206 and r.content == data
    r = session.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    r = session.head(url)  # direct answer, no redirect: the headers hf_hub_download reads
    assert r.status_code == 200 and r.headers["Content-Length"] == str(len(data))
    assert r.headers["X-Linked-Size"] == str(len(data))
    assert r.headers["X-Linked-Etag"].strip('"') == hub.file(REPO, "model.safetensors").sha256


def test_fail_once_reset_makes_download_raise_and_a_retry_completes(hub, repo_dir, cache):
    data = (repo_dir / "model.safetensors").read_bytes()
    assert len(data) > 4096
    hub.fail_once(REPO, "model.safetensors", after_bytes=1000)
    # A TCP reset mid-body surfaces as httpx2.ReadError (an httpx2.NetworkError / TransportError, NOT an OSError
    # nor an HfHubHTTPError): http_get only resumes on ConnectError / TimeoutException / RemoteProtocolError.
    with pytest.raises(httpx2.ReadError):
        hf_hub_download(REPO, "model.safetensors")
    assert hub.pending_failures() == 0
    blobs = cache / "models--org--tiny" / "blobs"
    assert not any(blobs.iterdir())  # the partial temporary file is deleted: the retry starts from scratch
    hub.reset_requests()
    path = hf_hub_download(REPO, "model.safetensors")
    assert Path(path).read_bytes() == data
    assert hub.snapshot_requests() == [("HEAD", "/org/tiny/resolve/main/model.safetensors", None),
                                       ("GET", "/org/tiny/resolve/main/model.safetensors", None)]


def test_fail_once_clean_close_is_resumed_inside_the_same_call(hub, repo_dir, cache, monkeypatch):
    from huggingface_hub import constants

    use_hub(monkeypatch, hub, cache, fast_retries=True)  # skip http_get's 1 s sleep before resuming
    data = (repo_dir / "model.safetensors").read_bytes()
    # A clean close mid-body is httpx2.RemoteProtocolError, which http_get catches: it resumes in the same call
    # from the bytes it has written. It writes in DOWNLOAD_CHUNK_SIZE (10 MiB) pieces, so a file cut before its
    # first 10 MiB is fetched again from byte 0, without a Range header.
    hub.fail_once(REPO, "model.safetensors", after_bytes=1000, mode="close")
    assert Path(hf_hub_download(REPO, "model.safetensors")).read_bytes() == data
    assert [r.range for r in hub.requests if r.method == "GET"] == [None, None]

    # With smaller pieces the resume is a Range request from the last whole piece.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256)
    hub.reset_requests()
    hub.fail_once(REPO, "model.safetensors", after_bytes=1024 + 100, mode="close")
    path = hf_hub_download(REPO, "model.safetensors", force_download=True)
    assert Path(path).read_bytes() == data
    assert [r.range for r in hub.requests if r.method == "GET"] == [None, "bytes=1024-"]


def test_gated_and_private_repos(hub, repo_dir, cache, monkeypatch):
    hub.add_repo("org/gated", repo_dir, gated=True)
    with pytest.raises(GatedRepoError):  # 401 + X-Error-Code: GatedRepo (GatedRepoError < RepositoryNotFoundError)
        hf_hub_download("org/gated", "config.json")
    assert HfApi().model_info("org/gated").gated == "auto"  # info and listings stay public, like the Hub
    path = hf_hub_download("org/gated", "config.json", token="hf_test_token")
    assert Path(path).read_bytes() == (repo_dir / "config.json").read_bytes()
    assert hub.count("HEAD", "/org/gated/") == 2

    with pytest.raises(HfHubHTTPError) as bad:  # a token the Hub does not know: 401 "Invalid credentials"
        hf_hub_download("org/gated", "tokenizer_config.json", token="hf_wrong")
    assert bad.value.response.status_code == 401 and not isinstance(bad.value, RepositoryNotFoundError)

    hub.add_repo("org/private", repo_dir, private=True)
    with pytest.raises(RepositoryNotFoundError) as hidden:  # 401 + RepoNotFound, like the Hub
        hf_hub_download("org/private", "config.json")
    assert not isinstance(hidden.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("org/private")

    use_hub(monkeypatch, hub, cache, token="hf_test_token")  # the token through HF_TOKEN, as a user would
    assert HfApi().model_info("org/private").private is True
    assert Path(hf_hub_download("org/private", "tokenizer_config.json")).is_file()


def test_not_found_errors(hub):
    with pytest.raises(RepositoryNotFoundError) as e:
        hf_hub_download("org/nope", "config.json")
    assert type(e.value) is RepositoryNotFoundError and e.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("org/nope")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().list_repo_files("nope")

    with pytest.raises(EntryNotFoundError) as e:
        hf_hub_download(REPO, "missing.json")
    assert type(e.value) is RemoteEntryNotFoundError  # RemoteEntryNotFoundError(HfHubHTTPError, EntryNotFoundError)

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info(REPO, revision="nope")


def test_offline_mode_uses_the_cache_without_any_request(hub, repo_dir, cache, monkeypatch):
    online = Path(hf_hub_download(REPO, "config.json"))
    use_hub(monkeypatch, hub, cache, offline=True)
    hub.reset_requests()
    assert Path(hf_hub_download(REPO, "config.json")) == online  # revision "main" through refs/main
    assert Path(hf_hub_download(REPO, "config.json", revision=hub.commit_of(REPO))) == online
    with pytest.raises(LocalEntryNotFoundError):  # LocalEntryNotFoundError < FileNotFoundError, EntryNotFoundError
        hf_hub_download(REPO, "tokenizer_config.json")
    assert hub.requests == []

    use_hub(monkeypatch, hub, cache, offline=False)
    hub.offline_all("refuse")  # connection refused: hf_hub_download falls back on the cached file
    try:
        assert Path(hf_hub_download(REPO, "config.json")) == online
    finally:
        hub.online()
    assert Path(hf_hub_download(REPO, "tokenizer_config.json")).is_file()


def test_tags_and_commit_shas_resolve_to_their_snapshot(hub, repo_dir, cache, tmp_path):
    first = hub.commit_of(REPO)
    hub.tag(REPO, "v1", first)
    second = hub.add_repo(REPO, _make_repo(tmp_path / "v2", seed=1))
    assert second != first and hub.commit_of(REPO, "main") == second
    old = (repo_dir / "config.json").read_bytes()
    new = (tmp_path / "v2" / "config.json").read_bytes()

    assert Path(hf_hub_download(REPO, "config.json", revision="v1")).read_bytes() == old
    assert Path(hf_hub_download(REPO, "config.json", revision="refs/tags/v1")).read_bytes() == old  # quoted
    assert Path(hf_hub_download(REPO, "config.json", revision=first)).read_bytes() == old
    by_main = Path(hf_hub_download(REPO, "config.json"))
    assert by_main.read_bytes() == new and by_main.parent == _snapshot(cache, second)
    assert Path(hf_hub_download(REPO, "config.json", revision=second)) == by_main
    assert (cache / "models--org--tiny" / "refs" / "v1").read_text() == first
    assert HfApi().model_info(REPO, revision="v1").sha == first
    assert hub.add_repo(REPO, repo_dir) == first  # same content, same commit: main moves back


def test_snapshot_download(hub, repo_dir, cache):
    sha = hub.commit_of(REPO)
    folder = Path(snapshot_download(REPO))
    assert folder == _snapshot(cache, sha)
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert all((folder / n).read_bytes() == (repo_dir / n).read_bytes() for n in FILES)
    hub.reset_requests()
    assert Path(snapshot_download(REPO, revision=sha)) == folder  # pinned and cached: no request at all
    assert hub.requests == []


def test_subprocess_uses_the_hub_through_env_vars_only(hub, repo_dir, tmp_path):
    cache = tmp_path / "subcache"
    env = hub_env(hub, cache, base={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert env["HF_HUB_OFFLINE"] == "0"
    code = "from huggingface_hub import hf_hub_download; print(hf_hub_download('org/tiny', 'config.json'))"
    hub.reset_requests()
    out = run_python(code, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path == _snapshot(cache, hub.commit_of(REPO)) / "config.json"
    assert path.read_bytes() == (repo_dir / "config.json").read_bytes()
    assert [r.method for r in hub.requests] == ["HEAD", "GET"]  # telemetry off: no /api/agent-harnesses


# -- the upload side ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_upload_folder_round_trips_through_lfs_basic_and_multipart(tmp_path, monkeypatch):
    """HfApi.create_repo + upload_folder with Xet off (preupload, LFS batch, PUT or parts, verify, NDJSON
    commit), then snapshot_download gives back the same bytes; an object the repo has is not sent again."""
    from huggingface_hub import HfApi, constants, snapshot_download

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub() as hub:
        hub.multipart_min_size, hub.multipart_chunk_size = 300_000, 128_000
        use_hub(monkeypatch, hub, tmp_path / "cache", token="hf_test_token", fast_retries=True)
        folder = tmp_path / "src"
        folder.mkdir()
        files = {"big.safetensors": np.random.default_rng(0).bytes(700_000), "small.safetensors": b"x" * 1000,
                 "config.json": b"{}", "README.md": b"---\nlibrary_name: x\n---\nhello\n"}
        for name, data in files.items():
            (folder / name).write_bytes(data)
        api = HfApi()
        api.create_repo("me/up", private=True)
        api.create_repo("me/up", exist_ok=True)
        info = api.upload_folder(repo_id="me/up", folder_path=folder, commit_message="first")
        assert info.oid == hub.commit_of("me/up") and hub.commits_of("me/up") == 2
        assert hub.count("PUT", "/part/") == 6 and hub.count("PUT", "/lfs/") == 7  # 6 parts + 1 basic PUT
        got = Path(snapshot_download("me/up", local_dir=tmp_path / "got"))
        assert {n: (got / n).read_bytes() for n in files} == files
        hub.reset_requests()
        api.upload_folder(repo_id="me/up", folder_path=folder, commit_message="same bytes", revision="main")
        assert hub.count("PUT") == 0  # the batch answer says the objects are there
        with pytest.raises(huggingface_hub.errors.HfHubHTTPError, match="401"):
            api.create_repo("me/other", token="hf_wrong")
