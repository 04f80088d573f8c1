"""Publishing a merge to a Hub repo (`push_merge`, `qwen-merge merge --push-to-hub`), against the local fake Hub
(tests/hubserver.py, its upload side: repo creation, preupload, LFS batch, PUT, verify, NDJSON commit) with
Xet off, as huggingface_hub does it with HF_HUB_DISABLE_XET=1. No real host is reached.

What is pushed, downloaded back with snapshot_download, is byte-identical to the local merge of the same
inputs (but for the model card); nothing is visible in the repo before the one commit.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from builders import tree_hash
from hubserver import FakeHub, use_hub

from qwen_merge import FormatError, HubError, OptionError, UploadError, plan_merge, push_merge
from qwen_merge.cli import main
from qwen_merge.planning.manifest import ShardRecord
from qwen_merge.push import disk_needed, staging_folder_for
from qwen_merge.sinks.hubrepo import HubTarget, UploadRecord
from qwen_merge.units import human_bytes

pytestmark = [pytest.mark.slow,  # merges through a local Hub server
              pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")]  # huggingface_hub's PUT

BASE, LORA, TARGET = "org/tiny-base", "org/tiny-lora", "me/merged"
TOKEN = "hf_test_token"
SHARDS = ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors")


@pytest.fixture
def hub(demo_inputs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    base, adapter = demo_inputs
    with FakeHub() as server:
        server.add_repo(BASE, base)
        server.add_repo(LORA, adapter)
        use_hub(monkeypatch, server, tmp_path / "hf-cache", home=tmp_path / "hf-home", token=TOKEN,
                fast_retries=True)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        server.home = tmp_path / "hf-home"
        yield server


def downloaded(tmp_path: Path, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    folder = tmp_path / f"downloaded-{revision}"
    return Path(snapshot_download(TARGET, revision=revision, local_dir=folder, cache_dir=tmp_path / "check-cache"))


def same_as_local(pushed: Path, reference: Path) -> None:
    """The pushed files equal the local merge's, but for the card and the manifest's Hub identity."""
    ours = {name: digest for name, digest in tree_hash(pushed).items() if not name.startswith(".cache")}
    assert ours.pop("README.md") and ours.pop(".gitattributes")
    same_files(ours, pushed, reference)


def same_files(ours: dict[str, str], pushed: Path, reference: Path) -> None:
    theirs = tree_hash(reference)
    ours.pop("qwen_merge.json"), theirs.pop("qwen_merge.json")
    assert ours == theirs
    mine = json.loads((pushed / "qwen_merge.json").read_text())
    for role in ("base", "adapter"):
        mine[role].pop("hub", None)
    assert mine == json.loads((reference / "qwen_merge.json").read_text())


def test_push_is_one_commit_byte_identical_to_the_local_merge(hub, tmp_path, demo_merged, capsys):
    report = push_merge(BASE, LORA, TARGET, progress=False)
    assert hub.commits_of(TARGET) == 2  # the repo's creation, then ours
    assert hub.count("POST", f"/api/models/{TARGET}/commit/") == 1
    assert sorted(report.uploaded) == list(SHARDS) and report.output is None
    assert report.commit == hub.commit_of(TARGET)
    pushed = downloaded(tmp_path)
    same_as_local(pushed, demo_merged)
    card = (pushed / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/tiny-base\nbase_model_relation: merge\nlibrary_name: transformers\n")
    assert f"`{BASE}`" in card and hub.commit_of(BASE) in card and hub.commit_of(LORA) in card
    command = next(line for line in card.splitlines() if line.startswith("qwen-merge verify merged --base "))
    assert main(["verify", str(pushed), *command.split()[3:]]) == 0  # the card's check passes on the download
    assert not staging_folder_for(HubTarget(TARGET)).exists()  # the staging folder is gone


def test_several_adapters_are_pushed_with_a_card_that_lists_them_and_verifies(hub, tmp_path, demo_inputs, capsys):
    """push_merge of a weighted list: the files are the local merge of the same list, and the card names every
    adapter with its weight and gives the verify command that checks the pushed model."""
    hub.add_repo("org/other-lora", demo_inputs[1])
    adapters, weights = [LORA, "org/other-lora"], [0.7, -0.2]
    push_merge(BASE, adapters, TARGET, progress=False, weights=weights)
    pushed = downloaded(tmp_path)
    from qwen_merge import merge_shards

    local = merge_shards(demo_inputs[0], [demo_inputs[1]] * 2, tmp_path / "local", progress=False, weights=weights)
    ours = {name: digest for name, digest in tree_hash(pushed).items() if not name.startswith(".cache")}
    theirs = tree_hash(local.output)
    for name in ("README.md", ".gitattributes", "qwen_merge.json"):
        ours.pop(name, None), theirs.pop(name, None)
    assert ours == theirs
    card = (pushed / "README.md").read_text()
    commits = {repo: hub.commit_of(repo) for repo in (BASE, *adapters)}
    assert "several LoRA adapters merged into its base model's weights (W + Σ wᵢ·ΔWᵢ, weighted as listed)" in card
    assert (f"- Adapters:\n  - [`{LORA}`](https://huggingface.co/{LORA}) at commit `{commits[LORA]}`, weight 0.7\n"
            f"  - [`org/other-lora`](https://huggingface.co/org/other-lora) at commit `{commits['org/other-lora']}`, "
            f"weight -0.2\n") in card
    command = next(line for line in card.splitlines() if line.startswith("qwen-merge verify merged "))
    assert command == (f"qwen-merge verify merged --base {BASE}@{commits[BASE]} --adapter {LORA}@{commits[LORA]} "
                       f"--adapter org/other-lora@{commits['org/other-lora']}")
    assert main(["verify", str(pushed), *command.split()[3:]]) == 0, capsys.readouterr()


def test_cli_push_keeps_out_and_commits_to_a_branch(hub, tmp_path, demo_merged, capsys):
    hub.multipart_min_size, hub.multipart_chunk_size = 150_000, 64_000  # the larger shards go in parts
    out = tmp_path / "out"
    status = main(["merge", BASE, LORA, str(out), "--push-to-hub", TARGET, "--revision", "dev", "--private",
                   "--quiet"])
    assert status == 0, capsys.readouterr().err
    same_files(tree_hash(out), out, demo_merged)  # the local copy kept is the local merge
    same_as_local(downloaded(tmp_path, revision="dev"), demo_merged)
    assert hub.file(TARGET, ".gitattributes", "main")  # main has only the repo's first commit
    assert hub.count("PUT", "/part/3") == 2  # two shards of more than 150,000 bytes, in 3 parts of 64,000
    with pytest.raises(KeyError):
        hub.file(TARGET, SHARDS[0], "main")


def test_create_pr_opens_a_pull_request_and_leaves_main(hub, tmp_path, demo_merged):
    report = push_merge(BASE, LORA, TARGET, create_pr=True, commit_message="Merged", progress=False,
                        low_disk=True)
    assert report.pr_url.endswith("/discussions/1")
    assert hub.commit_of(TARGET, "refs/pr/1") == report.commit
    with pytest.raises(KeyError):
        hub.file(TARGET, SHARDS[0], "main")
    same_as_local(downloaded(tmp_path, revision="refs/pr/1"), demo_merged)


def test_the_card_keeps_the_adapter_card_below_ours(hub, tmp_path, demo_inputs):
    adapter = tmp_path / "adapter"
    shutil.copytree(demo_inputs[1], adapter)
    (adapter / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- sft\n---\n# My LoRA\n\nTrained on X.\n")
    hub.add_repo("org/lora-with-card", adapter)
    push_merge(BASE, "org/lora-with-card", TARGET, progress=False, dtype="float32")
    card = (downloaded(tmp_path) / "README.md").read_text()
    meta, body = card.split("\n---\n", 1)
    assert "license" not in meta and "sft" not in meta and "- qwen-merge" in meta
    assert body.index("## How to check it") < body.index("## The adapter's card\n\n# My LoRA\n\nTrained on X.")
    assert '`dtype="F32"`' in body and "qwen-merge verify merged --base org/tiny-base@" in body


# -- nothing visible before the one commit; --resume sends only what is missing ------------------------------


def repo_files(hub: FakeHub, revision: str = "main") -> set[str]:
    with hub._lock:
        return set(hub._repos[TARGET].resolve(revision).files)


def lfs_puts(hub: FakeHub) -> int:
    return hub.count("PUT", "/lfs/")


@pytest.mark.parametrize("where", ["PUT", "batch"])
def test_a_dropped_upload_commits_nothing_and_resume_sends_only_the_missing_shards(hub, tmp_path, capsys,
                                                                                   demo_merged, where):
    # the first shard's request and every retry of huggingface_hub's fail: the connection drops during the PUT,
    # or the LFS batch endpoint answers 503
    hub.fail_uploads(times=6) if where == "PUT" else hub.fail_batch(503, times=6)
    args = ["merge", BASE, LORA, "--push-to-hub", TARGET, "--quiet"]
    assert main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # huggingface_hub's retry warnings, then ours
    err = lines[-1]
    assert err.startswith("error: me/merged: uploading model-00001-of-00003.safetensors failed (")
    assert not any(line.startswith(("Traceback", "error:")) for line in lines[:-1])
    assert "nothing was committed" in err and "--resume" in err
    assert hub.commits_of(TARGET) == 1 and repo_files(hub) == {".gitattributes"}  # as created: nothing committed
    present = hub.lfs_objects(TARGET)
    hub.reset_requests()
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    pushed = downloaded(tmp_path)
    same_as_local(pushed, demo_merged)
    oids = {json.loads((pushed / "qwen_merge.json").read_text())["output"]["shards"][n]["sha256"]
            for n in SHARDS}
    assert lfs_puts(hub) == len(oids - present) > 0  # only what the Hub lacked was sent
    assert hub.count("POST", f"/api/models/{TARGET}/commit/") == 1


def test_a_refused_commit_leaves_the_repo_and_resume_only_commits(hub, tmp_path, demo_merged):
    hub.fail_commit(500)
    with pytest.raises(UploadError, match=r"committing failed \(.*500.*\); nothing was committed: .*--resume"):
        push_merge(BASE, LORA, TARGET, progress=False)
    assert hub.commits_of(TARGET) == 1 and repo_files(hub) == {".gitattributes"}
    staging = staging_folder_for(HubTarget(TARGET))
    assert sum(p.stat().st_blocks for p in staging.glob("*.safetensors")) == 0  # uploaded: the bytes were freed
    hub.reset_requests()
    report = push_merge(BASE, LORA, TARGET, resume=True, progress=False)
    assert lfs_puts(hub) == 0 and hub.count("POST", ".git/info/lfs/objects/batch") == 0  # nothing sent again
    assert report.uploaded == ()
    same_as_local(downloaded(tmp_path), demo_merged)


def test_resume_of_a_finished_out_uploads_it(hub, tmp_path, demo_inputs, demo_merged):
    """A folder the same merge finished (a plain `merge` earlier) is uploaded and committed, not merged again."""
    out = tmp_path / "out"
    shutil.copytree(demo_merged, out)
    before = tree_hash(out)
    report = push_merge(*demo_inputs, TARGET, out, resume=True, progress=False)
    assert sorted(report.uploaded) == list(SHARDS) and tree_hash(out) == before
    pushed = downloaded(tmp_path)
    assert (pushed / "README.md").read_text().count("(a local folder)") == 2
    same_as_local(pushed, demo_merged)


# -- an existing repo ------------------------------------------------------------------------------------------


def test_a_repo_with_a_model_is_refused_unless_overwrite_which_deletes_stale_files(hub, tmp_path, demo_merged):
    old = {".gitattributes": b"*.safetensors filter=lfs\n", "model-00001-of-00005.safetensors": b"x" * 100,
           "model-00005-of-00005.safetensors": b"y" * 100, "model.safetensors.index.json": b"{}",
           "notes.txt": b"old notes"}
    hub.add_files(TARGET, old)
    with pytest.raises(HubError, match=r"already holds a model \(model-00001-of-00005.safetensors, .*\); pass "
                                       r"overwrite=True \(--overwrite\)"):
        push_merge(BASE, LORA, TARGET, progress=False)
    assert hub.commits_of(TARGET) == 1 and lfs_puts(hub) == 0  # refused before anything was merged or sent
    report = push_merge(BASE, LORA, TARGET, overwrite=True, progress=False)
    assert report.deleted == ("model-00001-of-00005.safetensors", "model-00005-of-00005.safetensors", "notes.txt")
    pushed = downloaded(tmp_path)
    same_as_local(pushed, demo_merged)  # no stale shard, nothing of the old model left but .gitattributes
    assert (pushed / ".gitattributes").read_bytes() == old[".gitattributes"]


# -- errors ----------------------------------------------------------------------------------------------------


def one_error(capsys, *args: str) -> str:
    assert main(["merge", BASE, LORA, *args, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_no_token_says_how_to_log_in(hub, tmp_path, monkeypatch, capsys):
    use_hub(monkeypatch, hub, tmp_path / "hf-cache", home=tmp_path / "hf-home", token=None)
    err = one_error(capsys, "--push-to-hub", TARGET)
    assert "no token" in err or "none was found" in err
    assert "hf auth login" in err and "HF_TOKEN" in err
    assert TARGET not in hub._repos  # nothing was created


def test_no_write_access_to_the_namespace(hub, capsys):
    hub.write_namespaces = {"me"}
    err = one_error(capsys, "--push-to-hub", "their-org/merged")
    assert "their-org/merged" in err and "refused (403" in err and "write access to their-org" in err


def test_an_invalid_repo_name_is_refused_before_anything(hub, capsys):
    for bad in ("no-slash", "org/bad name", "org/x..y", "a/b/c"):
        err = one_error(capsys, "--push-to-hub", bad)
        assert err.startswith(f"error: --push-to-hub: {bad!r}: not a valid Hub repo id")
    with pytest.raises(OptionError, match="push_to_hub: 'org/-x': not a valid"):
        push_merge(BASE, LORA, "org/-x", progress=False)
    assert hub.count("POST") == 0


@pytest.mark.parametrize(("argv", "meant"), [
    (["org/base", "org/lora", "--push-to-hub", "me/m"], ("org/base", "org/lora", None)),
    (["org/lora", "--push-to-hub", "me/m"], (None, "org/lora", None)),
    (["org/base", "org/lora", "out", "--push-to-hub", "me/m"], ("org/base", "org/lora", "out")),
    (["org/lora", "out"], (None, "org/lora", "out")),
    (["org/base", "org/lora", "out"], ("org/base", "org/lora", "out")),
])
def test_merge_positionals_with_and_without_push_to_hub(argv, meant):
    from qwen_merge.cli import _parse

    args = _parse(["merge", *argv])
    assert (args.base, args.adapter, args.out) == meant


def test_flags_of_a_push_without_push_to_hub_are_refused(capsys, tmp_path):
    assert main(["merge", "base", "adapter", str(tmp_path / "out"), "--create-pr"]) == 1
    assert capsys.readouterr().err.startswith("error: --create-pr applies only with --push-to-hub")


# -- disk ------------------------------------------------------------------------------------------------------


class DiskSampler:
    """The bytes allocated under a folder, sampled every millisecond on a thread, and their peak."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            used = 0
            for root, _, files in os.walk(self.folder):
                for name in files:
                    try:
                        used += os.stat(os.path.join(root, name)).st_blocks * 512
                    except OSError:
                        pass
            self.peak = max(self.peak, used)
            time.sleep(0.001)

    def __enter__(self) -> DiskSampler:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_without_out_the_disk_holds_about_two_shards(hub, tmp_path, capsys):
    plan = plan_merge(BASE, LORA)
    sizes = sorted(s.size for s in plan.shards)
    hub.limit_bandwidth(400_000, downloads=False)  # each shard takes a while to upload: the merge waits for it
    staging = staging_folder_for(HubTarget(TARGET)).parent
    with DiskSampler(staging) as sampler:
        push_merge(BASE, LORA, TARGET, progress=False)
    budget = disk_needed(plan, keep_local=False)
    assert budget == sizes[-1] + sizes[-2] + plan.output_bytes - sum(sizes)
    slack = 4096 * 12  # block rounding of a dozen files
    assert sizes[-1] < sampler.peak <= budget + slack < plan.output_bytes  # a shard was seen; never all three
    assert main(["plan", BASE, LORA, "--push-to-hub", TARGET]) == 0
    out = capsys.readouterr().out
    assert (f"push to {TARGET}: uploads {human_bytes(plan.output_bytes)} in one commit; disk without OUT: "
            f"{human_bytes(budget)}") in out
    assert main(["plan", BASE, LORA, "--push-to-hub", TARGET, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["push"] == {"repo": TARGET, "upload_bytes": plan.output_bytes,
                                                            "disk_bytes": budget}


def test_a_disk_too_small_for_two_shards_is_refused_before_anything_is_sent(hub, monkeypatch, capsys):
    from qwen_merge.sinks import output as output_module

    plan = plan_merge(BASE, LORA)
    free = disk_needed(plan, keep_local=False) // 2  # not even two output shards
    real = shutil.disk_usage
    monkeypatch.setattr(output_module.shutil, "disk_usage", lambda path: real(path)._replace(free=free))
    err = one_error(capsys, "--push-to-hub", TARGET, "--low-disk")
    assert "DiskFull" not in err and "the push needs" in err and human_bytes(disk_needed(plan, False)) in err
    assert lfs_puts(hub) == 0 and hub.commits_of(TARGET) == 1


def test_offline_mode_is_refused(hub, tmp_path, monkeypatch, capsys):
    use_hub(monkeypatch, hub, tmp_path / "hf-cache", home=tmp_path / "hf-home", token=TOKEN, offline=True)
    with pytest.raises(HubError, match="offline mode is on"):
        push_merge(str(tmp_path / "nothing"), LORA, TARGET, progress=False)


def test_the_cli_says_what_it_published(hub, capsys):
    assert main(["merge", BASE, LORA, "--push-to-hub", TARGET, "--commit-message", "Merged by CI"]) == 0
    out = capsys.readouterr().out.strip()
    commit = hub.commit_of(TARGET)
    assert out.startswith("merged ")
    assert f"uploaded 3 shard(s) and committed {hub.endpoint}/{TARGET}/commit/{commit}" in out
    assert "kept a copy" not in out


@pytest.mark.parametrize(("doc", "named"), [
    ({"repo": "me/merged", "uploaded": {"s.safetensors": {"size": 3}}}, "lacks its sha256 or size"),
    ({"repo": "me/merged", "uploaded": {"s.safetensors": "x"}}, 'field uploaded["s.safetensors"] must be an object'),
    ({"repo": "me/merged", "uploaded": []}, "field uploaded must be an object"),
    ({"repo": 5}, "field repo must be a string"),
])
def test_a_damaged_upload_record_is_one_error_naming_the_field(tmp_path, doc, named):
    path = tmp_path / "record.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError) as info:
        UploadRecord.load(path, "me/merged")
    assert str(info.value).startswith(f"{path}: ") and named in str(info.value)


def test_an_upload_record_of_another_repo_is_not_reused(tmp_path):
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"repo": "other/repo", "uploaded": {"s.safetensors": {"sha256": "ab", "size": 3}}}))
    assert UploadRecord.load(path, "me/merged").shards == {}
    path.write_text(json.dumps({"repo": "me/merged", "uploaded": {"s.safetensors": {"sha256": "ab", "size": 3}}}))
    assert UploadRecord.load(path, "me/merged").shards == {"s.safetensors": ShardRecord("ab", 3)}
