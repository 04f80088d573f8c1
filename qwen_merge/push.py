"""`push_merge`: a merge published to a Hugging Face Hub repo as it is made, in one commit.

One run into the Hub sink (`sinks.hubrepo`): the repo is checked (token, write access, existing weights)
before anything is merged; each shard is uploaded while the next one merges; one commit publishes
everything. Without `output`, the shards are built in a staging folder under the Hugging Face home
(`HF_HOME/qwen-merge/push/`) and each one's bytes are freed once uploaded, so the disk holds about two
output shards; with `output`, the local copy is kept there too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .files import MANIFEST_NAME, read_json
from .inputs import hub
from .options import MergeOptions
from .planning.manifest import base_file_stats, check_not_merged_twice
from .planning.plan import MergePlan
from .run import adapter_spec, local_inputs, open_run, tell, without_gc
from .sinks.card import Source, model_card
from .sinks.folder import FolderSink, finished_merge
from .sinks.hubrepo import (CARD, HubSink, HubTarget, Published, UploadRecord, check_credentials, check_repo_id,
                            prepare_repo, record_path_of)
from .sinks.output import check_destination, partial_folder_of

PathLike = str | os.PathLike


@dataclass(frozen=True, slots=True)
class PushReport:
    """What `push_merge` published: the repo, the commit (and pull request), the shards this run uploaded,
    the old files the commit deleted, the local copy kept (None without `output`) and the plan."""

    repo_id: str
    revision: str | None
    commit_url: str
    commit: str
    pr_url: str | None
    uploaded: tuple[str, ...]
    deleted: tuple[str, ...]
    output: Path | None
    plan: MergePlan


def push_merge(base: PathLike | None, adapter: PathLike | Sequence[PathLike], repo_id: str,
               output: PathLike | None = None, *, weights: Sequence[float] | None = None, private: bool = False,
               revision: str | None = None, create_pr: bool = False,
               commit_message: str | None = None, overwrite: bool = False, resume: bool = False,
               progress: bool = True, force: bool = False, options: MergeOptions | None = None,
               rounding: str | None = None, key_map: dict[str, str] | None = None,
               allow_pickle: bool | None = None, allow_nonfinite: bool | None = None,
               block_bytes: int | None = None, dtype: str | None = None, max_shard_size: int | str | None = None,
               low_disk: bool | None = None, tokenizer: str | os.PathLike | None = None) -> PushReport:
    """Merge `adapter` into `base` and publish the result to the Hub model repo `repo_id` in one commit.

    Each output shard is uploaded as soon as it is written and hashed, while the next one merges; the
    commit at the end holds the shards, the index, config, generation config, tokenizer files,
    `qwen_merge.json` and a model card (README.md). Nothing appears in the repo before that commit: a
    failure before it leaves the repo as it was. The token, endpoint and transfer are huggingface_hub's
    (`hf auth login` or HF_TOKEN; HF_ENDPOINT).

    Args:
        base, adapter: as for `merge_shards` (folders or Hub repo ids; `adapter` a list of several, with
            `weights`, merges their weighted sum, and the card lists them all).
        weights: one number per adapter, as for `merge_shards`.
        repo_id: the repo to publish to, "org/name"; created (`private` if asked) when missing.
        output: also keep the merged model in this folder (as `merge_shards` writes it). None: only a
            staging folder, each shard's bytes freed once uploaded (disk: about two output shards).
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from the default branch when missing); None: the
            default branch. With `create_pr`, the branch the pull request targets.
        create_pr: open a pull request with the commit instead of committing to the branch.
        commit_message: the commit's title (default "Upload merged model (qwen-merge)").
        overwrite: replace a repo that holds weights already; the same commit deletes its files that the new
            model does not have (`.gitattributes` is kept). Also replaces a non-empty `output`.
        resume: continue after a failure: shards already uploaded (recorded beside the staging folder or
            OUT) are not merged or sent again, shards merged but not uploaded are only uploaded; then the
            commit. A finished `output` of the same merge is uploaded and committed without merging.
        progress, force, options and the rest: as for `merge_shards`.

    Returns:
        A `PushReport` with the commit's URL (and the pull request's).

    Raises:
        HubError: not logged in, no write access to the namespace, the repo holds a model already (see
        `overwrite`), or an input repo cannot be used. UploadError (a DownloadError): an upload or the
        commit failed; nothing was committed; `resume=True` continues. OptionError: `repo_id` is not a valid
        repo id. And the errors of `merge_shards`.
    """
    options = MergeOptions.of(options, rounding=rounding, key_map=key_map, allow_pickle=allow_pickle,
                              allow_nonfinite=allow_nonfinite, block_bytes=block_bytes,
                              dtype=dtype, max_shard_size=max_shard_size, low_disk=low_disk,
                              tokenizer=tokenizer)
    check_repo_id(repo_id)
    adapter = adapter_spec(adapter, weights)
    target = HubTarget(repo_id, private, revision, create_pr, commit_message, overwrite)
    check_credentials(target)  # before planning, which may take a while
    keep_local = output is not None
    dest = Path(output) if keep_local else staging_folder_for(target)
    if keep_local:
        check_destination(dest, local_inputs(base, adapter, options), overwrite=overwrite, resume=resume)
    elif not resume:
        _clear_staging(dest)
    with without_gc(), _hub_bars(progress), open_run(base, adapter, options, merging=True) as run:
        plan = run.plan
        if keep_local:
            run.check_destination(dest, base, adapter, overwrite=overwrite, resume=resume)
        ident = run.ready_to_write()
        finished = resume and not (keep_local and overwrite) and finished_merge(dest, ident)
        if not finished:
            check_not_merged_twice(ident, plan.base.root, force)
        if progress:
            tell(plan)
        deletions = prepare_repo(target, _new_files(plan))
        record_path = record_path_of(dest)
        if not resume:
            record_path.unlink(missing_ok=True)
        record = UploadRecord.load(record_path, repo_id)
        sink = HubSink(plan, target, record, deletions, lambda folder: _card(target, plan, folder),
                       keep_local=keep_local)
        if finished:
            published = sink.publish(dest)
        else:
            with FolderSink(dest, plan, ident, base_file_stats(plan), resume=resume, progress=progress) as folder:
                sink.folder = folder
                remaining = folder.remaining_bytes
                needed = remaining if keep_local else min(remaining, disk_needed(plan, keep_local=False))
                published = run.write_into(sink, dest, needed, progress=progress, what="push")
    if not keep_local:
        shutil.rmtree(dest, ignore_errors=True)
    return _report(target, published, sink, dest if keep_local else None, plan)


@contextmanager
def _hub_bars(progress: bool) -> Iterator[None]:
    """huggingface_hub's own progress bars (one per file uploaded) off while a quiet push runs."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet:
            enable_progress_bars()


def staging_folder_for(target: HubTarget) -> Path:
    """Where a push without `output` builds the model: under the Hugging Face home, one folder per repo, at
    a fixed place so that `resume` finds it."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "qwen-merge" / "push" / target.repo_id.replace("/", "--")


def _clear_staging(dest: Path) -> None:
    """A fresh push without `output`: what an earlier, failed push into the same repo left is removed."""
    for path in (dest, partial_folder_of(dest)):
        shutil.rmtree(path, ignore_errors=True)
    record_path_of(dest).unlink(missing_ok=True)


def disk_needed(plan: MergePlan, keep_local: bool) -> int:
    """The output bytes on disk at once: all of them with a local copy, else about two shards (the one
    uploading and the one being written) plus the small files."""
    if keep_local:
        return plan.output_bytes
    sizes = sorted((s.size for s in plan.shards), reverse=True)
    return sum(sizes[:2]) + plan.output_bytes - sum(sizes)


def _new_files(plan: MergePlan) -> frozenset[str]:
    names = {s.name for s in plan.shards} | {side.name for side in plan.side_files} | {MANIFEST_NAME, CARD}
    return frozenset(names | ({plan.index_name} if plan.index_name else set()))


def _card(target: HubTarget, plan: MergePlan, folder: Path) -> bytes:
    manifest = read_json(folder / MANIFEST_NAME, MANIFEST_NAME)
    base = _source(plan.base.hub, plan.base.root)
    adapters = [_source(one.hub, one.root) for one in plan.adapters or (plan.adapter,)]
    named = plan.adapter.config.get("base_model_name_or_path")
    base_model = plan.base.hub.repo_id if plan.base.hub is not None else named if isinstance(named, str) else None
    return model_card(target.repo_id, base, adapters, manifest.get("options", {}), base_model,
                      _adapter_card(plan), weights=plan.weights)


def _source(origin, root: Path) -> Source:
    return Source(origin.repo_id, origin.commit) if origin is not None else Source(root.name)


def _adapter_card(plan: MergePlan) -> str | None:
    origin = plan.adapter.hub
    if origin is not None:
        if CARD not in origin.sizes:
            return None
        path = hub.fetch(origin, CARD)
    else:
        path = plan.adapter.root / CARD
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _report(target: HubTarget, published: Published, sink: HubSink, output: Path | None,
            plan: MergePlan) -> PushReport:
    return PushReport(target.repo_id, target.revision, published.commit_url, published.commit, published.pr_url,
                      tuple(sink.uploaded_now), published.deleted, output, plan)
