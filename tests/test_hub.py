"""Hugging Face Hub repo ids as inputs, against a local fake Hub (tests/hubserver.py): no real host is reached.

Every merge from the Hub is compared with the merge of the same files from local folders, byte for byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from builders import REPO, copy_tree, run_cli, tree_hash
from hubserver import FakeHub, use_hub

from qwen_merge import (DiskFullError, DownloadError, HubError, OutputError, iter_merged, merge_shards, plan_merge,
                        verify_merge)
from qwen_merge.inputs import hub as hub_module
from qwen_merge.planning.fetchplan import fetch_plan
from qwen_merge.report import render, to_dict
from qwen_merge.sinks import output as output_module
from qwen_merge.units import human_bytes

pytestmark = pytest.mark.slow  # every test merges through a local Hub server and its downloads

BASE, LORA = "org/tiny-base", "org/tiny-lora"
SHARDS = ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors")


@pytest.fixture
def local_merge(demo_merged) -> Path:
    """The reference: the same base and adapter merged from local folders."""
    return demo_merged


@pytest.fixture
def hub(demo_inputs, tmp_path, monkeypatch):
    base, adapter = demo_inputs
    with FakeHub() as server:
        server.add_repo(BASE, base)
        server.add_repo(LORA, adapter)
        use_hub(monkeypatch, server, tmp_path / "hf-cache", home=tmp_path / "hf-home", fast_retries=True)
        server.cache = tmp_path / "hf-cache"
        yield server


def same_output(ours: Path, reference: Path) -> None:
    """Byte-identical files; the manifests differ only by the inputs' Hub identity."""
    a, b = tree_hash(ours), tree_hash(reference)
    a.pop("qwen_merge.json"), b.pop("qwen_merge.json")
    assert a == b
    mine, theirs = (json.loads((p / "qwen_merge.json").read_text()) for p in (ours, reference))
    for role in ("base", "adapter"):
        mine[role].pop("hub", None)
    assert mine == theirs


def shard_bodies(server: FakeHub) -> int:
    """GETs of a whole shard (not a header range)."""
    return sum(server.count("GET", name, ranged=False) for name in SHARDS)


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and not p.is_symlink())


def test_hub_merge_is_byte_identical_to_the_local_merge(hub, tmp_path, local_merge):
    report = merge_shards(BASE, LORA, tmp_path / "out", progress=False)
    same_output(tmp_path / "out", local_merge)
    manifest = json.loads((tmp_path / "out" / "qwen_merge.json").read_text())
    assert manifest["base"]["hub"] == {"repo": BASE, "commit": hub.commit_of(BASE)}
    assert manifest["adapter"]["hub"] == {"repo": LORA, "commit": hub.commit_of(LORA)}
    assert report.merged > 0
    snapshot = hub.cache / "models--org--tiny-base" / "snapshots" / hub.commit_of(BASE)
    assert sorted(p.name for p in snapshot.glob("*.safetensors")) == list(SHARDS)  # in the standard cache
    assert (hub.cache / "models--org--tiny-base" / "refs" / "main").read_text() == hub.commit_of(BASE)


def test_plan_downloads_only_json_and_headers(hub):
    plan = plan_merge(BASE, LORA)
    assert shard_bodies(hub) == 0
    reads = [r for r in hub.requests if BASE in r.path and any(r.path.endswith(n) for n in SHARDS)]
    assert len(reads) == 3 and all(r.method == "GET" and r.range.startswith("bytes=0-") for r in reads)
    text = render(plan)
    assert f"{BASE} (Hub, commit {hub.commit_of(BASE)[:12]}" in text
    assert "download: 3 shard(s)" in text and "with --low-disk" in text


def test_plan_json_lists_the_downloads_and_the_disk(hub, tmp_path):
    plan = plan_merge(BASE, LORA)
    fetch = fetch_plan(plan)
    document = to_dict(plan)
    assert document["base"]["hub"] == {"repo": BASE, "revision": None, "commit": hub.commit_of(BASE)}
    assert document["downloads"] == {"shards": list(SHARDS), "bytes": fetch.download_bytes, "cached_bytes": 0,
                                     "low_disk_bytes": fetch.low_disk_bytes}
    assert document["disk"] == {"needed_bytes": plan.output_bytes + fetch.download_bytes,
                                "low_disk_needed_bytes": plan.output_bytes + fetch.low_disk_bytes}
    assert f"download: 3 shard(s), {human_bytes(fetch.download_bytes)}" in render(plan)
    planned = run_cli("plan", BASE, LORA, "--json")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout) == document
    report = merge_shards(BASE, LORA, tmp_path / "out", progress=False)
    assert report.bytes_written == plan.output_bytes == document["output"]["bytes"]


def test_cached_files_are_never_downloaded_again(hub, tmp_path, local_merge):
    merge_shards(BASE, LORA, tmp_path / "one", progress=False)
    hub.reset_requests()
    merge_shards(BASE, LORA, tmp_path / "two", progress=False)
    assert shard_bodies(hub) == 0 and hub.count("GET", "resolve") == 0
    same_output(tmp_path / "two", local_merge)


def test_offline_works_from_the_cache_and_names_a_missing_file(hub, tmp_path, monkeypatch, local_merge):
    merge_shards(BASE, LORA, tmp_path / "online", progress=False)
    use_hub(monkeypatch, hub, hub.cache, home=tmp_path / "hf-home", offline=True)
    hub.reset_requests()
    merge_shards(BASE, LORA, tmp_path / "offline", progress=False)
    assert hub.requests == []
    same_output(tmp_path / "offline", local_merge)
    (hub.cache / "models--org--tiny-base" / "snapshots" / hub.commit_of(BASE) / SHARDS[1]).unlink()
    with pytest.raises(DownloadError, match=f"{SHARDS[1]}: not in the Hugging Face cache"):
        merge_shards(BASE, LORA, tmp_path / "missing", progress=False)
    with pytest.raises(HubError, match="not in the Hugging Face cache .* offline mode is on"):
        plan_merge("org/never-fetched", LORA)


def test_low_disk_holds_at_most_two_shards_and_keeps_what_was_cached(hub, tmp_path, monkeypatch, local_merge,
                                                                      demo_inputs):
    from huggingface_hub import hf_hub_download

    hf_hub_download(BASE, SHARDS[2], revision=hub.commit_of(BASE))  # cached before the run: must stay
    sizes = [hub.file(BASE, name).size for name in SHARDS]
    repo = hub.cache / "models--org--tiny-base"
    before = cache_bytes(repo)
    peaks: list[int] = []
    fetch = hub_module.fetch

    def measured(origin, name, tqdm_class=None):  # the cache is largest right after a download completes
        path = fetch(origin, name, tqdm_class)
        peaks.append(cache_bytes(repo) - before)
        return path

    monkeypatch.setattr(hub_module, "fetch", measured)
    merge_shards(BASE, LORA, tmp_path / "out", progress=False, low_disk=True)
    same_output(tmp_path / "out", local_merge)
    # + every small file (config, index, tokenizer: fetched by the merging thread, maybe while a shard is) + refs/main
    small = sum(p.stat().st_size for p in demo_inputs[0].iterdir() if p.name not in SHARDS) + 40
    stated = fetch_plan(plan_merge(BASE, LORA)).low_disk_bytes  # what `plan` prints for --low-disk
    assert stated == sizes[0] + sizes[1]
    assert max(sizes[:2]) <= max(peaks) <= stated + small  # at most the two downloaded shards at once
    snapshot = hub.cache / "models--org--tiny-base" / "snapshots" / hub.commit_of(BASE)
    assert sorted(p.name for p in snapshot.glob("*.safetensors")) == [SHARDS[2]]  # the downloaded two are gone
    assert not [p for p in (snapshot.parent.parent / "blobs").iterdir() if p.stat().st_size in sizes[:2]]


def test_a_dropped_download_says_resume_and_resume_completes(hub, tmp_path, local_merge):
    hub.fail_once(BASE, SHARDS[1], after_bytes=1000)
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=f"{SHARDS[1]}: download failed .*--resume"):
        merge_shards(BASE, LORA, out, progress=False)
    assert not out.exists()
    hub.reset_requests()
    merge_shards(BASE, LORA, out, progress=False, resume=True)
    assert hub.count("GET", SHARDS[0], ranged=False) == 0  # completed downloads are not fetched again
    same_output(out, local_merge)


def test_resume_refuses_when_the_branch_moved(hub, tmp_path, demo_inputs):
    hub.fail_once(BASE, SHARDS[1], after_bytes=1000)
    out = tmp_path / "out"
    with pytest.raises(DownloadError):
        merge_shards(BASE, LORA, out, progress=False)
    moved = copy_tree(demo_inputs[0], tmp_path / "v2")
    (moved / "generation_config.json").write_text('{"do_sample": false}')
    hub.add_repo(BASE, moved)  # main now points at a new commit
    with pytest.raises(OutputError, match=f"base Hub repo {BASE} at commit .* -> Hub repo {BASE} at commit"):
        merge_shards(BASE, LORA, out, progress=False, resume=True)


def test_revisions_tags_and_commits(hub, tmp_path, demo_inputs, local_merge):
    first = hub.commit_of(BASE)
    moved = copy_tree(demo_inputs[0], tmp_path / "v2")
    (moved / "generation_config.json").write_text('{"do_sample": false}')
    hub.add_repo(BASE, moved)
    hub.tag(BASE, "v1", first)
    for name in (f"{BASE}@{first}", f"{BASE}@v1"):
        out = tmp_path / name.split("@")[1]
        merge_shards(name, LORA, out, progress=False)
        same_output(out, local_merge)
    plan = plan_merge(BASE, LORA)
    assert plan.base.hub.commit == hub.commit_of(BASE) != first


@pytest.mark.parametrize("make, match", [
    (lambda hub: "org/nope", "org/nope: no file or folder of that name in .*, and no such repository on the Hub, "
                             "or it is private"),
    (lambda hub: f"{BASE}@no-such-branch", "revision 'no-such-branch' not found"),
])
def test_repo_and_revision_errors(hub, make, match):
    with pytest.raises(HubError, match=match):
        plan_merge(make(hub), LORA)


def test_gated_repo_says_how_to_log_in(hub, tmp_path, monkeypatch, local_merge):
    hub.set_flags(BASE, gated=True)
    with pytest.raises(HubError, match="gated repository: .*hf auth login"):
        plan_merge(BASE, LORA)
    use_hub(monkeypatch, hub, hub.cache, home=tmp_path / "hf-home", token="hf_test_token")
    merge_shards(BASE, LORA, tmp_path / "out", progress=False)
    same_output(tmp_path / "out", local_merge)


def test_pickle_only_repo_and_adapter_without_config(hub, tmp_path, demo_inputs):
    hub.add_files("org/old", {"config.json": b"{}", "pytorch_model.bin": b"\0" * 16})
    with pytest.raises(HubError, match="org/old: has only PyTorch pickle weights .*pytorch_model.bin"):
        plan_merge("org/old", LORA)
    hub.add_files("org/not-an-adapter", {"README.md": b"hi", "adapter_model.safetensors": b"\0" * 16})
    with pytest.raises(HubError, match="org/not-an-adapter: not a PEFT adapter: the repo has no adapter_config.json"):
        plan_merge(BASE, "org/not-an-adapter")


def test_an_existing_path_always_wins(hub, tmp_path, monkeypatch, demo_inputs, local_merge):
    base, adapter = demo_inputs
    monkeypatch.chdir(tmp_path)
    copy_tree(base, tmp_path / "org" / "tiny-base")
    hub.reset_requests()
    merge_shards(BASE, adapter, tmp_path / "out", progress=False)
    assert not [r for r in hub.requests if "tiny-base" in r.path]
    assert "hub" not in json.loads((tmp_path / "out" / "qwen_merge.json").read_text())["base"]


def test_free_space_check_counts_downloads_and_suggests_low_disk(hub, tmp_path, monkeypatch):
    plan = plan_merge(BASE, LORA)
    downloads = sum(hub.file(BASE, n).size for n in SHARDS)
    free = plan.output_bytes + downloads // 2  # room for the output and two of three shards, not all
    real = shutil.disk_usage

    def disk_usage(path):
        return real(path)._replace(free=free)

    monkeypatch.setattr(output_module.shutil, "disk_usage", disk_usage)
    with pytest.raises(DiskFullError, match="for the output and .* for downloads .*--low-disk"):
        merge_shards(BASE, LORA, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_verify_and_iter_merged_read_hub_inputs(hub, tmp_path, local_merge):
    report = verify_merge(local_merge, BASE, LORA, full=True)
    assert report.ok, report.problems
    names = [name for name, _ in iter_merged(BASE, LORA)]
    assert len(names) == report.checked_tensors


def test_cli_plan_and_merge_with_repo_ids(hub, tmp_path, local_merge):
    planned = run_cli("plan", BASE, LORA)  # the environment use_hub set: HF_ENDPOINT, HF_HUB_CACHE, ...
    assert planned.returncode == 0, planned.stderr
    assert "download: 3 shard(s)" in planned.stdout
    merged = run_cli("merge", BASE, LORA, tmp_path / "out", "--low-disk")
    assert merged.returncode == 0, merged.stderr
    assert "downloading" in merged.stderr and "merging" in merged.stderr
    same_output(tmp_path / "out", local_merge)
    missing = run_cli("plan", "org/nope", LORA)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith(f"error: org/nope: no file or folder of that name in {REPO}, and no such "
                                     f"repository")


def test_low_disk_with_a_resharded_output(hub, tmp_path, demo_inputs):
    """Output shards that read several base shards, and base shards read by several output shards: each is
    released only after the last output shard that reads it is complete."""
    base, adapter = demo_inputs
    merge_shards(base, adapter, tmp_path / "local", progress=False, max_shard_size=120_000)
    merge_shards(BASE, LORA, tmp_path / "hub", progress=False, low_disk=True, max_shard_size=120_000)
    assert len(list((tmp_path / "hub").glob("*.safetensors"))) > 3
    same_output(tmp_path / "hub", tmp_path / "local")


def test_single_file_repo_and_cli_offline(hub, zoo, tmp_path, monkeypatch):
    """A repo holding one model.safetensors, merged through the CLI online, then offline from the cache."""
    base, adapter = zoo.pair("basic_single")
    hub.add_repo("org/single", base)
    reference = zoo.merged("basic_single").out
    online = run_cli("merge", "org/single", adapter, tmp_path / "online")
    assert online.returncode == 0, online.stderr
    use_hub(monkeypatch, hub, hub.cache, home=tmp_path / "hf-home", offline=True)
    hub.reset_requests()
    offline = run_cli("merge", "org/single", adapter, tmp_path / "offline")
    assert offline.returncode == 0, offline.stderr
    assert hub.requests == []
    for out in (tmp_path / "online", tmp_path / "offline"):
        same_output(out, reference)
