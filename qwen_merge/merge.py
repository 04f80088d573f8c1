"""The public entry points: plan a merge, run it into a folder, or stream the merged tensors.

All three read the same plan; `merge_shards` and `iter_merged` consume the same pieces
(`pieces.shard_pieces`), so a tensor written to disk and a tensor handed to an embedding tool are computed
by the same code. torch is imported only when a tensor has to be computed: planning, and merges that
only copy bytes, run without it.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import tempfile
import threading
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from .compute.pieces import Block, BlockRing, Piece, shard_pieces, shard_runs
from .errors import DiskFullError, FormatError, QwenMergeError
from .files import ADAPTER_CONFIG, MANIFEST_NAME, MODEL_CONFIG
from .inputs import basemodel, hub
from .inputs.adapter import Adapter, open_adapter
from .inputs.checkpoint import Checkpoint, HubOrigin, open_checkpoint
from .inputs.digest import hash_in_background
from .inputs.sources import Files, read_exact, same_values
from .inputs.tensorfile import TensorEntry
from .options import TOKENIZER_CHOICES, MergeOptions
from .planning.fetchplan import FetchPlan, fetch_plan
from .planning.manifest import base_file_stats, check_not_merged_twice, check_plan_not_merged_twice, identity, manifest
from .planning.memory import RING_SIZE
from .planning.plan import MergePlan, TensorOp, make_plan
from .planning.tokenizer import (TOKENIZER_FILES, TokenizerChoice, choose, compares, files_in, tokenizer_files,
                                 wants_adapter_files)
from .progress import progress_bar
from .sinks.folder import finished_merge
from .sinks.output import (check_destination, check_free_space, check_free_space_for, copy_side_file, publish,
                           staging_folder, write_bytes, write_json, write_json_atomic)
from .sinks.resume import ResumeRecord, ResumeState
from .sinks.writer import ShardWriter
from .units import human_bytes

if TYPE_CHECKING:  # torch is imported lazily, where tensors are made
    import torch

PathLike = str | os.PathLike


@dataclass(frozen=True, slots=True)
class MergeReport:
    """What `merge_shards` wrote: the folder, counts, bytes, the files in it, and the plan it followed."""

    output: Path
    merged: int
    copied: int
    bytes_written: int
    files: tuple[str, ...]
    plan: MergePlan
    already_complete: bool = False  # `resume` found this merge finished at `output` and wrote nothing


def plan_merge(base: PathLike | None, adapter: PathLike, *, force: bool = False,
               options: MergeOptions | None = None,
               rounding: str | None = None, key_map: dict[str, str] | None = None,
               allow_pickle: bool | None = None, block_bytes: int | None = None,
               dtype: str | None = None, max_shard_size: int | str | None = None,
               tokenizer: str | os.PathLike | None = None) -> MergePlan:
    """Check that `adapter` fits `base` and describe the merge, reading only headers and JSON.

    Args:
        base: a model folder (`model.safetensors`, or an index plus shards) or one `.safetensors` file;
            or a Hugging Face Hub repo id, `"org/name"` or `"org/name@revision"` (a `str` that is not an
            existing path). A repo is read through the Hugging Face cache: planning fetches its JSON
            files and each shard's header only; merging downloads the shards it lacks into the cache,
            the next one while the current one merges. HF_TOKEN / the stored login, HF_HUB_OFFLINE,
            HF_HUB_CACHE / HF_HOME and HF_ENDPOINT apply as in every huggingface_hub tool.
            None: the model the adapter's config names (`base_of(adapter)`: its base_model_name_or_path).
        adapter: a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`), or a Hub repo
            id holding one.
        force: plan even when the base's manifest shows this adapter was already merged into it (as
            `merge_shards`' `force`).
        options: a `MergeOptions`; the keyword arguments below, when given, are set on top of it.
        rounding: "single" (fp32 accumulation, one rounding; the default) or "peft" (PEFT's double
            rounding where PEFT rounds twice: embedding LoRA, target_parameters, MiCA).
        key_map: prefix renames from adapter (in-model) names to base (on-disk) names, e.g.
            {"model.language_model.": "model."}; the renames transformers applies are found without it.
        allow_pickle: read a pickled `adapter_model.bin` with `torch.load(weights_only=True)`.
        block_bytes: fp32 bytes of a row block; bounds the working memory of each tensor.
        dtype: "bfloat16", "float16" or "float32": convert every float tensor of the output, with one
            rounding from the fp32 result for merged ones (an FP8 base is dequantized: its scales and
            quantization_config are dropped). None (default): the base's dtypes, copies byte for byte;
            an FP8 base stays FP8, its merged weights requantized per block.
        max_shard_size: re-shard the output, at most this many bytes per shard (an int, or "5GB",
            "500MB", "2GiB" as Hugging Face reads them); None (default): the base's shard layout.
        tokenizer: which tokenizer files the output gets: "auto" (default: the ones saved beside the
            adapter when they differ from the base's in vocabulary, added or special tokens or chat
            template), "base", "adapter", or a folder holding a tokenizer. `plan.tokenizer` says which.

    Returns:
        The `MergePlan`; `qwen_merge.report.render(plan)` is the human-readable report `qwen-merge plan`
        prints, `qwen_merge.report.to_dict(plan)` the document `qwen-merge plan --json` prints.

    Raises:
        FormatError, AdapterError, MismatchError, OptionError: the inputs cannot be merged; nothing was
        written. AlreadyMergedError: the base already contains this adapter (see `force`). HubError: a
        repo id cannot be resolved (not found, gated, no such revision or file);
        DownloadError (a HubError): the Hub cannot be reached, or offline mode lacks a file.

    Example:
        >>> plan = plan_merge("Qwen3-0.6B", "my-lora")          # doctest: +SKIP
        >>> print(len(plan.merges), "merged,", plan.copied, "copied")  # doctest: +SKIP
        196 merged, 115 copied
    """
    options = MergeOptions.of(options, rounding=rounding, key_map=key_map, allow_pickle=allow_pickle,
                              block_bytes=block_bytes, dtype=dtype, max_shard_size=max_shard_size,
                              tokenizer=tokenizer)
    with _planned(base, adapter, options) as plan:
        check_plan_not_merged_twice(plan, force)
        return plan


def merge_shards(base: PathLike | None, adapter: PathLike, output: PathLike, *, overwrite: bool = False,
                 progress: bool = True, resume: bool = False, force: bool = False,
                 options: MergeOptions | None = None, rounding: str | None = None,
                 key_map: dict[str, str] | None = None, allow_pickle: bool | None = None,
                 allow_nonfinite: bool | None = None, block_bytes: int | None = None,
                 dtype: str | None = None, max_shard_size: int | str | None = None,
                 low_disk: bool | None = None, tokenizer: str | os.PathLike | None = None) -> MergeReport:
    """Merge a LoRA adapter into a safetensors checkpoint, streaming shard by shard into `output`.

    The output has the base's shard names and tensor-to-shard assignment (or `max_shard_size` shards),
    an index (when the base has one, or when re-sharded into several files) and the base's side files
    (config, tokenizer, ...; the adapter's tokenizer instead of the base's, see `tokenizer`). It is built
    in a temporary folder beside `output` and moved into place only when complete; on any error nothing
    appears at `output`.

    Args:
        base: a model folder, one `.safetensors` file, or a Hub repo id; None: the model the adapter's
            config names (as for `plan_merge`).
        adapter: a PEFT LoRA folder, or a Hub repo id.
        output: the folder to create. It must not be, contain or lie inside an input.
        overwrite: replace `output` if it is a non-empty folder.
        progress: show progress by bytes on stderr: a bar on a terminal, a plain line every 10% or 10 s
            otherwise (`progress.progress_bar`); before it, the plan's notes and the tokenizer taken from
            the adapter, one line each.
        resume: continue an interrupted merge into `output` from its completed shards (refused if the
            inputs or options changed); without one, start afresh. If `output` already holds this merge,
            finished (its manifest matches), nothing is written and `already_complete` is set in the report.
        force: merge even when the base's manifest shows this adapter was already merged into it.
        options, rounding, key_map, allow_pickle, block_bytes, dtype, max_shard_size, tokenizer: as for
            `plan_merge`.
        allow_nonfinite: write NaN/Inf that the adapter or the merge produces instead of stopping.
        low_disk: for a base from the Hub, delete each shard this run downloaded from the cache as soon as
            the output shards that read it are complete (shards cached before the run are kept); free
            disk must then hold the output plus about two shards instead of the whole base.

    The output folder also holds `qwen_merge.json`: tool version, input identity (file sizes, the
    adapter's SHA-256), options, counts and each shard's SHA-256 — nothing that varies between runs.

    Raises:
        FormatError, AdapterError, MismatchError, OptionError: the inputs cannot be merged (found before
        writing). NonFiniteError, ZeroNormError: found while computing; nothing appears at `output`.
        AlreadyMergedError: the base already contains this adapter (see `force`).
        OutputError: the destination is unsafe, or writing failed (DiskFullError: out of space).

    Example:
        >>> report = merge_shards("Qwen3-0.6B", "my-lora", "Qwen3-0.6B-merged")  # doctest: +SKIP
        >>> report.merged, report.copied                                          # doctest: +SKIP
        (196, 115)
    """
    dest = Path(output)
    options = MergeOptions.of(options, rounding=rounding, key_map=key_map, allow_pickle=allow_pickle,
                              allow_nonfinite=allow_nonfinite, block_bytes=block_bytes,
                              dtype=dtype, max_shard_size=max_shard_size, low_disk=low_disk,
                              tokenizer=tokenizer)
    local = [Path(p) for p in (base, adapter) if p is not None and hub.repo_ref(p) is None]
    if options.tokenizer not in TOKENIZER_CHOICES:  # a tokenizer folder is an input too
        local.append(Path(options.tokenizer))
    check_destination(dest, local, overwrite=overwrite, resume=resume)  # before torch starts loading
    with _planned(base, adapter, options, merging=True) as plan:
        if base is None or plan.base.hub is not None or plan.adapter.hub is not None:
            check_destination(dest, _inputs(base, adapter, plan), overwrite=overwrite, resume=resume)
        fetch_side_files(plan)
        if any(not op.is_raw_copy for op in plan.ops):
            _import_compute_in_background()
        ident = identity(plan)
        if resume and not overwrite and finished_merge(dest, ident):  # nothing to resume: write nothing
            return _report(dest, plan, already_complete=True)
        check_not_merged_twice(ident, plan.base.root, force)
        if progress:
            _tell(plan)
        run = ResumeRecord(ident, base_file_stats(plan), {})  # resume also notices a rewritten base file
        with staging_folder(dest, resume=resume) as (folder, fresh):
            state = ResumeState(folder, run) if fresh else ResumeState.load(folder, run)
            needed = plan.output_bytes - sum(d.size for d in state.done.values())
            try:
                state.save()
                fetch = fetch_plan(plan)
                _check_space(dest, plan, fetch, needed, state)
                _write_folder(plan, fetch, folder, state, progress)
                shards = {s.name: state.done[s.name] for s in plan.shards}
                write_json_atomic(folder / MANIFEST_NAME, manifest(ident, plan, shards).to_json())
            except DiskFullError as e:
                raise DiskFullError(f"{e}; the merge needs {human_bytes(needed)} ({needed} bytes)") from e
            state.remove()
            publish(folder, dest)
    return _report(dest, plan)


def iter_merged(base: PathLike | None, adapter: PathLike, *, options: MergeOptions | None = None,
                rounding: str | None = None, key_map: dict[str, str] | None = None,
                allow_pickle: bool | None = None, block_bytes: int | None = None,
                dtype: str | None = None, max_shard_size: int | str | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every tensor of the merged checkpoint, in checkpoint order.

    Tensors are merged on the fly; only the tensor being yielded is held, so a converter (GGUF, ...)
    can consume a model larger than memory. The plan is checked before the first tensor is yielded.
    Options are those of `plan_merge`: with `dtype`, tensors come in that dtype; an FP8 base without it
    yields FP8 weights and their (new) block scales, as they would be written.

    Example:
        >>> for name, tensor in iter_merged("Qwen3-0.6B", "my-lora"):  # doctest: +SKIP
        ...     writer.add_tensor(name, tensor)
    """
    options = MergeOptions.of(options, rounding=rounding, key_map=key_map, allow_pickle=allow_pickle,
                              block_bytes=block_bytes, dtype=dtype, max_shard_size=max_shard_size)
    stack = ExitStack()  # holds a converted pickle until the iteration ends
    plan = stack.enter_context(_planned(base, adapter, options))
    return _iter_plan(plan, stack)  # planned now, so errors surface before the first tensor is asked for


def _import_compute_in_background() -> None:
    """Start importing torch and the compute code now, on a thread of its own: it takes 1.5-2 s, which
    the writer spends copying and hashing the tensors that come before the first computed one (a shard
    often starts with the embedding) instead of waiting. The first computed tensor waits for the import
    to finish (Python's import lock), and an import error surfaces there as it would without this."""
    def load() -> None:
        try:
            import qwen_merge.compute.stream  # noqa: F401
        except Exception:  # noqa: BLE001 - raised again, where the module is needed
            pass

    global _compute_import
    if _compute_import is None:
        # not a daemon: an interpreter that exits (an error right after the start) waits for the import to
        # end; torch aborts the process when it is torn down in the middle of being imported
        _compute_import = threading.Thread(target=load, name="qwen-merge-import")
        _compute_import.start()


_compute_import: threading.Thread | None = None  # started once per process


class LazyComputer:
    """`compute(op)` for the pieces functions: imports torch and the compute code when the first
    computed tensor is reached, so a plan that only copies bytes never loads them. With `threads`,
    torch runs on that many threads until the stack closes."""

    def __init__(self, plan: MergePlan, files: Files, ring: BlockRing, stack: ExitStack,
                 threads: int | None = None) -> None:
        self.plan, self.files, self.ring, self.stack, self.threads = plan, files, ring, stack, threads
        self._computer = None

    def __call__(self, op: TensorOp, only: set[int] | None = None) -> Iterator[Block]:
        return self._get().blocks(op, only)

    def batch(self, ops: tuple[TensorOp, ...]) -> Iterator[Block]:
        return self._get().batch(ops)

    def requant_error(self, op: TensorOp, index: int, q: memoryview, stored_scales: memoryview
                      ) -> tuple[int, int, float]:
        return self._get().requant_error(op, index, q, stored_scales)

    def _get(self):
        if self._computer is None:
            from .compute.arithmetic import compute_threads
            from .compute.stream import Computer

            if self.threads is not None:
                self.stack.enter_context(compute_threads(self.threads))
            self._computer = Computer(self.plan.adapter.file, self.files, self.ring)
            self.stack.callback(self._computer.close)
        return self._computer


@contextmanager
def without_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the duration. A plan of a 20,000-tensor checkpoint is
    a few hundred thousand small objects, none in a reference cycle; with the collector running, its full
    passes over them took twice as long as the planning itself (measured: 0.37-0.69 s instead of 0.18 s)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _planned(base: PathLike, adapter: PathLike, options: MergeOptions, merging: bool = False
             ) -> Iterator[MergePlan]:
    """The plan, with a pickled adapter converted to a temporary safetensors file for its lifetime. A
    `str` that is not an existing path but reads `org/name[@revision]` is a Hugging Face Hub repo.
    `merging`: the plan will be carried out, so work it will need starts while it is made: loading torch
    (longer than planning) when the adapter has LoRA factors, and hashing the adapter for the manifest.
    `base` None: the model the adapter's config names."""
    with without_gc(), tempfile.TemporaryDirectory(prefix="qwen-merge-adapter-") as scratch:
        checkpoint = _open_base(base) if base is not None else None
        adapter_folder, adapter_hub = _adapter_folder(adapter, options)
        weights = None
        if options.allow_pickle:
            from .inputs.pickled import unpickle_adapter  # torch.load: only when pickles are allowed

            weights = unpickle_adapter(adapter_folder, Path(scratch))
        parsed = dataclasses.replace(open_adapter(adapter_folder, weights=weights), hub=adapter_hub)
        checkpoint, notes = _base_and_notes(checkpoint, parsed)
        choice = _tokenizer(checkpoint, parsed, options)
        if merging:
            hash_in_background(parsed.file.path)
            if parsed.pairs or parsed.param_pairs:
                _import_compute_in_background()
        plan = make_plan(checkpoint, parsed, options, partial(same_values, parsed.file), tokenizer=choice)
        yield dataclasses.replace(plan, notes=notes)


def _open_base(base: PathLike) -> Checkpoint:
    if (ref := hub.repo_ref(base)) is None:
        return open_checkpoint(base)
    return hub.open_hub_checkpoint(hub.resolve(ref))


def _adapter_folder(adapter: PathLike, options: MergeOptions) -> tuple[Path, HubOrigin | None]:
    if (ref := hub.repo_ref(adapter)) is None:
        return Path(adapter), None
    origin = hub.resolve(ref)
    extra = TOKENIZER_FILES if wants_adapter_files(options.tokenizer) else ()
    return hub.fetch_adapter(origin, options.allow_pickle, extra), origin


def _base_and_notes(checkpoint: Checkpoint | None, adapter: Adapter) -> tuple[Checkpoint, tuple[str, ...]]:
    """BASE as given, with a note when the adapter's config names another model; or, BASE omitted, the
    model the config names, with a note saying so."""
    if checkpoint is not None:
        note = basemodel.base_note(adapter.config, checkpoint)
        return checkpoint, (note,) if note else ()
    path = adapter.root / ADAPTER_CONFIG
    name = basemodel.base_from_config(adapter.config, path)
    try:
        checkpoint = _open_base(name)
    except QwenMergeError as e:
        raise basemodel.named_by_adapter(e, path) from e
    return checkpoint, (f"BASE is {name}, the adapter's {basemodel.FIELD} ({ADAPTER_CONFIG})",)


def _tokenizer(base: Checkpoint, adapter: Adapter, options: MergeOptions) -> TokenizerChoice:
    """Which tokenizer files the output gets; a Hub base's are downloaded when they must be compared."""
    found = files_in(adapter.root) if wants_adapter_files(options.tokenizer) else ()
    if base.hub is not None and compares(options.tokenizer, found):
        for path in tokenizer_files(base.side_files):
            hub.fetch(base.hub, path.name)
    return choose(options.tokenizer, base.side_files, found)


def _tell(plan: MergePlan) -> None:
    """The plan's notes, and the tokenizer when it is not the base's, on stderr before the progress."""
    lines = [f"note: {note}" for note in plan.notes]
    if plan.tokenizer is not None and plan.tokenizer.source != "base":
        lines.append(f"tokenizer: {plan.tokenizer}")
    for line in lines:
        print(line, file=sys.stderr)


def fetch_side_files(plan: MergePlan) -> None:
    """A Hub base's config, tokenizer and other small files that the output takes, into the cache: the
    identity, the copy into the output and `verify` read them from disk."""
    if plan.base.hub is not None:
        for side in plan.side_files:
            if side in plan.base.side_files:
                hub.fetch(plan.base.hub, side.name)


def _inputs(base: PathLike, adapter: PathLike, plan: MergePlan) -> list[Path]:
    """The input locations the destination must stay out of (a Hub input's snapshot folder)."""
    return [plan.base.root if plan.base.hub or base is None else Path(base),
            plan.adapter.root if plan.adapter.hub else Path(adapter)]


def _iter_plan(plan: MergePlan, stack: ExitStack) -> Iterator[tuple[str, torch.Tensor]]:
    with stack:
        downloads = stack.enter_context(_downloads(plan, fetch_plan(plan)))
        files = stack.enter_context(Files(downloads.wait if downloads else None))  # closed after the computer
        compute = LazyComputer(plan, files, BlockRing(1), stack)
        for shard in plan.shards:
            for entry, pieces in shard_pieces(shard, files, compute):
                yield entry.name, _assemble(entry, pieces, shard.source.path)


def _assemble(entry: TensorEntry, pieces: Iterator[Piece], path: Path) -> torch.Tensor:
    from .compute.arithmetic import TORCH_DTYPES, as_tensor

    if entry.dtype not in TORCH_DTYPES:
        raise FormatError(f"{path}: tensor {entry.name!r} has dtype {entry.dtype}, which torch cannot hold")
    buffer = bytearray(entry.nbytes)
    view = memoryview(buffer)
    for piece in pieces:
        if isinstance(piece, Block):
            view[piece.offset:piece.offset + len(piece.data)] = piece.data
            piece.release()
        else:
            read_exact(piece.fd, buffer, piece.offset, path)
    return as_tensor(buffer, entry.dtype, entry.shape)


def _check_space(dest: Path, plan: MergePlan, fetch: FetchPlan | None, needed: int, state: ResumeState) -> None:
    """Free space for the output, and for the base shards a Hub merge downloads into the cache."""
    if fetch is None:
        return check_free_space(dest, needed)
    download = sum(plan.base.hub.sizes[n] for n in fetch.still_needed(state.done))
    held = min(fetch.low_disk_bytes, download) if plan.options.low_disk else download
    hint = ("" if plan.options.low_disk or fetch.low_disk_bytes >= download else
            f"; --low-disk (low_disk=True) deletes each downloaded shard once merged and needs only "
            f"{human_bytes(fetch.low_disk_bytes)} for downloads")
    check_free_space_for([(dest, needed, "the output"), (plan.base.root.parent.parent, held, "downloads")], hint)


@contextmanager
def _downloads(plan: MergePlan, fetch: FetchPlan | None, done: Collection[str] = (), progress: bool = False
               ) -> Iterator[hub.Downloads | None]:
    """The background download of a Hub base's shards that the output shards not `done` read (None for a
    local base), with its progress bar."""
    if fetch is None:
        yield None
        return
    order = fetch.still_needed(done)
    total = sum(plan.base.hub.sizes[n] for n in order)
    with progress_bar(total, "downloading", enabled=progress and total > 0, position=1) as bar:
        downloads = hub.Downloads(plan.base.hub, order, low_disk=plan.options.low_disk, on_bytes=bar.update)
        try:
            yield downloads
        finally:
            downloads.close()


def _write_folder(plan: MergePlan, fetch: FetchPlan | None, folder: Path, state: ResumeState, progress: bool
                  ) -> None:
    """Write the shards not yet done, then the side files and the index. Each shard is produced here
    (computed blocks on this thread) while the writer writes, hashes and finishes the ones before it."""
    bar = progress_bar(sum(s.size for s in plan.shards), "merging", enabled=progress)
    bar.update(sum(s.size for s in plan.shards if s.name in state.done))
    with bar, ExitStack() as stack:
        downloads = stack.enter_context(_downloads(plan, fetch, state.done, progress))
        files = stack.enter_context(Files(downloads.wait if downloads else None))
        ring = BlockRing(RING_SIZE)
        compute = LazyComputer(plan, files, ring, stack, threads=1)
        low_disk = downloads is not None and plan.options.low_disk
        on_done = _releaser(plan, fetch, files, downloads) if low_disk else lambda name: None
        writer = stack.enter_context(ShardWriter(folder, state, files, bar.update, on_done))
        for shard in plan.shards:
            if shard.name not in state.done:
                writer.write(shard.name, shard.header, shard_runs(shard, files, compute, compute.batch))
        writer.close()
    for side in plan.side_files:
        if side.name == MODEL_CONFIG and plan.config is not None:
            write_json(folder / side.name, plan.config)
        else:
            copy_side_file(side, folder)
    if plan.index_name:
        write_bytes(folder / plan.index_name, plan.index_json)


def _releaser(plan: MergePlan, fetch: FetchPlan, files: Files, downloads: hub.Downloads):
    """`on_done(output shard)` for --low-disk: the base shards no later output shard reads are closed
    and deleted from the cache (those this run downloaded)."""
    index = {s.name: k for k, s in enumerate(plan.shards)}
    last_use = fetch.last_use()

    def on_done(name: str) -> None:
        for base_name, last in last_use.items():
            if last == index[name]:
                files.retire(plan.base.hub.folder / base_name)  # the path the shard's TensorFile has
                downloads.release(base_name)
    return on_done


def _report(dest: Path, plan: MergePlan, already_complete: bool = False) -> MergeReport:
    files = tuple(sorted(p.name for p in dest.iterdir()))
    written = sum(p.stat().st_size for p in dest.iterdir())
    return MergeReport(dest, len(plan.merges), plan.copied, written, files, plan, already_complete)
