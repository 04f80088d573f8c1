"""The public entry points: plan a merge, run it into a folder, or stream the merged tensors.

All three read the same plan; `merge_shards` and `iter_merged` consume the same piece stream
(`stream.shard_pieces`), so a tensor written to disk and a tensor handed to an embedding tool are
computed by the same code.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import open_adapter
from .checkpoint import MANIFEST_NAME, open_checkpoint
from .compute import TORCH_DTYPES, as_tensor, compute_threads
from .errors import DiskFullError, FormatError
from .manifest import (STATE_NAME, base_file_stats, check_not_merged_twice, finished_merge, identity, load_state,
                       manifest, write_json_atomic)
from .output import (check_destination, check_free_space, copy_side_file, finish_file, publish, staging_folder,
                     write_json, write_shard)
from .pickled import unpickle_adapter
from .plan import DEFAULT_BLOCK_BYTES, MergePlan, make_plan
from .progress import progress_bar
from .stream import MergedBlock, Piece, new_workspace, open_files, read_exact, shard_pieces
from .tensorfile import TensorEntry
from .units import human_bytes

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


def plan_merge(base: PathLike, adapter: PathLike, *, rounding: str = "single",
               key_map: dict[str, str] | None = None, allow_pickle: bool = False,
               block_bytes: int = DEFAULT_BLOCK_BYTES) -> MergePlan:
    """Check that `adapter` fits `base` and describe the merge, reading only headers and JSON.

    Args:
        base: a model folder (`model.safetensors`, or an index plus shards) or one `.safetensors` file.
        adapter: a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`).
        rounding: "single" (fp32 accumulation, one rounding) or "peft" (PEFT's double rounding where
            PEFT rounds twice: embedding LoRA, target_parameters experts), for byte-identical PEFT output.
        key_map: prefix renames from adapter (in-model) names to base (on-disk) names, e.g.
            {"model.language_model.": "model."}; the common VLM renames are detected without it.
        allow_pickle: read a pickled `adapter_model.bin` with `torch.load(weights_only=True)`.
        block_bytes: fp32 bytes of a row block; bounds the working memory of each tensor.

    Returns:
        The `MergePlan`; `plan.render()` is the human-readable report `qwen-merge plan` prints.

    Raises:
        FormatError, AdapterError, MismatchError: the inputs cannot be merged; nothing was written.

    Example:
        >>> plan = plan_merge("Qwen3-0.6B", "my-lora")          # doctest: +SKIP
        >>> print(len(plan.merges), "merged,", plan.copied, "copied")  # doctest: +SKIP
        196 merged, 115 copied
    """
    with _planned(base, adapter, rounding, key_map, allow_pickle, block_bytes) as plan:
        return plan


def merge_shards(base: PathLike, adapter: PathLike, output: PathLike, *, overwrite: bool = False,
                 progress: bool = True, resume: bool = False, force: bool = False, rounding: str = "single",
                 key_map: dict[str, str] | None = None, allow_pickle: bool = False, allow_nonfinite: bool = False,
                 block_bytes: int = DEFAULT_BLOCK_BYTES) -> MergeReport:
    """Merge a LoRA adapter into a safetensors checkpoint, streaming shard by shard into `output`.

    The output has the base's shard names and tensor-to-shard assignment, an index (when the base has
    one) and the base's side files (config, tokenizer, ...). It is built in a temporary folder beside
    `output` and moved into place only when complete; on any error nothing appears at `output`.

    Args:
        base: a model folder or one `.safetensors` file.
        adapter: a PEFT LoRA folder.
        output: the folder to create. It must not be, contain or lie inside an input.
        overwrite: replace `output` if it is a non-empty folder.
        progress: show progress by bytes on stderr: a bar on a terminal, a plain line every 10% or 10 s
            otherwise (`progress.progress_bar`).
        resume: continue an interrupted merge into `output` from its completed shards (refused if the
            inputs or options changed); without one, start afresh. If `output` already holds this merge,
            finished (its manifest matches), nothing is written and `already_complete` is set in the report.
        force: merge even when the base's manifest shows this adapter was already merged into it.
        rounding, key_map, allow_pickle, allow_nonfinite, block_bytes: as for `plan_merge`.

    The output folder also holds `qwen_merge.json`: tool version, input identity (file sizes, the
    adapter's SHA-256), options, counts and each shard's SHA-256 — nothing that varies between runs.

    Raises:
        FormatError, AdapterError, MismatchError: the inputs cannot be merged (found before writing).
        OutputError: the destination is unsafe, or writing failed.

    Example:
        >>> report = merge_shards("Qwen3-0.6B", "my-lora", "Qwen3-0.6B-merged")  # doctest: +SKIP
        >>> report.merged, report.copied                                          # doctest: +SKIP
        (196, 115)
    """
    dest = Path(output)
    options = {"rounding": rounding, "key_map": key_map or {}, "allow_nonfinite": allow_nonfinite,
               "block_bytes": block_bytes}
    with _planned(base, adapter, rounding, key_map, allow_pickle, block_bytes, allow_nonfinite) as plan:
        check_destination(dest, _inputs(base, adapter), overwrite=overwrite, resume=resume)
        ident = identity(plan, options)
        if resume and not overwrite and finished_merge(dest, ident):  # nothing to resume: write nothing
            return _report(dest, plan, already_complete=True)
        check_not_merged_twice(ident, plan.base.root, force)
        state = {**ident, "base_files": base_file_stats(plan)}  # resume also notices a rewritten base file
        with staging_folder(dest, resume=resume) as (folder, fresh):
            done = {} if fresh else load_state(folder, state)
            needed = plan.output_bytes - sum(d["size"] for d in done.values())
            try:
                write_json_atomic(folder / STATE_NAME, {"identity": state, "done": done})
                check_free_space(dest, needed)
                shards = _write_folder(plan, folder, progress, state, done)
                write_json_atomic(folder / MANIFEST_NAME, manifest(ident, plan, shards))
            except DiskFullError as e:
                raise DiskFullError(f"{e}; the merge needs {human_bytes(needed)} ({needed} bytes)") from None
            (folder / STATE_NAME).unlink()
            publish(folder, dest)
    return _report(dest, plan)


def iter_merged(base: PathLike, adapter: PathLike, *, rounding: str = "single",
                key_map: dict[str, str] | None = None, allow_pickle: bool = False,
                block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every tensor of the merged checkpoint, in checkpoint order.

    Tensors are merged on the fly; only the tensor being yielded is held, so a converter (GGUF, ...)
    can consume a model larger than memory. The plan is checked before the first tensor is yielded.
    Options are those of `plan_merge`.

    Example:
        >>> for name, tensor in iter_merged("Qwen3-0.6B", "my-lora"):  # doctest: +SKIP
        ...     writer.add_tensor(name, tensor)
    """
    stack = ExitStack()  # holds a converted pickle until the iteration ends
    plan = stack.enter_context(_planned(base, adapter, rounding, key_map, allow_pickle, block_bytes))
    return _iter_plan(plan, stack)  # planned now, so errors surface before the first tensor is asked for


@contextmanager
def _planned(base: PathLike, adapter: PathLike, rounding: str, key_map: dict[str, str] | None,
             allow_pickle: bool, block_bytes: int, allow_nonfinite: bool = False) -> Iterator[MergePlan]:
    """The plan, with a pickled adapter converted to a temporary safetensors file for its lifetime."""
    with tempfile.TemporaryDirectory(prefix="qwen-merge-adapter-") as scratch:
        weights = unpickle_adapter(Path(adapter), Path(scratch)) if allow_pickle else None
        checkpoint, parsed = open_checkpoint(base), open_adapter(adapter, weights=weights)
        yield make_plan(checkpoint, parsed, block_bytes=block_bytes, rounding=rounding, key_map=key_map,
                        allow_nonfinite=allow_nonfinite)


def _iter_plan(plan: MergePlan, stack: ExitStack) -> Iterator[tuple[str, torch.Tensor]]:
    workspace = new_workspace()
    with stack, open_files(plan.adapter.file) as files:
        for shard in plan.shards:
            for entry, pieces in shard_pieces(shard, files, workspace):
                yield entry.name, _assemble(entry, pieces, shard.source.path)


def _assemble(entry: TensorEntry, pieces: Iterator[Piece], path: Path) -> torch.Tensor:
    if entry.dtype not in TORCH_DTYPES:
        raise FormatError(f"{path}: tensor {entry.name!r} has dtype {entry.dtype}, which torch cannot hold")
    buffer = bytearray(entry.nbytes)
    as_bytes = as_tensor(buffer, "U8", (entry.nbytes,))
    for piece in pieces:
        if isinstance(piece, MergedBlock):
            data = piece.rows.contiguous().view(torch.uint8).reshape(-1)
            as_bytes[piece.offset:piece.offset + data.numel()].copy_(data)
        else:
            read_exact(piece.fd, buffer, piece.offset, path)
    return as_tensor(buffer, entry.dtype, entry.shape)


def _write_folder(plan: MergePlan, folder: Path, progress: bool, ident: dict, done: dict[str, dict]
                  ) -> dict[str, dict]:
    """Write the shards not in `done`, then the side files and the index; return every shard's size and
    SHA-256. A shard is written as `<name>.part`, then synced, hashed and renamed on a background thread
    while the next one is merged; each completion is recorded in the state file `resume` reads."""
    bar = progress_bar(sum(s.size for s in plan.shards), "merging", enabled=progress)
    done, workspace = dict(done), new_workspace()
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-merge-finish") as finisher, \
            compute_threads(1), open_files(plan.adapter.file) as files:
        pending: list[tuple[str, Future]] = []
        for shard in plan.shards:
            if shard.name in done:
                bar.update(shard.size)
                continue
            part = folder / f"{shard.name}.part"
            part.unlink(missing_ok=True)  # a half-written shard of an interrupted run
            pieces = (p for _, ps in shard_pieces(shard, files, workspace) for p in ps)
            bar.update(len(shard.header))
            write_shard(part, shard.header, pieces, bar.update)
            pending.append((shard.name, finisher.submit(finish_file, part, folder / shard.name)))
            _record(folder, ident, done, pending, wait_all=False)
        _record(folder, ident, done, pending, wait_all=True)
    for side in plan.base.side_files:
        if side.name == "config.json" and plan.config is not None:
            write_json(folder / side.name, plan.config)
        else:
            copy_side_file(side, folder)
    if plan.base.index_name:
        write_json(folder / plan.base.index_name, plan.index_document())
    return {s.name: done[s.name] for s in plan.shards}


def _record(folder: Path, ident: dict, done: dict[str, dict], pending: list[tuple[str, Future]],
            wait_all: bool) -> None:
    """Move finished shards from `pending` to `done` and persist the state (all of them if `wait_all`)."""
    changed = False
    while pending and (wait_all or pending[0][1].done()):
        name, future = pending.pop(0)
        done[name] = future.result()
        changed = True
    if changed:
        write_json_atomic(folder / STATE_NAME, {"identity": ident, "done": done})


def _report(dest: Path, plan: MergePlan, already_complete: bool = False) -> MergeReport:
    files = tuple(sorted(p.name for p in dest.iterdir()))
    written = sum(p.stat().st_size for p in dest.iterdir())
    return MergeReport(dest, len(plan.merges), plan.copied, written, files, plan, already_complete)


def _inputs(base: PathLike, adapter: PathLike) -> list[Path]:
    base_path = Path(base)
    return [base_path, Path(adapter)]
