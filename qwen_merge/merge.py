"""The public entry points: plan a merge, run it into a folder, or stream the merged tensors.

Each is one run (`run.open_run`) and, for the last two, one sink: `merge_shards` hands the run's shards to a
`FolderSink`, `iter_merged` to a `TensorSink`. Both sinks take the same `ShardStream`s, so a tensor written
to disk and a tensor handed to an embedding tool are computed by the same code. torch is imported only when
a tensor has to be computed: planning, and merges that only copy bytes, run without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import OptionError
from .ggufmerge import is_gguf, merge_into_gguf
from .options import MergeOptions
from .planning.manifest import base_file_stats, check_not_merged_twice, check_plan_not_merged_twice
from .planning.plan import MergePlan
from .run import Run, adapter_spec, local_inputs, open_run, tell, without_gc
from .sinks.folder import FolderSink, finished_merge
from .sinks.output import check_destination
from .sinks.tensors import TensorSink

if TYPE_CHECKING:  # torch is imported lazily, where tensors are made
    import torch

PathLike = str | os.PathLike
Adapters = PathLike | Sequence[PathLike]  # one adapter, or several merged as a weighted sum (`weights`)


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


def plan_merge(base: PathLike | None, adapter: Adapters, *, weights: Sequence[float] | None = None,
               force: bool = False,
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
            id holding one; or a list of them, merged in one pass as W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ (task arithmetic:
            what PEFT's `add_weighted_adapter(..., combination_type="cat")` and a merge compute, rounded
            once). With several adapters and `base` None, BASE is the model the first adapter names.
        weights: one number per adapter (default 1.0 each; negative subtracts a task). A single adapter
            with weight 1 is merged exactly as without a list.
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
    with open_run(base, adapter_spec(adapter, weights), options) as run:
        check_plan_not_merged_twice(run.plan, force)
        return run.plan


def merge_shards(base: PathLike | None, adapter: Adapters, output: PathLike, *,
                 weights: Sequence[float] | None = None, overwrite: bool = False,
                 progress: bool = True, resume: bool = False, force: bool = False,
                 options: MergeOptions | None = None, rounding: str | None = None,
                 key_map: dict[str, str] | None = None, allow_pickle: bool | None = None,
                 allow_nonfinite: bool | None = None, block_bytes: int | None = None,
                 dtype: str | None = None, max_shard_size: int | str | None = None,
                 low_disk: bool | None = None, tokenizer: str | os.PathLike | None = None,
                 outtype: str | None = None) -> MergeReport:
    """Merge a LoRA adapter into a safetensors checkpoint, streaming shard by shard into `output`.

    The output has the base's shard names and tensor-to-shard assignment (or `max_shard_size` shards),
    an index (when the base has one, or when re-sharded into several files) and the base's side files
    (config, tokenizer, ...; the adapter's tokenizer instead of the base's, see `tokenizer`). It is built
    in a temporary folder beside `output` and moved into place only when complete; on any error nothing
    appears at `output`.

    Args:
        base: a model folder, one `.safetensors` file, or a Hub repo id; None: the model the adapter's
            config names (as for `plan_merge`).
        adapter: a PEFT LoRA folder, or a Hub repo id; or a list of them with `weights` (as for `plan_merge`).
        weights: one number per adapter (as for `plan_merge`).
        output: the folder to create. It must not be, contain or lie inside an input. A path ending in
            `.gguf` writes one GGUF file instead, as llama.cpp's `convert_hf_to_gguf.py` would write it
            from the merged folder (Qwen2, Qwen2-MoE, Qwen3 and Qwen3-MoE; needs `qwen-merge[gguf]`).
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
        outtype: for a GGUF output, the type of its weight tensors: "bf16", "f16", "f32" or "q8_0";
            None or "auto": bf16 for a bf16 model, else f16 (as llama.cpp's converter decides). Norms,
            biases and MoE routers stay f32; a Q8_0 tensor whose rows are not a multiple of 32 values is f16.

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
    adapter = adapter_spec(adapter, weights)
    options = MergeOptions.of(options, rounding=rounding, key_map=key_map, allow_pickle=allow_pickle,
                              allow_nonfinite=allow_nonfinite, block_bytes=block_bytes,
                              dtype=dtype, max_shard_size=max_shard_size, low_disk=low_disk,
                              tokenizer=tokenizer)
    if is_gguf(dest):
        run = merge_into_gguf(base, adapter, dest, options, outtype=outtype, overwrite=overwrite, resume=resume,
                              progress=progress, force=force)
        return MergeReport(dest, len(run.plan.merges), run.plan.copied, dest.stat().st_size, (dest.name,), run.plan)
    if outtype is not None:
        raise OptionError(f"applies to a GGUF output (a path ending in .gguf), got the folder {dest}", option="outtype")
    check_destination(dest, local_inputs(base, adapter, options), overwrite=overwrite, resume=resume)  # before torch
    # the collector stays paused for the whole merge, as for planning (see run.without_gc): no caller code
    # runs inside it, and a merge of thousands of tensors makes as many small objects as its plan
    with without_gc(), open_run(base, adapter, options, merging=True) as run:
        plan = run.plan
        run.check_destination(dest, base, adapter, overwrite=overwrite, resume=resume)
        ident = run.ready_to_write()
        if resume and not overwrite and finished_merge(dest, ident):  # nothing to resume: write nothing
            return _report(dest, plan, already_complete=True)
        check_not_merged_twice(ident, plan.base.root, force)
        if progress:
            tell(plan)
        with FolderSink(dest, plan, ident, base_file_stats(plan), resume=resume, progress=progress) as sink:
            run.write_into(sink, dest, sink.remaining_bytes, progress=progress, what="merge")
    return _report(dest, plan)


def iter_merged(base: PathLike | None, adapter: Adapters, *, weights: Sequence[float] | None = None,
                options: MergeOptions | None = None,
                rounding: str | None = None, key_map: dict[str, str] | None = None,
                allow_pickle: bool | None = None, block_bytes: int | None = None,
                dtype: str | None = None, max_shard_size: int | str | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every tensor of the merged checkpoint, in checkpoint order.

    Tensors are merged on the fly; only the tensor being yielded is held, so a converter (GGUF, ...)
    can consume a model larger than memory. The plan is checked before the first tensor is yielded.
    `adapter`, `weights` and the options are those of `plan_merge`: with `dtype`, tensors come in that dtype;
    an FP8 base without it yields FP8 weights and their (new) block scales, as they would be written.

    Example:
        >>> for name, tensor in iter_merged("Qwen3-0.6B", "my-lora"):  # doctest: +SKIP
        ...     writer.add_tensor(name, tensor)
    """
    options = MergeOptions.of(options, rounding=rounding, key_map=key_map, allow_pickle=allow_pickle,
                              block_bytes=block_bytes, dtype=dtype, max_shard_size=max_shard_size)
    stack = ExitStack()  # holds the run (a converted pickle, say) until the iteration ends
    run = stack.enter_context(open_run(base, adapter_spec(adapter, weights), options))
    return _iterate(run, stack)  # planned now, so errors surface before the first tensor is asked for


def _iterate(run: Run, stack: ExitStack) -> Iterator[tuple[str, torch.Tensor]]:
    with stack:
        sink = TensorSink()
        producer = stack.enter_context(run.producing(ring_size=sink.ring_size))
        yield from sink.consume(producer.streams())


def _report(dest: Path, plan: MergePlan, already_complete: bool = False) -> MergeReport:
    files = tuple(sorted(p.name for p in dest.iterdir()))
    written = sum(p.stat().st_size for p in dest.iterdir())
    return MergeReport(dest, len(plan.merges), plan.copied, written, files, plan, already_complete)
