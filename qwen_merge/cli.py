"""`qwen-merge`: a thin shell over the library. User errors become one `error: ...` line and exit 1.

That includes argument mistakes: argparse's own habit (usage first, then `prog: error: ...`, exit 2) is
replaced by the same `error: ...` line as every other error, a "did you mean" hint from difflib where a
flag or command is close to a real one, then the usage of the subcommand that was meant (or of
`qwen-merge` itself when no valid subcommand was given), and exit 1. `--help` still prints help, exit 0.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn

from .dtypes import dtype_choices
from .errors import OptionError, OutputError, QwenMergeError
from .units import human_bytes
from .version import VERSION

BASE_HELP = "model folder, .safetensors file, or Hugging Face repo id (org/name[@revision])"
OPTIONAL_BASE_HELP = BASE_HELP + "; omitted: the base_model_name_or_path of ADAPTER's adapter_config.json"
ADAPTER_HELP = "PEFT adapter folder, or Hugging Face repo id (org/name[@revision])"
# The flag of each option keyword, for errors about an option (`OptionError.option`).
FLAGS = {"rounding": "--rounding", "key_map": "--map", "allow_pickle": "--allow-pickle",
         "allow_nonfinite": "--allow-nonfinite", "dtype": "--dtype", "max_shard_size": "--max-shard-size",
         "low_disk": "--low-disk", "tokenizer": "--tokenizer", "push_to_hub": "--push-to-hub",
         "outtype": "--outtype", "resume": "--resume", "output": "OUT", "weights": "--weights",
         "adapter": "ADAPTER"}
WEIGHTS_HELP = ("with several adapters: one weight per adapter, in order, separated by commas (default 1 each); "
                "a negative weight subtracts that adapter's delta (write --weights=-0.5,1 when the first is negative)")
# The exit status when the reader of stdout goes away (`qwen-merge plan ... | head`): 128 + SIGPIPE, what
# the shell shows for a program that SIGPIPE ended.
BROKEN_PIPE_STATUS = 128 + signal.SIGPIPE


class _UsageError(Exception):
    """An argument mistake; `parser` is the (sub)command whose usage is shown after the message."""

    def __init__(self, message: str, parser: argparse.ArgumentParser) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake raises `_UsageError` for `main` to report, instead of exiting 2."""

    def error(self, message: str) -> NoReturn:
        # argparse words it "invalid choice: 'mrge' (choose from 'plan', 'merge', ...)": both the subcommand
        # and --rounding; quoting of the choices differs between Python versions, hence the strip.
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        choices = [c.strip(" '\"") for c in found[2].split(",")] if found else []
        raise _UsageError(message + _did_you_mean([found[1]] if found else [], choices), self)


def _did_you_mean(words: list[str], candidates: list[str]) -> str:
    """`; did you mean X?` for the words close to a candidate (a flag's `=value` ignored), else ''."""
    close = [m[0] for w in words if (m := difflib.get_close_matches(w.split("=")[0], candidates, n=1))]
    return f"; did you mean {' and '.join(close)}?" if close else ""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser, commands = _parser()
    # parse_known_args, because parse_args reports unknown flags against the top-level parser; they
    # belong to the subcommand, whose options and usage are what helps.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = commands[args.command]
        flags = [option for action in command._actions for option in action.option_strings]  # no public API
        hint = _did_you_mean([word for word in unknown if word.startswith("-")], flags)
        noun = "arguments" if len(unknown) > 1 else "argument"
        raise _UsageError(f"unrecognized {noun}: {' '.join(unknown)}{hint}", command)
    _check_omitted_base(args, commands)
    return args


def _check_omitted_base(args: argparse.Namespace, commands: dict[str, argparse.ArgumentParser]) -> None:
    """`plan ADAPTER` and `merge ADAPTER OUT` leave BASE out (it is then the model the adapter names);
    argparse fills ADAPTER and OUT from the right. A first argument that is no adapter (nor a Hub repo id,
    which may hold one) means an argument is missing instead, as it did before BASE could be omitted."""
    from .inputs.basemodel import may_be_adapter

    if args.command == "merge":
        _check_merge_positionals(args, commands["merge"])
    if args.command == "plan" and args.out is None and (args.adapter or "").lower().endswith(".gguf"):
        args.base, args.adapter, args.out = None, args.base, args.adapter  # `plan ADAPTER out.gguf`
    if args.command == "plan":
        _several_plan_adapters(args)
    if getattr(args, "base", "") is not None:
        return
    if not may_be_adapter(args.adapter):
        missing = "out" if args.command == "merge" else "adapter"
        raise _UsageError(f"the following arguments are required: {missing}", commands[args.command])


def _check_merge_positionals(args: argparse.Namespace, merge: argparse.ArgumentParser) -> None:
    """`merge`'s positionals as meant: argparse fills them from the left. OUT is required unless
    --push-to-hub; two words are ADAPTER OUT without it, BASE ADAPTER with it."""
    words = [w for w in (args.base, args.adapter, args.out, *args.more) if w is not None]
    if len(words) > 3:  # BASE ADAPTER ADAPTER... OUT: several adapters, summed with --weights
        if args.push_to_hub:
            raise _UsageError("--push-to-hub merges one adapter; merge several into OUT, then push OUT's model", merge)
        args.base, args.adapter, args.out = words[0], words[1:-1], words[-1]
    elif not args.push_to_hub:
        if len(words) < 2:
            raise _UsageError("the following arguments are required: out", merge)
        args.base, args.adapter, args.out = ([None, *words])[-3:]  # ADAPTER OUT, or BASE ADAPTER OUT
    else:  # ADAPTER, BASE ADAPTER, or BASE ADAPTER OUT
        args.base, args.adapter, args.out = ([None, *words, None] if len(words) == 1 else [*words, None])[:3]
    for flag in ("private", "revision", "create_pr", "commit_message"):
        if getattr(args, flag) and not args.push_to_hub:
            raise _UsageError(f"--{flag.replace('_', '-')} applies only with --push-to-hub", merge)


def _several_plan_adapters(args: argparse.Namespace) -> None:
    """`plan BASE ADAPTER ADAPTER... [OUT]`: the words after BASE are adapters while they name one (a folder
    with adapter_config.json, or a Hub repo id); a last word that does not (a folder to create, a .gguf
    file) is OUT, as with one adapter."""
    from .inputs.basemodel import may_be_adapter

    words = [w for w in (args.out, *args.more) if w is not None]
    if not words:
        return
    out = words.pop() if words[-1].lower().endswith(".gguf") or not may_be_adapter(words[-1]) else None
    args.out = out
    if words:
        args.adapter = [args.adapter, *words]


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each subcommand's parser by name."""
    parser = _Parser(prog="qwen-merge", description="Merge a PEFT LoRA adapter into a "
                     "safetensors checkpoint, streaming shard by shard with bounded memory.")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    parser.add_argument("--version", action="version", version=f"qwen-merge {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="show what a merge would do, writing nothing")
    plan.add_argument("base", nargs="?", help=OPTIONAL_BASE_HELP)
    plan.add_argument("adapter", help=ADAPTER_HELP)
    plan.add_argument("out", nargs="?", help="OUT as for merge: with a path ending in .gguf, also the GGUF file's "
                      "tensors, types and size")
    plan.add_argument("more", nargs="*", metavar="ADAPTER", help="more adapters, after BASE and the first: their "
                      "weighted sum is merged (see --weights); then OUT, if given, last")
    shown = plan.add_mutually_exclusive_group()
    shown.add_argument("--detail", action="store_true", help="also list every tensor that is copied unchanged")
    shown.add_argument("--json", action="store_true",
                      help="print the plan as one JSON document for scripts: every tensor, totals, memory, disk")
    plan.add_argument("--force", action="store_true",
                      help="plan even if BASE's manifest shows this adapter was already merged into it")
    plan.add_argument("--push-to-hub", metavar="REPO",
                      help="also state the disk a push to Hub repo REPO needs (without OUT) and the bytes it uploads")
    merge = sub.add_parser("merge", help="merge ADAPTER into BASE, writing OUT")
    merge.add_argument("base", nargs="?", help=OPTIONAL_BASE_HELP)
    merge.add_argument("adapter", help=ADAPTER_HELP)
    merge.add_argument("out", nargs="?", help="output folder (created; must not be inside an input); may be "
                       "omitted with --push-to-hub (then no local copy is kept)")
    merge.add_argument("more", nargs="*", metavar="ADAPTER", help="several adapters: BASE ADAPTER ADAPTER... OUT "
                       "(BASE required), their weighted sum merged in one pass (see --weights)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it is a non-empty folder; with "
                       "--push-to-hub, also a repo that holds a model (its old files are deleted in the same commit)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    merge.add_argument("--resume", action="store_true",
                       help="continue an interrupted merge into OUT from its completed shards")
    merge.add_argument("--force", action="store_true",
                       help="merge even if BASE's manifest shows this adapter was already merged into it")
    merge.add_argument("--allow-nonfinite", action="store_true",
                       help="write NaN/Inf that the adapter or the merge produces instead of stopping")
    merge.add_argument("--push-to-hub", metavar="REPO",
                       help="publish the merged model to Hub repo REPO (org/name; created if missing) in one commit, "
                            "each shard uploaded while the next merges; without OUT only about two shards are on "
                            "disk at once")
    merge.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    merge.add_argument("--revision", metavar="BRANCH",
                       help="with --push-to-hub: commit to BRANCH (created when missing) instead of the default")
    merge.add_argument("--create-pr", action="store_true",
                       help="with --push-to-hub: open a pull request with the commit instead of committing")
    merge.add_argument("--commit-message", metavar="TEXT", help="with --push-to-hub: the commit's message")
    for p in (plan, merge):
        p.add_argument("--outtype", metavar="TYPE", help="OUT ending in .gguf: the type of its weights, bf16, f16, "
                       "f32 or q8_0 (norms, biases and routers stay f32); default auto: bf16 for a bf16 model, "
                       "else f16")
    merge.add_argument("--low-disk", action="store_true",
                       help="BASE from the Hub: delete each shard this run downloaded once it is merged (disk "
                            "needed: the output plus about two shards); shards already cached are kept")
    verify = sub.add_parser("verify", help="check a merged folder against BASE + ADAPTER, without loading the model",
                            description="Check OUT against BASE + ADAPTER without loading the model. The options "
                                        "of the merge are those OUT/qwen_merge.json records, unless given.")
    verify.add_argument("out", help="the merged model folder to check")
    verify.add_argument("--base", required=True, help="the base it was merged from: " + BASE_HELP)
    verify.add_argument("--adapter", required=True, action="append", help="the adapter it was merged with: "
                        + ADAPTER_HELP + "; repeat it for each of several adapters, in their order")
    verify.add_argument("--full", action="store_true", help="recompute every row block of merged tensors "
                        "(default: the first, middle and last block of each)")
    for p in (plan, merge, verify):
        p.add_argument("--weights", metavar="W1,W2,...", help=WEIGHTS_HELP + ("; default for verify: the weights "
                       "OUT/qwen_merge.json records" if p is verify else ""))
        p.add_argument("--rounding", choices=("single", "peft"),
                       help="single: fp32 accumulation, one rounding (default); peft: PEFT's double rounding "
                            "where PEFT does it (embedding LoRA, target_parameters experts), for byte-identical "
                            "PEFT output")
        p.add_argument("--map", action="append", default=[], metavar="FROM=TO",
                       help="rename adapter key prefix FROM to base prefix TO (repeatable)")
        p.add_argument("--allow-pickle", action="store_true",
                       help="read a pickled adapter_model.bin with torch.load(weights_only=True)")
        p.add_argument("--dtype", metavar="DTYPE",
                       help=f"convert every float tensor of the output to DTYPE (an FP8 base is dequantized): "
                            f"{dtype_choices()}; default: the base's own dtypes, untouched tensors copied byte for "
                            f"byte")
        p.add_argument("--tokenizer", metavar="{auto,base,adapter,DIR}",
                       help="the tokenizer files the output gets: auto (default): the adapter's when they differ "
                            "from the base's in vocabulary, added or special tokens or chat template; base; "
                            "adapter; or the tokenizer in folder DIR")
        p.add_argument("--max-shard-size", metavar="SIZE",
                       help="re-shard the output: at most SIZE bytes per shard (e.g. 5GB, 500MB, 2GiB; GB = 10^9), "
                            "named model-0000k-of-0000n.safetensors; default: the base's shard layout")
    demo = sub.add_parser("demo", help="build a tiny Qwen3-shaped model and adapter, merge and check them")
    demo.add_argument("--keep", metavar="DIR", help="build in DIR (new or empty) and keep the files; "
                      "without it they are built in a temporary folder and deleted")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    for p in (plan, merge, demo, verify):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show a traceback on errors")
    return parser, dict(sub.choices)


def main(argv: list[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at exit
        return status
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_STATUS


def _main(argv: list[str] | None) -> int:
    try:
        args = _parse(argv)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        e.parser.print_usage(sys.stderr)
        return 1
    try:
        return {"plan": _plan, "merge": _merge, "demo": _demo, "verify": _verify}[args.command](args)
    except QwenMergeError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written at the destination (rerun with --resume to continue)",
              file=sys.stderr)
        return 130


def _message(error: QwenMergeError) -> str:
    """The error's message, naming the flag where it is about an option."""
    if isinstance(error, OptionError) and error.option in FLAGS:
        return error.named(FLAGS[error.option])
    return str(error)


def _silence_stdout() -> None:
    """Python's recipe for a closed pipe: point stdout at /dev/null, so that flushing what is left of it at
    exit does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _plan(args: argparse.Namespace) -> int:
    from .merge import plan_merge
    from .report import gguf_dict, gguf_lines, render, to_dict

    plan = plan_merge(args.base, args.adapter, weights=_weights(args), force=args.force, **_options(args))
    layout = _gguf_layout(plan, args)
    if args.json:
        document = to_dict(plan)
        if args.push_to_hub:
            document["push"] = _push_figures(plan, args.push_to_hub)
        if layout is not None:
            document["gguf"] = gguf_dict(layout)
        print(json.dumps(document, indent=2))
        return 0
    text = render(plan, detail=args.detail)
    if layout is not None:  # the file replaces the folder's line
        text = "\n".join([*(line for line in text.splitlines() if not line.startswith("output:")),
                          *gguf_lines(layout, args.out)])
    print(text)
    if args.push_to_hub:
        push = _push_figures(plan, args.push_to_hub)
        print(f"push to {push['repo']}: uploads {human_bytes(push['upload_bytes'])} in one commit; disk without "
              f"OUT: {human_bytes(push['disk_bytes'])} for the output (about two shards at once), with OUT: "
              f"{human_bytes(plan.output_bytes)}")
    return 0


def _gguf_layout(plan, args: argparse.Namespace):
    """The GGUF file `plan --outtype T BASE ADAPTER out.gguf` describes, or None for a folder OUT."""
    from .ggufmerge import is_gguf, plan_gguf

    if not is_gguf(args.out):
        if args.outtype is not None:
            raise OptionError(f"applies to a GGUF output (OUT ending in .gguf), got {args.out!r}", option="outtype")
        return None
    return plan_gguf(plan, args.outtype)


def _push_figures(plan, repo_id: str) -> dict:
    """What a push of `plan` to `repo_id` uploads and the output's disk without OUT."""
    from .push import disk_needed
    from .sinks.hubrepo import check_repo_id

    check_repo_id(repo_id)
    return {"repo": repo_id, "upload_bytes": plan.output_bytes, "disk_bytes": disk_needed(plan, keep_local=False)}


def _merge(args: argparse.Namespace) -> int:
    if args.push_to_hub:
        return _push(args)
    from .merge import merge_shards

    start = time.perf_counter()
    report = merge_shards(args.base, args.adapter, args.out, weights=_weights(args), overwrite=args.overwrite,
                          progress=not args.quiet,
                          resume=args.resume, force=args.force, allow_nonfinite=args.allow_nonfinite,
                          low_disk=args.low_disk, outtype=args.outtype, **_options(args))
    if args.quiet:
        return 0
    if report.already_complete:
        print(f"{report.output}: the merge is already complete (its qwen_merge.json matches these inputs and "
              f"options); nothing to resume")
    else:
        converted = len(report.plan.conversions)
        print(f"merged {report.merged} tensors, {f'converted {converted}, ' if converted else ''}copied "
              f"{report.copied}; wrote {human_bytes(report.bytes_written)} in {len(report.files)} files to "
              f"{report.output} in {time.perf_counter() - start:.1f} s")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .push import push_merge

    if args.weights is not None:
        raise OptionError("--push-to-hub merges one adapter as it is; merge weighted adapters into OUT first",
                          option="weights")
    start = time.perf_counter()
    report = push_merge(args.base, args.adapter, args.push_to_hub, args.out, private=args.private,
                        revision=args.revision, create_pr=args.create_pr, commit_message=args.commit_message,
                        overwrite=args.overwrite, progress=not args.quiet, resume=args.resume, force=args.force,
                        allow_nonfinite=args.allow_nonfinite, low_disk=args.low_disk, **_options(args))
    if args.quiet:
        return 0
    kept = f"; kept a copy in {report.output}" if report.output else ""
    where = f"opened {report.pr_url}" if report.pr_url else f"committed {report.commit_url}"
    print(f"merged {len(report.plan.merges)} tensors, uploaded "
          f"{len(report.uploaded)} shard(s) and {where} in {time.perf_counter() - start:.1f} s{kept}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_merge

    adapter = args.adapter[0] if len(args.adapter) == 1 else args.adapter
    report = verify_merge(args.out, args.base, adapter, weights=_weights(args), full=args.full, **_options(args))
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 0 if report.ok else 1


def _weights(args: argparse.Namespace) -> list[float] | None:
    """--weights as numbers (None when not given)."""
    if args.weights is None:
        return None
    try:
        return [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise OptionError(f"{args.weights!r}: expected numbers separated by commas, one per adapter, e.g. "
                          f"0.7,0.3", option="weights") from None


def _options(args: argparse.Namespace) -> dict:
    """The merge options given on the command line, as keyword arguments of the library functions; those
    not given are None (the default, or for `verify` the value the output's manifest records)."""
    key_map = {}
    for item in args.map:
        old, sep, new = item.partition("=")
        if not sep or not old:
            raise OptionError(f"--map {item!r}: expected FROM=TO, e.g. --map model.language_model.=model.")
        key_map.setdefault(old, new)  # the first rename of a prefix applies, as in an ordered key_map
    return {"rounding": args.rounding, "key_map": key_map or None, "allow_pickle": args.allow_pickle or None,
            "dtype": args.dtype, "max_shard_size": args.max_shard_size, "tokenizer": args.tokenizer}


def _demo(args: argparse.Namespace) -> int:
    """Paths are printed only with --keep: without it the files are deleted before the user could look."""
    if args.keep:
        keep = Path(args.keep)
        if keep.exists() and not (keep.is_dir() and not any(keep.iterdir())):
            raise OutputError(f"{keep}: --keep needs a new or empty folder")
        _demo_in(keep, args.quiet, kept=True)
        print(f"the files are kept in {keep}: base/, adapter/ and merged/ (a model transformers loads)")
        return 0
    with tempfile.TemporaryDirectory(prefix="qwen-merge-demo-") as folder:
        _demo_in(Path(folder) / "demo", args.quiet, kept=False)
    print("the files were built in a temporary folder, now deleted; --keep DIR keeps them in DIR")
    return 0


def _demo_in(folder: Path, quiet: bool, kept: bool) -> None:
    from .demo import run_demo

    start = time.perf_counter()
    report, (merged, copied, off) = run_demo(folder, progress=not quiet)
    plan = report.plan
    print(f"built a {len(plan.shards)}-shard Qwen3-shaped bf16 model ({human_bytes(plan.total_size)}) and a "
          f"LoRA adapter (r=8, alpha=16, {len(plan.adapter.pairs)} modules)" + (f" in {folder}" if kept else ""))
    print(f"merged {report.merged} tensors, copied {report.copied} byte-for-byte"
          + (f" into {report.output}" if kept else ""))
    print(f"checked against a direct recomputation W + (alpha/r)*B@A: {merged} merged tensors match "
          f"({off} elements 1 ulp apart from GEMM order), {copied} untouched tensors byte-identical")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
