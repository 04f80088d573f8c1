"""The documentation is true: what README.md and docs/*.md show can be typed, run and relied on.

* Every `qwen-merge ...` command in a fenced bash block parses with the real parser (placeholders such as
  BASE, ADAPTER, OUT and DIR replaced by real paths), and its option values are accepted; the commands
  whose inputs are placeholders (no Hub repo id) run for real on the demo model and exit 0 (slow tier).
* The synopses name every flag of each command, with its real choices; flags quoted in the text exist.
* The Python examples use names the package exports, with keywords their functions take and attributes
  their results have; they run for real on the demo model, names bound to its paths (slow tier).
* Error classes named in the docs exist with the documented parents, and usage.md's table lists all.
* design.md's module table is `tests/test_layering.py`'s ALLOWED table and covers every module; its
  `module.name` references exist. Every `tests/...::test` the docs cite exists; relative links and their
  anchors resolve; the benchmark commands use flags their scripts define.

Parsing is fast; running commands or examples merges, so those tests are marked slow.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
from builders import run_python
from test_layering import ALLOWED

import qwen_merge
from qwen_merge import MergeOptions, MergePlan, MergeReport, QwenMergeError, TensorOp, VerifyReport, merge_shards
from qwen_merge.cli import _options, _parse, _parser, _UsageError, main
from qwen_merge.dtypes import DTYPE_NAMES

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {path.relative_to(ROOT).as_posix(): path.read_text() for path in DOCS}
PLACEHOLDERS = ("BASE", "B", "ADAPTER", "A", "OUT", "DIR")
EXTERNAL_FLAGS = {"--extra-index-url"}  # pip's, in the install notes


# -- reading the docs -------------------------------------------------------------------------------------


def fenced(doc: str, languages: tuple[str, ...]) -> list[str]:
    """The bodies of `doc`'s fenced code blocks in these languages."""
    return [m[2] for m in re.finditer(r"^```(\w*)\n(.*?)^```", TEXT[doc], re.S | re.M) if m[1] in languages]


def prose(doc: str) -> str:
    """`doc` without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", TEXT[doc], flags=re.S | re.M)


def logical_lines(block: str) -> list[str]:
    """A block's lines, an indented line joined to the command above it (a synopsis wrapped by hand)."""
    lines: list[str] = []
    for raw in block.splitlines():
        if raw[:1].isspace() and lines and not raw.lstrip().startswith("#"):
            lines[-1] += " " + raw.strip()
        else:
            lines.append(raw)
    return lines


def command_words(line: str) -> list[list[str]]:
    """The argument lists of the `qwen-merge` / `python -m qwen_merge` commands on a shell line (comments
    dropped, `a && b` split, leading VAR=value settings dropped)."""
    code = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]
    found = []
    for part in code.split("&&"):
        words = shlex.split(part)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words.pop(0)
        if words[:1] == ["qwen-merge"]:
            found.append(words[1:])
        elif words[:3] == ["python", "-m", "qwen_merge"]:
            found.append(words[3:])
    return found


def is_synopsis(words: list[str]) -> bool:
    return any(mark in word for word in words for mark in ("[", "{", "...", "…", "|"))


def documented_commands() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(concrete commands, synopses) of the fenced bash blocks: the command line -> the docs showing it."""
    concrete: dict[str, list[str]] = {}
    synopses: dict[str, list[str]] = {}
    for doc in TEXT:
        for block in fenced(doc, ("bash", "sh")):
            for line in logical_lines(block):
                for words in command_words(line):
                    kind = synopses if is_synopsis(words) else concrete
                    kind.setdefault(" ".join(words), []).append(doc)
    return concrete, synopses


def inline_commands() -> dict[str, list[str]]:
    """`qwen-merge ...` in inline code spans of the text (outside code blocks)."""
    found: dict[str, list[str]] = {}
    for doc in TEXT:
        for span in re.findall(r"`([^`\n]+)`", prose(doc)):
            for words in command_words(span) if span.startswith("qwen-merge") else []:
                found.setdefault(" ".join(words), []).append(doc)
    return found


CONCRETE, SYNOPSES = documented_commands()
INLINE = inline_commands()


def subcommands() -> dict[str, object]:
    return _parser()[1]


def flags_of(parser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}  # no public API


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


ALL_FLAGS = flags_of(_parser()[0]) | {flag for p in subcommands().values() for flag in flags_of(p)}


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_inputs(tmp_path_factory) -> dict[str, str]:
    """Paths for the placeholders that parsing needs to exist: an adapter folder is recognised by its
    adapter_config.json (BASE omitted); nothing is read."""
    root = tmp_path_factory.mktemp("doc-parse")
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text("{}")
    (root / "base").mkdir()
    return {"BASE": str(root / "base"), "B": str(root / "base"), "ADAPTER": str(root / "adapter"),
            "A": str(root / "adapter"), "OUT": str(root / "out"), "DIR": str(root / "dir")}


def substituted(command: str, paths: dict[str, str]) -> list[str]:
    return [paths.get(word, word) for word in shlex.split(command)]


# -- fast: commands parse, synopses are complete, flags exist ---------------------------------------------


@pytest.mark.parametrize("command", sorted(CONCRETE), ids=str)
def test_a_documented_command_parses_and_its_values_are_accepted(command, fake_inputs, capsys):
    argv = substituted(command, fake_inputs)
    if argv == ["--version"]:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0 and capsys.readouterr().out.startswith("qwen-merge ")
        return
    try:
        args = _parse(argv)
    except _UsageError as e:
        pytest.fail(f"{command!r} (in {', '.join(CONCRETE[command])}) does not parse: {e}")
    if args.command != "demo":
        MergeOptions.of(None, **_options(args))  # the documented values (--dtype, --max-shard-size, ...) are valid


@pytest.mark.parametrize("command", sorted(SYNOPSES | INLINE), ids=str)
def test_the_flags_a_synopsis_or_the_text_shows_exist_for_that_command(command):
    words = shlex.split(command)
    parsers = subcommands()
    parser = parsers.get(words[0], _parser()[0]) if words else _parser()[0]
    missing = {flag for flag in flags_in(command) if flag not in flags_of(parser) | flags_of(_parser()[0])}
    assert not missing, f"{command!r}: no such flag {sorted(missing)}"
    for flag, shown in re.findall(r"(--[a-z-]+) (\{[^}]*\})", command):
        assert shown == _choices(parser, flag), (command, flag)


def _choices(parser, flag: str) -> str:
    action = next(a for a in parser._actions if flag in a.option_strings)
    return "{" + ",".join(action.choices) + "}" if action.choices else action.metavar


def test_the_usage_synopsis_names_every_flag_of_each_command():
    block = next(b for b in fenced("docs/usage.md", ("bash",)) if "[OPTIONS]" in b)
    comments = [line for line in block.splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(comments) if line.startswith("# OPTIONS:"))
    end = next(i for i in range(start + 1, len(comments)) if re.match(r"# [A-Z]+:", comments[i]))
    options = flags_in(" ".join(comments[start:end]))
    assert "--debug" in " ".join(comments), "usage.md's synopsis no longer says where --debug goes"
    for line in logical_lines(block):
        for words in command_words(line):
            if words and words[0] in subcommands():
                shown = flags_in(line) | (options if "[OPTIONS]" in line else set())
                real = flags_of(subcommands()[words[0]]) - {"-h", "--help", "--debug"}
                assert shown == real, (f"{words[0]}: the synopsis lacks {sorted(real - shown)}, "
                                       f"shows {sorted(shown - real)}")
    for stated, choices in re.findall(r"(--[a-z-]+) (\{[^}]*\})", " ".join(comments)):
        assert choices == _choices(subcommands()["merge"], stated)
    dtypes = re.search(r"# DTYPE:(.*)", block)[1]
    words = set(re.findall(r"[A-Za-z0-9]+", dtypes.replace("BF16/F16/F32", "BF16 F16 F32"))) - {"any", "case", "also"}
    assert words == {name for stored, names in DTYPE_NAMES.items() for name in (stored, *names)}
    for word in words:
        MergeOptions(dtype=word.lower())
        MergeOptions(dtype=word.upper())


def test_the_verify_synopsis_names_every_flag_of_verify():
    block = fenced("docs/verify.md", ("bash",))[0]
    assert flags_in(block) == flags_of(subcommands()["verify"]) - {"-h", "--help"}


def test_every_flag_quoted_in_the_text_exists():
    for doc in TEXT:
        spans = [span for span in re.findall(r"`([^`\n]+)`", prose(doc))
                 if not span.startswith(("python benchmarks/", "pip ", "hf "))]  # other programs' flags
        unknown = {flag for span in spans for flag in flags_in(span)} - ALL_FLAGS - EXTERNAL_FLAGS
        assert not unknown, f"{doc}: no such flag {sorted(unknown)}"


def test_the_commands_are_found():
    """The extraction above still sees the docs' commands: a change of layout must not make these tests vacuous."""
    assert {"plan BASE ADAPTER", "merge BASE ADAPTER OUT", "merge ADAPTER OUT", "verify OUT --base BASE --adapter "
            "ADAPTER", "merge BASE ADAPTER OUT --dtype bfloat16", "merge BASE ADAPTER OUT --max-shard-size 2GB",
            "demo"} <= CONCRETE.keys()
    assert {"plan BASE ADAPTER --json", "plan ADAPTER"} <= INLINE.keys()
    assert any(c.startswith("verify OUT") for c in SYNOPSES) and any(c.startswith("plan [BASE]") for c in SYNOPSES)


# -- fast: the Python examples use real names ---------------------------------------------------------------

RETURNS = {"plan_merge": MergePlan, "merge_shards": MergeReport, "verify_merge": VerifyReport}
ELEMENTS = {(MergePlan, "merges"): TensorOp, (MergePlan, "ops"): TensorOp}


WITH_PYTHON = [doc for doc in TEXT if fenced(doc, ("python",))]


@pytest.mark.parametrize("doc", WITH_PYTHON)
def test_the_python_examples_use_exported_names_keywords_and_attributes(doc):
    """A doc's blocks in order: a later block may use the names an earlier one imported."""
    names: dict[str, object] = {}
    kinds: dict[str, type] = {}
    for source in fenced(doc, ("python",)):
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "qwen_merge":
                for alias in node.names:
                    names[alias.name] = _exported(alias.name)
        assert names, f"{doc}: a Python example that imports nothing from qwen_merge"
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                if (kind := _kind(node.value, kinds)) is not None:
                    kinds[node.targets[0].id] = kind
            if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
                if isinstance(node.iter, ast.Attribute) and (kind := _kind(node.iter.value, kinds)) is not None:
                    if (element := ELEMENTS.get((kind, node.iter.attr))) is not None:
                        kinds[node.target.id] = element
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (function := _function(node.func, names)) is not None:
                try:
                    inspect.signature(function).bind(*[None] * len(node.args),
                                                     **{k.arg: None for k in node.keywords if k.arg})
                except TypeError as e:
                    pytest.fail(f"{doc}: {ast.unparse(node)}: {e}")
            if isinstance(node, ast.Attribute) and (kind := _kind(node.value, kinds)) is not None:
                assert hasattr(kind, node.attr), f"{doc}: {ast.unparse(node)}: {kind.__name__} has no {node.attr!r}"


def _exported(name: str) -> object:
    try:
        return getattr(qwen_merge, name)
    except AttributeError:
        return importlib.import_module(f"qwen_merge.{name}")  # `from qwen_merge import report`: a module


def _function(node: ast.expr, names: dict[str, object]) -> object | None:
    if isinstance(node, ast.Name):
        value = names.get(node.id)
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and inspect.ismodule(
            names.get(node.value.id)):
        value = getattr(names[node.value.id], node.attr)  # report.render(...)
    else:
        return None
    return value if callable(value) else None


def _kind(node: ast.expr, kinds: dict[str, type]) -> type | None:
    if isinstance(node, ast.Name):
        return kinds.get(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return RETURNS.get(node.func.id)
    return None


def test_the_plan_attributes_named_in_the_text_exist():
    for doc, text in TEXT.items():
        for attribute in re.findall(r"`plan\.(?!py\b)(\w+)", text):
            assert hasattr(MergePlan, attribute), f"{doc}: MergePlan has no {attribute!r}"


# -- fast: error classes ----------------------------------------------------------------------------------


def test_the_error_classes_named_exist_with_their_documented_parents():
    builtin = {"NotImplementedError"}  # PEFT's, in peft-coverage.md
    for doc, text in TEXT.items():
        for name in set(re.findall(r"`(\w+Error)`", text)) - builtin:
            assert issubclass(getattr(qwen_merge, name), QwenMergeError), (doc, name)
        # "`A` (a `B`)", "`A`, `B` (each a `C`)"
        for names, parent in re.findall(r"((?:`\w+Error`,? )+)\((?:each )?an? `(\w+Error)`", text):
            for name in re.findall(r"`(\w+Error)`", names):
                assert issubclass(getattr(qwen_merge, name), getattr(qwen_merge, parent)), (doc, name, parent)


def test_the_usage_error_table_lists_every_error_class():
    table = re.search(r"\| class \| raised when \|\n(.*?)\n\n", TEXT["docs/usage.md"], re.S)[1]
    listed = set(re.findall(r"^\| `(\w+)`", table, re.M))
    exported = {name for name in qwen_merge.__all__ if name.endswith("Error")} - {"QwenMergeError"}
    assert listed == exported


# -- fast: design.md, test names, links, benchmark commands -----------------------------------------------


def test_the_design_module_table_is_the_layering_table():
    table = re.search(r"\| module \| concern \| imports from the package \|\n\|.*?\n(.*?)\n\n",
                      TEXT["docs/design.md"], re.S)[1]
    documented: dict[str, set[str]] = {}
    for row in table.splitlines():
        modules, _, imports = [cell.strip() for cell in row.strip("|").split(" | ")]
        plain = re.sub(r"\([^)]*\)", "", imports).replace("—", "")
        for module in re.findall(r"`([\w/]+)\.py`", modules):
            documented[module.replace("/", ".")] = {word.strip() for word in plain.split(",") if word.strip()}
    package = ROOT / "qwen_merge"
    existing = {".".join(path.relative_to(package).with_suffix("").parts) for path in package.rglob("*.py")}
    assert documented.keys() == existing == ALLOWED.keys()
    for module, imports in documented.items():
        assert imports == ALLOWED[module], f"design.md's row of {module}: {sorted(imports ^ ALLOWED[module])} differ"


def test_the_design_thread_table_names_every_thread_a_merge_starts(demo_inputs, tmp_path):
    """Every thread a merge starts (recorded in a fresh interpreter, so the torch import starts one too), the
    Hub download thread and the read-ahead (large reads only), has its row in design.md's thread table, and the table names no other."""
    code = ("import sys, threading\n"
            "names = []\nstart = threading.Thread.start\n"
            "def recording(self):\n    names.append(self.name)\n    return start(self)\n"
            "threading.Thread.start = recording\n"
            "from qwen_merge import merge_shards\n"
            "merge_shards(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)\n"
            "merge_shards(sys.argv[1], sys.argv[2], sys.argv[3] + '.gguf', progress=False)\n"  # the GGUF sink's
            "print(' '.join(names))\n")
    done = run_python(code, *demo_inputs, tmp_path / "out", capture_output=True, text=True, check=True)
    started = {re.sub(r"_\d+$", "", name) for name in done.stdout.split() if name.startswith("qwen-merge-")}
    started |= {"qwen-merge-download",  # a Hub base only (tests/test_hub.py merges from one)
                "qwen-merge-read"}  # reads over 1 MiB only: the demo's tensors are smaller
    table = re.search(r"\| thread \| does \| why a thread \|\n\|.*?\n(.*?)\n\n", TEXT["docs/design.md"], re.S)[1]
    documented = set(re.findall(r"`(qwen-merge-[\w-]+)`", table))
    assert {"qwen-merge-assemble", "qwen-merge-disk", "qwen-merge-import"} <= started
    assert started == documented


def test_the_design_module_references_exist():
    package = ROOT / "qwen_merge"
    modules = {path.stem: ".".join(path.relative_to(package).with_suffix("").parts)  # a module by its own name
               for path in package.rglob("*.py") if path.stem not in ("__main__", "__init__")}
    text = TEXT["docs/design.md"]
    for module, name in re.findall(r"(?<![\w./-])([a-z_]+)\.([A-Za-z_]\w*)", text):
        if module in modules and name not in ("py", "md"):
            found = importlib.import_module(f"qwen_merge.{modules[module]}")
            assert hasattr(found, name), f"design.md: {module}.{name}"


def test_every_test_the_docs_name_exists():
    functions: dict[str, set[str]] = {}
    named = 0
    for doc, text in TEXT.items():
        for file, test, case in re.findall(r"tests/(\w+\.py)(?:::(\w+))?(?:\[([^\]]*)\])?", text):
            path = ROOT / "tests" / file
            assert path.is_file(), f"{doc}: tests/{file} does not exist"
            if file not in functions:
                tree = ast.parse(path.read_text())
                functions[file] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            if test:
                named += 1
                assert test in functions[file], f"{doc}: tests/{file}::{test} does not exist"
            if case and case != "*":
                assert repr(case) in path.read_text() or f'"{case}"' in path.read_text(), (doc, file, case)
        for case in re.findall(r"`\[(\w+)\]`", text) if doc == "docs/guarantees.md" else []:  # more cases
            assert any(f'"{case}"' in path.read_text() for path in (ROOT / "tests").glob("*.py")), (doc, case)
    assert named >= 40  # guarantees.md's map


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_relative_links_and_their_anchors_resolve():
    anchors = {doc: {_slug(heading) for heading in re.findall(r"^#+ (.*)$", prose(doc), re.M)} for doc in TEXT}
    for doc, text in TEXT.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (Path(doc).parent / file).as_posix() if file else doc
            linked = Path(linked).as_posix().replace("docs/../", "")
            assert (ROOT / linked).exists(), f"{doc}: link to {target}: no such file"
            if anchor:
                assert anchor in anchors.get(linked, set()), f"{doc}: link to {target}: no such heading"


def test_the_benchmark_commands_use_flags_their_scripts_define():
    seen = 0
    for doc in TEXT:
        for block in fenced(doc, ("bash", "sh")):
            for line in block.splitlines():
                words = shlex.split(re.split(r"(?:^|\s)#", line, maxsplit=1)[0])
                if words[:2] and words[0] == "python" and words[1].startswith("benchmarks/"):
                    source = (ROOT / words[1]).read_text()
                    seen += 1
                    for flag in flags_in(line):
                        assert f'"{flag}"' in source, f"{doc}: {words[1]} has no {flag}"
    assert seen >= 8


# -- slow: the commands and the examples, for real on the demo model --------------------------------------


@pytest.fixture
def demo_paths(demo_inputs, tmp_path, monkeypatch) -> dict[str, str]:
    """The placeholders bound to the demo model; the current folder is the one holding base/ and adapter/,
    where the adapter's base_model_name_or_path ("base") points (BASE omitted)."""
    base, adapter = demo_inputs
    monkeypatch.chdir(base.parent)
    return {"BASE": str(base), "B": str(base), "ADAPTER": str(adapter), "A": str(adapter),
            "OUT": str(tmp_path / "out"), "DIR": str(tmp_path / "dir")}


def _runnable(command: str) -> bool:
    """Every input and output is a placeholder (no Hub repo id, no other folder name)."""
    words = shlex.split(command)
    if not words or words[0].startswith("-"):  # --version, --help: they print and exit while parsing
        return False
    try:
        args = _parser()[0].parse_known_args(words)[0]
    except _UsageError:  # a command named in the text, without its arguments
        return False
    values = [getattr(args, name, None) for name in ("base", "adapter", "out", "keep")]
    values = [v for value in values for v in (value if isinstance(value, list) else [value])]  # --adapter repeats
    return all(value in (None, *PLACEHOLDERS) for value in values)


RUNNABLE = sorted(c for c in CONCRETE | INLINE if not is_synopsis(shlex.split(c)) and _runnable(c))


@pytest.mark.slow
@pytest.mark.parametrize("command", RUNNABLE, ids=str)
def test_a_documented_command_runs_on_the_demo_model(command, demo_paths, capsys):
    argv = substituted(command, demo_paths)
    if argv[0] == "verify":
        base, adapter = demo_paths["BASE"], demo_paths["ADAPTER"]
        merge_shards(base, adapter, demo_paths["OUT"], progress=False)
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 0, f"{command}: exit {status}\n{captured.err}"
    assert "Traceback" not in captured.err
    if argv[0] == "merge":
        assert (Path(demo_paths["OUT"]) / "qwen_merge.json").is_file()
    elif argv[0] == "verify":
        assert captured.out.startswith("verify: OK"), captured.out
    elif "--json" in argv:
        assert json.loads(captured.out)["totals"]["merged"] == 28
    elif argv[0] == "plan":
        assert "merged:  28 tensors" in captured.out, captured.out


def test_the_commands_run_include_every_kind():
    """plan, plan --json, merge, BASE omitted, --dtype, --max-shard-size, verify and demo: found as runnable."""
    assert {"plan BASE ADAPTER", "plan BASE ADAPTER --json", "merge BASE ADAPTER OUT", "merge ADAPTER OUT",
            "plan ADAPTER", "merge BASE ADAPTER OUT --dtype bfloat16", "merge BASE ADAPTER OUT --max-shard-size 2GB",
            "verify OUT --base BASE --adapter ADAPTER", "demo"} <= set(RUNNABLE)


# The names the Python examples use for their inputs and outputs, and what each stands for on the demo model.
EXAMPLE_PATHS = {"Qwen3-4B": "base", "Qwen3-VL-8B": "base", "my-lora": "adapter", "Qwen3-4B-merged": "out",
                 "merged": "out2", "Qwen3-4B-merged.gguf": "gguf"}


class _Writer:
    """`writer` of usage.md's converter example."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, name: str, tensor) -> None:
        self.names.append(name)


@pytest.mark.slow
@pytest.mark.parametrize("doc", WITH_PYTHON)
def test_the_python_examples_run_on_the_demo_model(doc, demo_inputs, tmp_path, monkeypatch, capsys):
    """A doc's Python blocks run in order in one namespace (a later block uses an earlier one's imports),
    each with its own output folders, the example names bound to the demo model's paths."""
    base, adapter = demo_inputs
    monkeypatch.chdir(base.parent)  # the adapter names "base": BASE omitted
    namespace: dict[str, object] = {"writer": _Writer()}
    for index, source in enumerate(fenced(doc, ("python",))):
        folder = tmp_path / f"block{index}"
        folder.mkdir()
        paths = {"base": base, "adapter": adapter, "out": folder / "out", "out2": folder / "out2",
                 "gguf": folder / "out.gguf"}

        def bind(m: re.Match) -> str:
            return repr(str(paths[EXAMPLE_PATHS[m[1]]]))

        pattern = "|".join(re.escape(name) for name in sorted(EXAMPLE_PATHS, key=len, reverse=True))
        code = re.sub(rf"\"({pattern})\"", bind, source)
        if "verify_merge(" in code and "merge_shards(" not in code:  # verify.md checks a merge made before
            merge_shards(base, adapter, paths["out"], progress=False)
        exec(compile(code, f"{doc} python block {index}", "exec"), namespace)
    capsys.readouterr()
    if doc == "docs/usage.md":
        assert namespace["writer"].names, "the converter example yielded no tensors"
