"""Check a merged folder against a fresh plan of the same merge, without loading the model.

The plan of BASE + ADAPTER (same options) is the expected layout of the output: its files, index, shard
headers and config. Tensors the plan copies are compared byte for byte with their source; tensors it
computes are recomputed by the merge's own code (`pieces.shard_pieces` / `stream.Computer`) and compared byte
for byte — on the first, middle and last row block of each by default, on every block with `full`.
Everything is read in chunks or row blocks, so memory stays bounded whatever the shard size.

Problems found in the output are collected, one line each naming the file and the tensor; only a problem
with the inputs or the arguments (a missing folder, an adapter that does not fit) raises.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy

from .compute.pieces import Block, RawSpan, shard_pieces
from .dtypes import DTYPE_BITS, FLOATS, dtype_name
from .errors import FormatError, OptionError, QwenMergeError
from .files import MANIFEST_NAME, MODEL_CONFIG
from .inputs.sources import Files, read_exact
from .inputs.tensorfile import TensorEntry, TensorFile, read_header
from .options import MergeOptions
from .planning.manifest import read_manifest, recorded_options
from .planning.plan import OpKind, ShardPlan, TensorOp
from .planning.ties import TieInfo
from .run import LazyComputer, Run, adapter_spec, open_run, without_gc
from .units import human_bytes

PathLike = str | os.PathLike
COPY_CHECK_CHUNK_BYTES = 4 << 20  # bytes compared at a time for copied tensors and side files
# Written by merge_shards beside the shards; its content is provenance, not part of the model.
# Beside the output's own files: the manifest, and what a merge published to the Hub has once downloaded
# (`hf download REPO --local-dir DIR`, as its card says): the card, the repo's .gitattributes and
# huggingface_hub's .cache folder of download metadata; none of them is read by a loader.
IGNORED_NAMES = frozenset({MANIFEST_NAME, "README.md", ".gitattributes", ".cache"})
# The options of the merge that verify takes from the manifest when not given (allow_nonfinite is not one:
# verify compares bytes, so it accepts NaN/Inf where the output has them).
RECORDED_OPTIONS = ("rounding", "key_map", "block_bytes", "dtype", "max_shard_size", "tokenizer")


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of `verify_merge`: `ok` when nothing differs; `problems` one line each (file and
    tensor named); how many tensors were checked and how many bytes of the output were compared."""

    ok: bool
    problems: tuple[str, ...]
    checked_tensors: int
    checked_bytes: int
    full: bool = False

    def summary(self) -> str:
        how = "every row block" if self.full else "the first, middle and last row block (--full: all)"
        verdict = "OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)"
        return (f"verify: {verdict}; {self.checked_tensors} tensors checked, {human_bytes(self.checked_bytes)} "
                f"compared; merged tensors recomputed on {how}")


def verify_merge(output: PathLike, base: PathLike | None, adapter: PathLike | Sequence[PathLike], *,
                 weights: Sequence[float] | None = None, full: bool = False,
                 options: MergeOptions | None = None, rounding: str | None = None,
                 key_map: dict[str, str] | None = None, allow_pickle: bool | None = None,
                 block_bytes: int | None = None, dtype: str | None = None,
                 max_shard_size: int | str | None = None, tokenizer: str | os.PathLike | None = None
                 ) -> VerifyReport:
    """Check that `output` is the merge of `adapter` into `base`, reading headers, JSON and bytes only.

    Checks (each failure is one line of `problems`): the files present (no shard, index or side file
    missing or extra; a `qwen_merge.json` manifest is ignored); the index's weight map and total size;
    every shard header (names, dtypes, shapes, offsets, `format: pt`) and file size; every copied tensor
    byte-identical to its source; every computed tensor byte-identical to a recomputation by the merge's
    own code, on sampled row blocks (first, middle, last) or on all of them with `full`; config.json as
    planned (byte-identical to the base's when the merge does not change it) and consistent with the
    tensors (vocab_size and the embedding's rows, tie_word_embeddings and lm_head); other side files
    byte-identical to the base's, or to the adapter's (or a folder's) tokenizer files when the merge takes
    its tokenizer from there.

    The options of the merge (rounding, key_map, block_bytes, dtype, max_shard_size, tokenizer) are those that
    `output`'s manifest (`qwen_merge.json`) records, unless given; without a manifest, those given (or the
    defaults). A manifest whose options cannot be read is a problem, and the options given are used.

    Args:
        output: the merged folder to check.
        base, adapter, options, rounding, key_map, allow_pickle, block_bytes, dtype, max_shard_size,
            tokenizer: those of the merge, as for `plan_merge`; an option given here (as a keyword argument, or
            a value of `options` other than the default) must equal the one the manifest records.
        full: recompute every row block of computed tensors instead of a sample.
        weights: with several adapters (`adapter` a list, as for `plan_merge`), their weights; None: those
            the manifest records for them (1.0 each without a manifest).

    Returns:
        A `VerifyReport`; `report.ok` is False when anything differs.

    Raises:
        FormatError: `output` is not a folder.
        OptionError: an option given differs from the one the manifest records (both are named).
        FormatError, AdapterError, MismatchError: the inputs cannot be planned (as for `plan_merge`).

    Example:
        >>> report = verify_merge("Qwen3-0.6B-merged", "Qwen3-0.6B", "my-lora")  # doctest: +SKIP
        >>> report.ok, report.problems                                          # doctest: +SKIP
        (True, ())
    """
    out = Path(output)
    if not out.exists():
        raise FormatError(f"{out}: merged output folder not found")
    if not out.is_dir():
        raise FormatError(f"{out}: expected the merged model folder, found a file")
    keywords = {"rounding": rounding, "key_map": key_map, "allow_pickle": allow_pickle, "block_bytes": block_bytes,
                "dtype": dtype, "max_shard_size": max_shard_size, "tokenizer": tokenizer}
    given = (options.given() if options else set()) | {key for key, value in keywords.items() if value is not None}
    options, problem = _with_recorded_options(out, MergeOptions.of(options, **keywords), given)
    # allow_nonfinite: verification compares bytes, so a merge written with --allow-nonfinite checks too
    options = dataclasses.replace(options, allow_nonfinite=True)
    if weights is None and not isinstance(adapter, str | os.PathLike):
        weights = _recorded_weights(out, len(adapter))
    with open_run(base, adapter_spec(adapter, weights), options) as run, without_gc():
        run.fetch_side_files()
        checker = _Checker(run, out, full)
        if problem:
            checker.problem(problem)
        checker.run()
    return VerifyReport(not checker.problems, tuple(checker.problems), checker.tensors, checker.bytes, full)


def _with_recorded_options(out: Path, options: MergeOptions, given: set[str]) -> tuple[MergeOptions, str | None]:
    """`options`, with the merge options `out`'s manifest records in place of those not `given`; and a
    problem line when the manifest's options cannot be read (the options given are used then).

    Raises:
        OptionError: a given option differs from the recorded one.
    """
    path = out / MANIFEST_NAME
    try:
        found = recorded_options(out)
        recorded = MergeOptions.from_identity(found) if found is not None else None
    except (FormatError, OptionError) as e:
        return options, f"{path}: the options of the merge cannot be read from it ({e}); checked with those given"
    if recorded is None:
        return options, None
    mine, theirs = options.identity(), recorded.identity()
    if found.get("tokenizer") == "folder" and "tokenizer" not in given:
        raise OptionError(f"{path} records that this folder was merged with the tokenizer of a folder; pass that "
                          f"folder to check its files", option="tokenizer")
    theirs["tokenizer"] = found.get("tokenizer", theirs["tokenizer"])
    for key in RECORDED_OPTIONS:
        if key in given and mine[key] != theirs[key]:
            raise OptionError(f"{_shown(key, mine[key])} given, but {path} records {_shown(key, theirs[key])}, the "
                              f"value this folder was merged with; leave the option out to verify with the recorded "
                              f"one", option=key)
    return dataclasses.replace(options, **{k: getattr(recorded, k) for k in RECORDED_OPTIONS if k not in given}), None


def _recorded_weights(out: Path, count: int) -> list[float] | None:
    """The weights the manifest records for `count` adapters, or None (not recorded, or for another count:
    the adapters given then decide, and a difference shows as the bytes that differ)."""
    try:
        found = read_manifest(out)
    except FormatError:
        return None
    records = found.identity.adapters if found is not None else ()
    if len(records) != count or any(r.weight is None for r in records):
        return None
    return [r.weight for r in records]


def _shown(key: str, value: object) -> str:
    """An option's recorded value as a user writes it (`'bfloat16'`, not the stored `'BF16'`)."""
    return repr(dtype_name(value)) if key == "dtype" and value else repr(value)


def sampled_blocks(count: int, full: bool) -> set[int]:
    """Indices of the row blocks compared: all, or the first, middle and last."""
    return set(range(count)) if full else {0, count // 2, count - 1} & set(range(count))


class _Checker:
    def __init__(self, run: Run, out: Path, full: bool) -> None:
        self._run, self.plan, self.out, self.full = run, run.plan, out, full
        self.problems: list[str] = []
        self.tensors = self.bytes = 0
        self.stored: dict[str, tuple[TensorFile, TensorEntry]] = {}  # output tensors whose header is as planned
        self._reads: dict[str, bytearray] = {}  # grow-only read buffers by role, apart from the merge's own
        self.config: dict | None = None  # the output's config.json, once parsed
        self._headers: dict[str, tuple[TensorFile, dict[str, TensorEntry]]] = {}  # output headers and entries
        self._planned: dict[str, tuple[str, TensorEntry]] = {}  # tensor -> its planned shard and entry

    def problem(self, line: str) -> None:
        self.problems.append(line)

    def run(self) -> None:
        present = self._check_files()
        if self.plan.index_name and self.plan.index_name in present:
            self._check_index(self.out / self.plan.index_name)
        with self._run.producing(threads=1) as producer:  # the merge's own GEMMs, one block at a time
            files, compute = producer.files, producer.compute
            self._compute, self._out_files = compute, files
            for shard in self.plan.shards:
                if shard.name in present:
                    self._check_shard(shard, files, compute)
            self._check_config(present)
            self._check_tie(files)
        self._check_side_files(present)

    # -- files and index -------------------------------------------------------------------------------

    def _check_files(self) -> set[str]:
        expected = [s.name for s in self.plan.shards] + [p.name for p in self.plan.side_files]
        if self.plan.index_name:
            expected.append(self.plan.index_name)
        found = {p.name: p for p in self.out.iterdir() if p.name not in IGNORED_NAMES}
        for name in expected:
            if name not in found:
                self.problem(f"{self.out / name}: missing (the planned output has it)")
            elif not found[name].is_file():
                self.problem(f"{self.out / name}: not a regular file")
        for name in sorted(set(found) - set(expected)):
            self.problem(f"{self.out / name}: unexpected {'folder' if found[name].is_dir() else 'file'} "
                         f"(not part of the planned output)")
        return {n for n in expected if n in found and found[n].is_file()}

    def _check_index(self, path: Path) -> None:
        want = self.plan.index_document()
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.problem(f"{path}: cannot read the index: {e}")
            return
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            self.problem(f"{path}: no 'weight_map' object")
            return
        for name, shard in want["weight_map"].items():
            if name not in weight_map:
                self.problem(f"{path}: weight_map lacks tensor {name!r} (stored in {shard})")
            elif weight_map[name] != shard:
                self.problem(f"{path}: weight_map maps tensor {name!r} to {weight_map[name]!r}; it is stored in "
                             f"{shard}")
        for name in weight_map.keys() - want["weight_map"].keys():
            self.problem(f"{path}: weight_map names tensor {name!r}, which the merged model does not have")
        metadata = index.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        total = want["metadata"]["total_size"]
        if metadata.get("total_size") != total:
            self.problem(f"{path}: metadata.total_size is {metadata.get('total_size')!r}; the shards hold {total} "
                         f"bytes of tensor data")
        others = {k for k in metadata.keys() | want["metadata"].keys() if k != "total_size"
                  and metadata.get(k) != want["metadata"].get(k)}
        if others:
            self.problem(f"{path}: metadata {', '.join(sorted(others))} differ from the base index's")

    # -- shards ----------------------------------------------------------------------------------------

    def _check_shard(self, shard: ShardPlan, files: Files, compute: LazyComputer) -> None:
        path = self.out / shard.name
        try:
            got, have = self._output_header(shard.name)
        except FormatError as e:
            self.problem(f"{e} (header of the merged shard)")
            return
        ok = self._check_header(shard, got, have)
        sampled = lambda op: compute(op, self._blocks(op))  # noqa: E731 - only the sampled row blocks
        for entry, pieces in shard_pieces(shard, files, sampled):  # lazy: starts when iterated
            if have.get(entry.name) == entry:
                self.stored[entry.name] = (got, entry)
                self._check_tensor(shard, got, entry, pieces, files)
        if ok and got.size != shard.size:
            self.problem(f"{path}: {got.size} bytes, planned {shard.size}")

    def _check_header(self, shard: ShardPlan, got: TensorFile, have: dict[str, TensorEntry]) -> bool:
        path, before = got.path, len(self.problems)
        fmt = (got.metadata or {}).get("format")
        if fmt != "pt":
            self.problem(f"{path}: __metadata__ format is {fmt!r}, expected 'pt'")
        for e in shard.entries:
            g = have.get(e.name)
            if g is None:
                self.problem(f"{path}: header lacks tensor {e.name!r}")
                continue
            diffs = [f"{what} {mine} (planned {theirs})" for what, mine, theirs in (
                ("dtype", g.dtype, e.dtype), ("shape", list(g.shape), list(e.shape)),
                ("data_offsets", [g.start, g.end], [e.start, e.end])) if mine != theirs]
            if diffs:
                self.problem(f"{path}: tensor {e.name!r} has {', '.join(diffs)}")
        for name in have.keys() - {e.name for e in shard.entries}:
            self.problem(f"{path}: header has tensor {name!r}, which the plan does not put in this shard")
        if len(self.problems) == before:
            with open(path, "rb") as f:
                if f.read(len(shard.header)) != shard.header:
                    self.problem(f"{path}: header bytes differ from the planned header (metadata or padding)")
        return len(self.problems) == before

    def _check_tensor(self, shard: ShardPlan, got: TensorFile, entry: TensorEntry, pieces, files: Files) -> None:
        where = f"{got.path}: tensor {entry.name!r}"
        op = shard.ops.get(entry.name)
        out_fd = files.fd(got.path)
        start = got.data_offset + entry.start
        try:
            if op is None:  # the base tensor of the same name, copied
                self._check_copied(where, shard.copy_source(entry.name)[0].path, entry.name, entry, pieces, out_fd,
                                   start, got.path)
            else:
                self._check_op(where, op, entry, pieces, files, out_fd, start, got.path)
        except QwenMergeError as e:
            self.problem(f"{where}: cannot check it: {e}")
        self.tensors += 1

    def _check_op(self, where: str, op: TensorOp, entry: TensorEntry, pieces: Iterator, files: Files, out_fd: int,
                  start: int, path: Path) -> None:
        """A tensor the plan makes: copied bytes compared, computed rows recomputed, FP8 by value."""
        match op.kind:  # every kind has its case (tests/test_opkinds.py)
            case OpKind.COPY:
                self._check_copied(where, op.source.file.path, op.source.entry.name, entry, pieces, out_fd, start,
                                   path)
            case OpKind.CONVERT | OpKind.TOKENS | OpKind.MERGE | OpKind.BIAS:
                self._check_computed(where, op, entry, pieces, files, out_fd, start, path)
            case OpKind.REQUANT:
                self._check_requantized(where, op, out_fd, start, path)
            case OpKind.SCALES:
                pass  # new block scales: judged by their effect, when their weight's values are checked

    def _check_copied(self, where: str, src_path: Path, src_name: str, entry: TensorEntry, pieces: Iterator,
                      out_fd: int, start: int, path: Path) -> None:
        """A tensor copied from `src_name` of `src_path`: byte for byte, in chunks."""
        for piece in pieces:
            assert isinstance(piece, RawSpan)
            diff = self._compare_span(out_fd, start, piece.fd, piece.offset, piece.length, path, src_path)
            if diff:
                count, first = diff
                self.problem(f"{where} is not byte-identical to {src_name!r} of {src_path}: "
                             f"mismatch in {_bytes(count)}, the first at byte {first} of {entry.nbytes}")

    def _blocks(self, op: TensorOp) -> set[int]:
        """The row blocks of a computed tensor to recompute: sampled, or all with --full."""
        rows, _ = op.matrix
        count = 1 if op.kind is OpKind.BIAS else -(-rows // op.block_rows)
        return sampled_blocks(count, self.full)

    def _check_computed(self, where: str, op: TensorOp, entry: TensorEntry, pieces: Iterator, files: Files,
                        out_fd: int, start: int, path: Path) -> None:
        rows, _ = op.matrix
        item = DTYPE_BITS[op.dtype] // 8
        row_bytes = entry.nbytes // max(rows, 1)
        bad, checked, first, worst, unmerged = 0, 0, None, 0, True
        for block in pieces:  # only the blocks `self._blocks` selected are computed
            assert isinstance(block, Block)
            mine = bytes(block.data)
            block.release()
            theirs = self._read("out", out_fd, start + block.offset, len(mine), path)
            checked += len(mine) // item
            if _same(mine, theirs):
                continue
            n, first_elem, ulp = _element_diff(mine, theirs, op.dtype)
            bad, worst = bad + n, max(worst, ulp)
            if first is None:
                first = (block.offset + first_elem * item) // max(row_bytes, 1)
            unmerged = unmerged and self._equals_source(op, files, block.offset, theirs)
        self.bytes += checked * item
        if bad:
            hint = ("; it holds the unmerged source rows: the LoRA delta was not applied"
                    if unmerged and op.pair is not None else "")
            self.problem(f"{where} differs from the recomputed merge: {bad} of {checked} checked elements, the "
                         f"first in row {first}, up to {worst} ulp{hint}")

    def _check_requantized(self, where: str, op: TensorOp, out_fd: int, start: int, path: Path) -> None:
        """A weight requantized to FP8 is checked by value, not by bytes: the stored e4m3 values,
        dequantized with the output's own block scales, must be within the rounding bound of a fresh
        quantization of the exact merged values, so another tool's scale choice or rounding also passes."""
        scale_name = op.requant.source.entry.name
        found = self._output_tensor(scale_name)
        if found is None:
            self.problem(f"{where}: cannot check it: its block scales {scale_name!r} are not stored as planned")
            return
        file, entry = found
        scales = bytearray(self._read("scales", self._out_files.fd(file.path), file.data_offset + entry.start,
                                      entry.nbytes, file.path))
        rows, cols = op.matrix
        bad, checked, first, worst = 0, 0, None, 0.0
        for index in sorted(self._blocks(op)):
            row0 = index * op.block_rows
            count = min(op.block_rows, rows - row0) * cols  # elements, one byte each
            theirs = self._read("out", out_fd, start + row0 * cols, count, path)
            n, first_elem, ratio = self._compute.requant_error(op, index, theirs, scales)
            bad, checked, worst = bad + n, checked + count, max(worst, ratio)
            if n and first is None:
                first = row0 + first_elem // cols
        self.bytes += checked
        if bad:
            self.problem(f"{where} is off the recomputed merge by more than FP8 requantization allows (half an "
                         f"e4m3 step of the value divided by its block scale, times the scale): {bad} of "
                         f"{checked} checked elements, the first in row {first}, up to {worst:.3g}x that bound")

    def _output_tensor(self, name: str) -> tuple[TensorFile, TensorEntry] | None:
        """Where the output stores `name`, if its header entry is as planned."""
        if name not in self._planned:
            self._planned.update((e.name, (s.name, e)) for s in self.plan.shards for e in s.entries)
        shard, planned = self._planned[name]
        try:
            got, have = self._output_header(shard)
        except FormatError:
            return None
        return (got, planned) if have.get(name) == planned else None

    def _output_header(self, shard: str) -> tuple[TensorFile, dict[str, TensorEntry]]:
        """An output shard's header and its entries by name, read once (the tensor checks and the FP8 scale
        lookups share them)."""
        if shard not in self._headers:
            got = read_header(self.out / shard)
            self._headers[shard] = got, got.entry_map()
        return self._headers[shard]

    def _equals_source(self, op: TensorOp, files: Files, offset: int, theirs: memoryview) -> bool:
        src = op.source
        if src.entry.dtype != op.dtype or offset + len(theirs) > src.entry.nbytes:
            return False
        data = self._read("source", files.fd(src.file.path), src.file.data_offset + src.entry.start + offset,
                          len(theirs), src.file.path)
        return _same(data, theirs)

    # -- config and tying ------------------------------------------------------------------------------

    def _check_config(self, present: set[str]) -> None:
        path = self.out / MODEL_CONFIG
        if MODEL_CONFIG not in present or self.plan.base.config is None:
            return
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.problem(f"{path}: not valid JSON: {e}")
            return
        if not isinstance(config, dict):
            self.problem(f"{path}: not a JSON object")
            return
        want = self.plan.config
        if want is not None and config != want:
            keys = sorted(k for k in config.keys() | want.keys() if config.get(k) != want.get(k))
            self.problem(f"{path}: differs from the planned config in {', '.join(keys)} "
                         f"(" + ", ".join(f"{k}={config.get(k)!r}, planned {want.get(k)!r}" for k in keys[:3])
                         + ")")
        self._check_vocab(path, config)
        self.config = config

    def _check_vocab(self, path: Path, config: dict) -> None:
        def vocab(cfg: dict | None) -> object:
            cfg = cfg or {}
            inner = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
            return cfg.get("vocab_size", inner.get("vocab_size"))

        base_info = TieInfo.of(self.plan.base.config, self.plan.base.entries())
        base_rows = self.plan.base.entries()[base_info.embed].shape[0] if base_info.embed else None
        if base_rows is None or vocab(self.plan.base.config) != base_rows:
            return  # the base itself does not state its vocabulary as the embedding's rows: nothing to hold
        entries = {n: e for n, (_, e) in self.stored.items()}
        info = TieInfo.of(config, entries)
        size = vocab(config)
        for name in (info.embed, info.head if info.head_stored else None):
            if name and name in entries and entries[name].shape[0] != size:
                self.problem(f"{path}: vocab_size is {size!r} but {name} has {entries[name].shape[0]} rows")

    def _check_tie(self, files: Files) -> None:
        """tied => no lm_head, or one byte-identical to the embedding; untied => lm_head stored. Held only
        where the base itself holds it (a base that breaks the rule passes its inconsistency on)."""
        if self.config is None:
            return
        path = self.out / MODEL_CONFIG
        base = self.plan.base
        if self._tie_problem(base.config, base.locations(), files) is not None:
            return
        problem = self._tie_problem(self.config, self.stored, files,
                                    planned={e.name for s in self.plan.shards for e in s.entries})
        if problem:
            self.problem(f"{path}: {problem}")

    def _tie_problem(self, config: dict | None, where: dict[str, tuple[TensorFile, TensorEntry]], files: Files,
                     planned: set[str] | None = None) -> str | None:
        info = TieInfo.of(config, {n: e for n, (_, e) in where.items()})
        if info.embed is None or info.embed not in where:
            return None
        if not info.tied and not info.head_stored and info.head not in (planned or ()):
            return f"tie_word_embeddings is false but the checkpoint has no {info.head}"
        if info.tied and info.head_stored:
            (f_e, e), (f_h, h) = where[info.embed], where[info.head]
            same = e.shape == h.shape and e.dtype == h.dtype and not self._compare_span(
                files.fd(f_h.path), f_h.data_offset + h.start, files.fd(f_e.path), f_e.data_offset + e.start,
                e.nbytes, f_h.path, f_e.path, count=False)
            if not same:
                return (f"tie_word_embeddings is true but {info.head} ({f_h.path.name}) is not byte-identical to "
                        f"{info.embed} ({f_e.path.name})")
        return None

    # -- side files ------------------------------------------------------------------------------------

    def _check_side_files(self, present: set[str]) -> None:
        for source in self.plan.side_files:
            if source.name not in present or (source.name == MODEL_CONFIG and self.plan.config is not None):
                continue
            path = self.out / source.name
            owner = "the base's" if source in self.plan.base.side_files else f"the {self.plan.tokenizer.source}'s"
            mine, theirs = path.stat().st_size, source.stat().st_size
            if mine != theirs:
                self.problem(f"{path}: differs from {owner} {source} ({mine} bytes instead of {theirs}); side "
                             f"files are copied unchanged")
                continue
            fd_out, fd_src = os.open(path, os.O_RDONLY), os.open(source, os.O_RDONLY)
            try:
                diff = self._compare_span(fd_out, 0, fd_src, 0, mine, path, source)
            finally:
                os.close(fd_out)
                os.close(fd_src)
            if diff:
                self.problem(f"{path}: differs from {owner} {source} (mismatch in {_bytes(diff[0])}, the first "
                             f"at byte {diff[1]}); side files are copied unchanged")

    # -- bytes -----------------------------------------------------------------------------------------

    def _read(self, role: str, fd: int, offset: int, length: int, path: Path) -> memoryview:
        buffer = self._reads.get(role)
        if buffer is None or len(buffer) < length:
            buffer = self._reads[role] = bytearray(length)
        view = memoryview(buffer)[:length]
        read_exact(fd, view, offset, path)
        return view

    def _compare_span(self, fd_a: int, off_a: int, fd_b: int, off_b: int, length: int, path_a: Path,
                      path_b: Path, count: bool = True) -> tuple[int, int] | None:
        """(bytes that differ, first differing byte) between two spans, or None when equal."""
        differ, first = 0, None
        for pos in range(0, length, COPY_CHECK_CHUNK_BYTES):
            n = min(COPY_CHECK_CHUNK_BYTES, length - pos)
            a = self._read("a", fd_a, off_a + pos, n, path_a)
            b = self._read("b", fd_b, off_b + pos, n, path_b)
            if count:
                self.bytes += n
            if not _same(a, b):
                ne = numpy.flatnonzero(numpy.frombuffer(a, numpy.uint8) != numpy.frombuffer(b, numpy.uint8))
                differ += len(ne)
                first = pos + int(ne[0]) if first is None else first
        return (differ, first) if differ else None


def _bytes(n: int) -> str:
    return f"{n} byte" if n == 1 else f"{n} bytes"


def _same(a: memoryview, b: memoryview) -> bool:
    return len(a) == len(b) and bool(numpy.array_equal(numpy.frombuffer(a, numpy.uint8),
                                                       numpy.frombuffer(b, numpy.uint8)))


def _element_diff(a: memoryview, b: memoryview, dtype: str) -> tuple[int, int, int]:
    """(elements that differ, index of the first, largest distance in units in the last place)."""
    bits = DTYPE_BITS[dtype]
    ints = {16: numpy.int16, 32: numpy.int32, 64: numpy.int64}.get(bits, numpy.uint8)
    x, y = numpy.frombuffer(a, ints), numpy.frombuffer(b, ints)
    idx = numpy.flatnonzero(x != y)
    if dtype not in FLOATS:
        return len(idx), int(idx[0]), 0

    def line(v: numpy.ndarray) -> numpy.ndarray:  # sign-magnitude bit patterns onto a monotonic line
        v = v.astype(numpy.int64)
        mag = v & ((1 << (bits - 1)) - 1)
        return numpy.where(v < 0, -mag, mag)

    ulp = int(numpy.abs(line(x[idx]) - line(y[idx])).max())
    return len(idx), int(idx[0]), ulp


