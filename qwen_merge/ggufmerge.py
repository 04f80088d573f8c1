"""A merge straight into a GGUF file (`merge_shards(..., "out.gguf")`, `qwen-merge merge BASE ADAPTER out.gguf`):
the same run as a merge into a folder, with the GGUF sink at its end.

The `gguf` package (llama.cpp's, an optional extra: `pip install "qwen-merge[gguf]"`) is needed only here;
without it the merge stops before reading anything, with the line that says how to install it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .errors import OptionError
from .options import MergeOptions
from .planning.gguflayout import GGUFLayout, check_outtype, gguf_layout
from .planning.manifest import base_file_stats, check_not_merged_twice
from .planning.plan import MergePlan
from .run import Run, local_inputs, open_run, tell, without_gc
from .sinks.gguf import GGUFSink
from .sinks.output import check_file_destination
from .sinks.resume import ResumeRecord

PathLike = str | os.PathLike
GGUF_SUFFIX = ".gguf"
GGUF_MINIMUM = (0, 19)  # the oldest gguf package whose writer, name maps and Q8_0 this output was checked against


def is_gguf(output: PathLike | None) -> bool:
    """Whether `output` names a GGUF file (it ends in .gguf) rather than a folder."""
    return output is not None and os.fspath(output).lower().endswith(GGUF_SUFFIX)


def require_gguf() -> None:
    """The `gguf` package, importable and recent enough, or one line saying how to install it."""
    try:
        import gguf
        from gguf import GGUFWriter, quants  # noqa: F401 - the parts this output uses
    except ImportError as e:
        raise OptionError(f"writing a GGUF file needs llama.cpp's gguf package ({e}); install it with: "
                          f"pip install \"qwen-merge[gguf]\"", option="output") from e
    version = getattr(gguf, "__version__", None) or _installed_version()
    if version is not None and _numbers(version) < GGUF_MINIMUM:
        raise OptionError(f"writing a GGUF file needs gguf {'.'.join(map(str, GGUF_MINIMUM))} or newer, found "
                          f"{version}; upgrade it with: pip install -U \"qwen-merge[gguf]\"", option="output")


def plan_gguf(plan: MergePlan, outtype: str | None) -> GGUFLayout:
    """The GGUF file `plan`'s merge writes (for `qwen-merge plan BASE ADAPTER out.gguf`)."""
    require_gguf()
    return gguf_layout(plan, outtype)


def merge_into_gguf(base: PathLike | None, adapter: PathLike, dest: Path, options: MergeOptions, *,
                    outtype: str | None, overwrite: bool, resume: bool, progress: bool, force: bool) -> Run:
    """The merge of `adapter` into `base` written as the GGUF file `dest`; returns the finished run."""
    check_outtype(outtype)
    require_gguf()
    check_file_destination(dest, local_inputs(base, adapter, options), overwrite=overwrite)
    with without_gc(), open_run(base, adapter, options, merging=True) as run:
        plan = run.plan
        layout = gguf_layout(plan, outtype)
        check_file_destination(dest, run.input_locations(base, adapter), overwrite=overwrite)  # where they are now
        ident = run.ready_to_write()
        check_not_merged_twice(ident, plan.base.root, force)
        fields = metadata(plan, layout)
        if progress:
            tell(plan)
        # the outtype decides the bytes as the options do: a resumed run must have the same one
        record = ResumeRecord(dataclasses.replace(ident, options={**(ident.options or {}), "outtype": layout.outtype}),
                              base_file_stats(plan), {})
        with GGUFSink(dest, layout, fields, record, resume=resume, progress=progress,
                      allow_nonfinite=options.allow_nonfinite) as sink:
            run.write_into(sink, dest, sink.remaining_bytes, progress=progress, what="merge")
    return run


def metadata(plan: MergePlan, layout: GGUFLayout):
    """The file's metadata: architecture, tokenizer and the rest, as llama.cpp's converter writes them."""
    from .planning.ggufmeta import gguf_metadata

    config = plan.config or plan.base.config or {}
    return gguf_metadata(layout.arch, config, plan.side_files, name=_model_name(plan), size_label=size_label(layout),
                         file_type=layout.file_type)


def size_label(layout: GGUFLayout) -> str:
    """general.size_label as the converter makes it ("8.2B", "128x3.3B"), from the tensors' shapes."""
    import math

    import gguf

    total = shared = experts = expert_sum = stacks = 0
    for t in layout.tensors:
        size = math.prod(t.shape)
        total += size
        if "_exps." in t.name and len(t.shape) >= 3:
            count = t.shape[-3] if ".bias" not in t.name else t.shape[-2]
            experts, expert_sum, stacks = experts + size // count, expert_sum + count, stacks + 1
        else:
            shared += size
    return gguf.size_label(total, shared, experts, expert_sum // stacks if stacks else 0)


def _model_name(plan: MergePlan) -> str:
    origin = plan.base.hub
    return origin.repo_id.split("/")[-1] if origin is not None else Path(plan.base.root).name


def _installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return None


def _numbers(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
