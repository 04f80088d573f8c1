"""A run: the inputs opened, the plan made, and the machinery that turns the plan's shards into bytes for a
sink — a Hub base's downloads, the input files, the computer (torch, imported when first needed) and, with
`--low-disk`, the release of base shards no later output shard reads. `merge_shards`, `iter_merged` and
`verify_merge` are each one run.

What a run starts, it ends: the adapter's hash started while planning (`Hashes`), the background import of
torch (joined when the run closes), the temporary file of a converted pickle, and the pause of Python's
garbage collector, which covers planning only.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import sys
import tempfile
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

from .compute.pieces import Block, BlockRing
from .errors import DiskFullError, OptionError, QwenMergeError
from .files import ADAPTER_CONFIG
from .inputs import basemodel, hub
from .inputs.adapter import Adapter, open_adapter
from .inputs.bnb4 import read_quant_states
from .inputs.checkpoint import Checkpoint, HubOrigin, open_checkpoint
from .inputs.digest import Hashes
from .inputs.sources import Files, same_bytes, same_values
from .inputs.tensorfile import TensorEntry
from .options import TOKENIZER_CHOICES, MergeOptions
from .planning.fetchplan import FetchPlan, fetch_plan
from .planning.manifest import MergeIdentity, identity
from .planning.plan import MergePlan, TensorOp, make_plan
from .planning.recipe import refuse_uncombinable
from .planning.tokenizer import (TOKENIZER_FILES, TokenizerChoice, choose, choose_among, compares, files_in,
                                 tokenizer_files, wants_adapter_files)
from .progress import progress_bar
from .sinks.base import Result, ShardStream, Sink
from .sinks.output import check_destination, check_free_space, check_free_space_for
from .units import human_bytes

PathLike = str | os.PathLike


@dataclass(frozen=True, slots=True)
class WeightedAdapters:
    """Several adapters (or one with a weight other than 1), merged as one weighted sum of their deltas,
    W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ: what `adapter_spec` makes of a list of adapters and their weights."""

    paths: tuple[PathLike, ...]
    weights: tuple[float, ...]


AdapterSpec = PathLike | WeightedAdapters


def adapter_spec(adapter: PathLike | Sequence[PathLike], weights: Sequence[float] | None = None) -> AdapterSpec:
    """The adapter argument of the public functions as a run takes it: one adapter (a path or repo id) merged
    as it is, or `WeightedAdapters` for a list of several, or for any adapter given a weight other than 1.

    Raises:
        OptionError: no adapter, a weight count other than the adapter count, or a weight that is not a
            finite number.
    """
    paths = (adapter,) if isinstance(adapter, str | os.PathLike) else tuple(adapter)
    if not paths:
        raise OptionError("no adapter given; expected one adapter or a list of them", option="adapter")
    if weights is None:
        weights = (1.0,) * len(paths)
    elif isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
        raise OptionError(f"expected a list of numbers, one per adapter, found {weights!r}", option="weights")
    if len(weights) != len(paths):
        raise OptionError(f"{len(weights)} weights for {len(paths)} adapters; give one weight per adapter, in "
                          f"the adapters' order", option="weights")
    bad = next((w for w in weights if type(w) not in (int, float) or not math.isfinite(w)), None)
    if bad is not None or any(type(w) is bool for w in weights):
        raise OptionError(f"weight {bad!r} is not a finite number", option="weights")
    weights = tuple(float(w) for w in weights)
    if len(paths) == 1 and weights == (1.0,):
        return paths[0]
    return WeightedAdapters(paths, weights)


def adapter_paths(adapter: AdapterSpec | Sequence[PathLike]) -> tuple[PathLike, ...]:
    """The adapters' paths or repo ids, in order."""
    if isinstance(adapter, WeightedAdapters):
        return adapter.paths
    return (adapter,) if isinstance(adapter, str | os.PathLike) else tuple(adapter)


class Run:
    """One plan being carried out: `plan`, the run-scoped work started while it was made, and `producing`,
    which opens what turning its shards into bytes needs. Made by `open_run`, which closes it."""

    def __init__(self, plan: MergePlan, hashes: Hashes, compute_import: _ComputeImport) -> None:
        self.plan, self._hashes, self._compute_import = plan, hashes, compute_import

    def identity(self) -> dict:
        """The merge's identity (`planning.manifest.identity`), with the adapter hash started while planning."""
        return identity(self.plan, self._hashes.sha256)

    @cached_property
    def fetch(self) -> FetchPlan | None:
        """Which base shards a Hub base's merge downloads, in what order; None for a local base."""
        return fetch_plan(self.plan)

    def fetch_side_files(self) -> None:
        """A Hub base's config, tokenizer and other small files that the output takes, into the cache: the
        identity, the copy into the output and `verify` read them from disk."""
        plan = self.plan
        if plan.base.hub is not None:
            for side in plan.side_files:
                if side in plan.base.side_files:
                    hub.fetch(plan.base.hub, side.name)

    def start_compute_import(self) -> None:
        """Import torch now, beside the first copies, when the plan computes anything."""
        if any(not op.is_raw_copy for op in self.plan.ops):
            self._compute_import.start()

    def ready_to_write(self) -> MergeIdentity:
        """What a run that writes an output does once planned: a Hub base's side files fetched, torch's
        import started when the plan computes, and the merge's identity (the adapter hash it waits for)."""
        self.fetch_side_files()
        self.start_compute_import()
        return self.identity()

    def check_destination(self, dest: Path, base: PathLike | None, adapter: AdapterSpec, *, overwrite: bool,
                          resume: bool) -> None:
        """`dest` checked against the inputs again, now that the plan knows where they are when the caller's
        paths did not say: a Hub input's snapshot folder, or BASE taken from the adapter's config."""
        plan = self.plan
        if base is None or plan.base.hub is not None or any(a.hub is not None for a in _adapters(plan)):
            check_destination(dest, self.input_locations(base, adapter), overwrite=overwrite, resume=resume)

    def input_locations(self, base: PathLike | None, adapter: AdapterSpec) -> list[Path]:
        """The input locations a destination must stay out of, a Hub input's snapshot folder and BASE taken
        from the adapter's config included."""
        plan = self.plan
        return [plan.base.root if plan.base.hub or base is None else Path(base),
                *(one.root if one.hub else Path(given) for one, given in zip(_adapters(plan), adapter_paths(adapter)))]

    def write_into(self, sink: Sink[Result], dest: Path, needed: int, *, progress: bool, what: str) -> Result:
        """The shards `sink` lacks, computed on one thread and handed to it, after a check that `dest`'s
        filesystem has room for `needed` bytes (and the cache for a Hub base's downloads); a full disk says
        how much the `what` ("merge", "push") needs."""
        try:
            self.check_space(dest, needed, sink.done())
            with self.producing(sink.done(), ring_size=sink.ring_size, threads=1, progress=progress) as producer:
                return sink.consume(producer.streams())
        except DiskFullError as e:
            raise DiskFullError(f"{e}; the {what} needs {human_bytes(needed)} ({needed} bytes) of disk") from e

    def check_space(self, dest: Path, needed: int, done: Collection[str]) -> None:
        """Free space for `needed` output bytes at `dest`, and for the base shards a Hub merge downloads
        into the cache (those the shards not `done` read)."""
        plan, fetch = self.plan, self.fetch
        if fetch is None:
            return check_free_space(dest, needed)
        download = sum(plan.base.hub.sizes[n] for n in fetch.still_needed(done))
        held = min(fetch.low_disk_bytes, download) if plan.options.low_disk else download
        hint = ("" if plan.options.low_disk or fetch.low_disk_bytes >= download else
                f"; --low-disk (low_disk=True) deletes each downloaded shard once merged and needs only "
                f"{human_bytes(fetch.low_disk_bytes)} for downloads")
        check_free_space_for([(dest, needed, "the output"), (plan.base.root.parent.parent, held, "downloads")], hint)

    @contextmanager
    def producing(self, done: Collection[str] = (), *, ring_size: int = 1, threads: int | None = None,
                  progress: bool = False) -> Iterator[Producer]:
        """The downloads (a Hub base's shards that the output shards not `done` read, with their progress
        bar), the input files and the computer, open until the block ends. `ring_size`: computed blocks
        alive at once (a sink that holds blocks while the next are computed needs several); `threads`: torch's
        threads while computing (None: as configured)."""
        with ExitStack() as stack:
            downloads = stack.enter_context(self._downloads(done, progress))
            files = stack.enter_context(Files(downloads.wait if downloads else None))  # closed after the computer
            compute = LazyComputer(self.plan, files, BlockRing(ring_size), stack, threads)
            yield Producer(self, files, compute, downloads, frozenset(done))

    @contextmanager
    def _downloads(self, done: Collection[str], progress: bool) -> Iterator[hub.Downloads | None]:
        plan, fetch = self.plan, self.fetch
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


class Producer:
    """A run's shards as `ShardStream`s for a sink, and what makes them: `files` (the open inputs) and
    `compute` (the computer), which `verify` also uses directly."""

    def __init__(self, run: Run, files: Files, compute: LazyComputer, downloads: hub.Downloads | None,
                 done: frozenset[str]) -> None:
        self.run, self.files, self.compute, self.done = run, files, compute, done
        low_disk = downloads is not None and run.plan.options.low_disk
        self._release = _releaser(run.plan, run.fetch, files, downloads) if low_disk else None

    def streams(self) -> Iterator[ShardStream]:
        """The output shards not `done`, in the plan's order."""
        for shard in self.run.plan.shards:
            if shard.name not in self.done:
                finished = partial(self._release, shard.name) if self._release else _nothing
                yield ShardStream(shard, self.files, self.compute, finished)


def _nothing() -> None:
    pass


def _releaser(plan: MergePlan, fetch: FetchPlan, files: Files, downloads: hub.Downloads):
    """`release(output shard)` for --low-disk: the base shards no later output shard reads are closed
    and deleted from the cache (those this run downloaded)."""
    index = {s.name: k for k, s in enumerate(plan.shards)}
    last_use = fetch.last_use()

    def release(name: str) -> None:
        for base_name, last in last_use.items():
            if last == index[name]:
                files.retire(plan.base.hub.folder / base_name)  # the path the shard's TensorFile has
                downloads.release(base_name)
    return release


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
            self._computer = Computer(self.plan.adapter.file, self.files, self.ring,
                                      others=tuple(a.file for a in self.plan.adapters[1:]))
            self.stack.callback(self._computer.close)
        return self._computer


class _ComputeImport:
    """Importing torch and the compute code on a thread of its own: it takes 1.5-2 s, which the writer
    spends copying and hashing the tensors that come before the first computed one (a shard often starts
    with the embedding) instead of waiting. The first computed tensor waits for the import to finish
    (Python's import lock), and an import error surfaces there as it would without this. The run joins the
    thread when it closes: torch aborts the process when the interpreter is torn down in the middle of
    importing it, so an error right after the start must not exit under it."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import sys

        if self._thread is None and "qwen_merge.compute.stream" not in sys.modules:
            self._thread = threading.Thread(target=_import_compute, name="qwen-merge-import")
            self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


def _import_compute() -> None:
    try:
        import qwen_merge.compute.stream  # noqa: F401
    except Exception:  # noqa: BLE001 - raised again, where the module is needed
        pass


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
def open_run(base: PathLike | None, adapter: AdapterSpec, options: MergeOptions, *, merging: bool = False
             ) -> Iterator[Run]:
    """The run of a plan of `adapter` (one, or `WeightedAdapters`) onto `base`, with a pickled adapter
    converted to a temporary safetensors file for its lifetime. A `str` that is not an existing path but reads
    `org/name[@revision]` is a Hugging Face Hub repo; `base` None: the model the adapter's config names.
    `merging`: the plan will be carried out, so work it will need starts while it is made: loading torch
    (longer than planning) when the adapter has LoRA factors, and hashing the adapter for the manifest.
    The garbage collector is paused while planning (see `without_gc`), not while the caller iterates;
    `merge_shards` and `verify_merge`, which run no caller code, pause it for their whole run."""
    if not isinstance(adapter, WeightedAdapters | str | os.PathLike):  # a list given without weights
        adapter = adapter_spec(adapter)
    hashes, compute_import = Hashes(), _ComputeImport()
    with ExitStack() as stack:
        stack.callback(compute_import.join)
        stack.callback(hashes.close)
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qwen-merge-adapter-")))
        with without_gc():
            plan = _plan(base, adapter, options, scratch, hashes if merging else None,
                         compute_import if merging else None)
        yield Run(plan, hashes, compute_import)


def _plan(base: PathLike | None, adapter: AdapterSpec, options: MergeOptions, scratch: Path, hashes: Hashes | None,
          compute_import: _ComputeImport | None) -> MergePlan:
    checkpoint = _open_base(base) if base is not None else None
    given = adapter_paths(adapter)
    parsed = [_open_adapter(one, options, scratch / str(k) if len(given) > 1 else scratch)
              for k, one in enumerate(given)]
    weights = adapter.weights if isinstance(adapter, WeightedAdapters) else None
    checkpoint, notes = _base_and_notes(checkpoint, parsed[0])
    if weights is not None:
        refuse_uncombinable(parsed, weights)
        kept = notes if base is None else ()  # BASE taken from the first adapter; else a note per adapter
        notes = (*kept, *basemodel.combined_notes([(a.config, a.root / ADAPTER_CONFIG) for a in parsed], checkpoint))
    choice = _tokenizer(checkpoint, parsed, options)
    if hashes is not None:
        for one in parsed:
            hashes.start(one.file.path)
    if compute_import is not None and any(one.pairs or one.param_pairs for one in parsed):
        compute_import.start()
    compare = partial(same_values, parsed[0].file) if weights is None else _same_values_across(parsed)
    plan = make_plan(checkpoint, parsed[0], options, compare, tokenizer=choice,
                     quant_states=read_quant_states(checkpoint), others=tuple(parsed[1:]), weights=weights,
                     same_bytes=same_bytes)
    return dataclasses.replace(plan, notes=notes + plan.notes)


def _open_adapter(adapter: PathLike, options: MergeOptions, scratch: Path) -> Adapter:
    adapter_folder, adapter_hub = _adapter_folder(adapter, options)
    weights = None
    if options.allow_pickle:
        from .inputs.pickled import unpickle_adapter  # torch.load: only when pickles are allowed

        scratch.mkdir(exist_ok=True)
        weights = unpickle_adapter(adapter_folder, scratch)
    return dataclasses.replace(open_adapter(adapter_folder, weights=weights), hub=adapter_hub)


def _same_values_across(adapters: list[Adapter]):
    """`same_values` for tensors of several adapters' files: tensors of two files are never the same."""
    owner = {id(e): one.file for one in adapters for e in one.file.entries}

    def compare(x: TensorEntry, y: TensorEntry, transposed: bool) -> bool:
        file = owner.get(id(x))
        return file is not None and file is owner.get(id(y)) and same_values(file, x, y, transposed)
    return compare


def _adapters(plan: MergePlan) -> tuple[Adapter, ...]:
    return plan.adapters or (plan.adapter,)


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


def _tokenizer(base: Checkpoint, adapters: Sequence[Adapter], options: MergeOptions) -> TokenizerChoice:
    """Which tokenizer files the output gets; a Hub base's are downloaded when they must be compared."""
    found = [files_in(one.root) if wants_adapter_files(options.tokenizer) else () for one in adapters]
    if base.hub is not None and any(compares(options.tokenizer, files) for files in found):
        for path in tokenizer_files(base.side_files):
            hub.fetch(base.hub, path.name)
    if len(adapters) == 1:
        return choose(options.tokenizer, base.side_files, found[0])
    named = [(f"adapter {k + 1} ({one.root})", files) for k, (one, files) in enumerate(zip(adapters, found))]
    return choose_among(options.tokenizer, base.side_files, named)


def local_inputs(base: PathLike | None, adapter: AdapterSpec, options: MergeOptions) -> list[Path]:
    """The inputs given as local paths (a Hub repo id is not one), which a destination must stay out of."""
    local = [Path(p) for p in (base, *adapter_paths(adapter)) if p is not None and hub.repo_ref(p) is None]
    if options.tokenizer not in TOKENIZER_CHOICES:  # a tokenizer folder is an input too
        local.append(Path(options.tokenizer))
    return local


def tell(plan: MergePlan) -> None:
    """The plan's notes, and the tokenizer when it is not the base's, on stderr before the progress."""
    lines = [f"note: {note}" for note in plan.notes]
    if plan.tokenizer is not None and plan.tokenizer.source != "base":
        lines.append(f"tokenizer: {plan.tokenizer}")
    for line in lines:
        print(line, file=sys.stderr)
