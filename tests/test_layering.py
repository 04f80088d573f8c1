"""Imports go in one direction; torch stays on its side of the line; only a few modules read tensor bytes.

The package is a pipeline: `inputs` (what is on disk or on the Hub) -> `planning` (headers to a frozen plan)
-> `compute` (the plan's pieces, and the arithmetic) -> `sinks` (where the bytes go). Beside them, a few
top-level modules are the vocabulary every folder uses (CORE), and the rest are entry points above all four.

* A folder imports only the folders before it in the pipeline (FOLDER_IMPORTS) and the CORE modules; a CORE
  module imports only CORE modules.
* Each module may import only the package modules listed in ALLOWED (imports under `if TYPE_CHECKING:`
  are for annotations and do not count; a deferred import inside a function does).
* The imports form no circle, deferred ones included: neither the modules' actual imports nor ALLOWED.
* torch is imported at module level only by the modules that compute (TORCH_AT_IMPORT); everything
  else plans, copies and writes bytes without it, and `import qwen_merge` does not load it.
* Tensor bytes are read only through `inputs.sources` (positioned reads into owned buffers), by the modules
  in BYTE_READERS: the planner decides from headers and JSON alone.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import qwen_merge
from builders import run_python

PACKAGE = Path(qwen_merge.__file__).parent
CORE = {"errors", "version", "units", "dtypes", "files", "options", "progress"}
FOLDER_IMPORTS = {  # folder -> the folders it may import: each one only those before it in the pipeline
    "inputs": set(),
    "planning": {"inputs"},
    "compute": {"inputs", "planning"},
    "sinks": {"inputs", "planning", "compute"},
}
ALLOWED = {
    "errors": set(),
    "version": set(),
    "units": set(),
    "dtypes": set(),
    "files": {"errors"},
    "options": {"dtypes", "errors", "units"},
    "progress": {"units"},
    "inputs.__init__": set(),
    "inputs.tensorfile": {"dtypes", "errors"},
    "inputs.architectures": set(),
    "inputs.checkpoint": {"errors", "files", "inputs.tensorfile"},
    "inputs.adapter": {"dtypes", "errors", "files", "inputs.checkpoint", "inputs.tensorfile"},
    "inputs.digest": set(),
    "inputs.hub": {"errors", "files", "inputs.checkpoint", "inputs.tensorfile"},
    "inputs.basemodel": {"errors", "files", "inputs.adapter", "inputs.checkpoint", "inputs.hub"},
    "inputs.pickled": {"errors", "files", "inputs.adapter"},
    "inputs.sources": {"dtypes", "errors", "inputs.tensorfile"},
    "inputs.bnb4": {"errors", "inputs.checkpoint", "inputs.hub", "inputs.sources"},
    "planning.__init__": set(),
    "planning.names": {"errors", "inputs.architectures"},
    "planning.recipe": {"errors", "inputs.adapter", "inputs.tensorfile"},
    "planning.ties": {"inputs.tensorfile", "planning.recipe"},
    "planning.experts": {"errors", "inputs.adapter", "inputs.tensorfile"},
    "planning.targets": {"errors", "files", "inputs.adapter", "inputs.architectures", "inputs.tensorfile",
                         "planning.experts"},
    "planning.quant": {"dtypes", "errors", "inputs.tensorfile", "planning.recipe"},
    "planning.layout": {"dtypes", "files", "inputs.tensorfile"},
    "planning.gguflayout": {"dtypes", "errors", "planning.ggufmeta", "planning.plan"},
    "planning.memory": {"dtypes", "inputs.digest", "inputs.sources"},
    "planning.tokenizer": {"errors", "inputs.digest"},
    "planning.ggufmeta": {"errors", "files"},
    "planning.manifest": {"errors", "files", "inputs.checkpoint", "inputs.digest", "planning.tokenizer", "version"},
    "planning.plan": {"dtypes", "errors", "files", "inputs.adapter", "inputs.checkpoint", "inputs.tensorfile",
                      "options", "planning.experts", "planning.layout", "planning.manifest", "planning.memory",
                      "planning.names", "planning.quant", "planning.recipe", "planning.targets", "planning.ties"},
    "planning.fetchplan": {"planning.plan"},
    "compute.__init__": set(),
    "compute.pieces": {"inputs.sources", "inputs.tensorfile", "planning.memory", "planning.plan"},
    "compute.arithmetic": set(),
    "compute.blockquant": set(),
    "compute.bnb4dequant": set(),
    "compute.ggufquant": {"compute.arithmetic", "dtypes", "errors", "planning.gguflayout"},
    "compute.stream": {"compute.arithmetic", "compute.blockquant", "compute.bnb4dequant", "compute.pieces", "dtypes",
                       "errors", "inputs.adapter", "inputs.sources", "inputs.tensorfile", "planning.plan",
                       "planning.quant", "planning.recipe"},
    "sinks.__init__": set(),
    "sinks.output": {"errors", "files", "units"},
    "sinks.resume": {"errors", "files", "planning.manifest", "sinks.output"},
    "sinks.base": {"compute.pieces"},
    "sinks.folder": {"errors", "files", "planning.manifest", "planning.memory", "progress", "sinks.output",
                     "sinks.resume", "sinks.writer"},
    "sinks.card": {"version"},
    "sinks.gguf": {"compute.ggufquant", "compute.pieces", "errors", "inputs.sources", "inputs.tensorfile",
                   "planning.ggufmeta", "planning.gguflayout", "planning.memory", "progress", "sinks.base",
                   "sinks.ggufheader", "sinks.output", "sinks.resume", "sinks.scatter"},
    "sinks.ggufheader": set(),
    "sinks.scatter": {"sinks.writer"},
    "sinks.hubrepo": {"errors", "files", "inputs.hub", "planning.manifest", "planning.memory", "sinks.output"},
    "sinks.tensors": {"compute.arithmetic", "compute.pieces", "errors", "inputs.sources"},
    "sinks.writer": {"compute.pieces", "errors", "inputs.sources", "planning.memory", "sinks.output", "sinks.resume"},
    "run": {"compute.arithmetic", "compute.pieces", "compute.stream", "errors", "files", "inputs.adapter",
            "inputs.basemodel", "inputs.bnb4", "inputs.checkpoint", "inputs.digest", "inputs.hub", "inputs.pickled",
            "inputs.sources", "inputs.tensorfile", "options", "planning.fetchplan", "planning.manifest",
            "planning.plan", "planning.recipe", "planning.tokenizer", "progress", "sinks.base", "sinks.output",
            "units"},
    "merge": {"errors", "ggufmerge", "options", "planning.manifest", "planning.plan", "run", "sinks.folder",
              "sinks.output", "sinks.tensors"},
    "ggufmerge": {"errors", "options", "planning.ggufmeta", "planning.gguflayout", "planning.manifest",
                  "planning.plan", "run", "sinks.gguf", "sinks.output", "sinks.resume"},
    "report": {"inputs.adapter", "inputs.checkpoint", "options", "planning.fetchplan", "planning.gguflayout",
               "planning.manifest", "planning.plan", "planning.recipe", "units", "version"},
    "verify": {"compute.pieces", "dtypes", "errors", "files", "inputs.sources", "inputs.tensorfile", "options",
               "planning.manifest", "planning.plan", "planning.ties", "run", "units"},
    "push": {"files", "inputs.hub", "merge", "options", "planning.manifest", "planning.plan", "run", "sinks.card",
             "sinks.folder", "sinks.hubrepo", "sinks.output"},
    "demo": {"files", "merge"},
    "cli": {"demo", "dtypes", "errors", "ggufmerge", "inputs.basemodel", "merge", "push", "report", "sinks.hubrepo",
            "units", "verify", "version"},
    "__main__": {"cli"},
    "__init__": {"version"},  # the public names are imported on first use
}
TORCH_AT_IMPORT = {"compute.arithmetic", "compute.blockquant", "compute.bnb4dequant", "compute.ggufquant",
                   "compute.stream", "inputs.pickled", "demo"}
BYTE_READERS = {"inputs.sources", "inputs.bnb4", "compute.pieces", "compute.stream", "sinks.writer", "sinks.tensors",
                "sinks.gguf", "run", "verify"}


def _folder(module: str) -> str:
    """"planning" for "planning.plan"; "" for a top-level module."""
    return module.split(".")[0] if "." in module else ""


def _package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name below it: "merge", "planning.plan", "sinks.__init__"."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: Mapping[str, Path]) -> tuple[set[str], set[str], set[str]]:
    """(package modules imported anywhere, external modules imported at module level, external anywhere),
    leaving out `if TYPE_CHECKING:` blocks. `from ..inputs import hub` counts as "inputs.hub"."""
    package, top, anywhere = set(), set(), set()
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
               for n in ast.walk(node)}
    module_level = {id(n) for n in tree.body}
    here = name.split(".")[:-1]  # the package the module is in, below qwen_merge
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: set[str] = set()
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            for alias in node.names:
                dotted = ".".join([*base, alias.name])
                package.add(dotted if dotted in modules else ".".join(base) or "__init__")
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        anywhere |= names
        if id(node) in module_level:
            top |= names
    return package, top, anywhere


def _reads_from_sources(path: Path) -> bool:
    """Whether the module imports anything but constants (the buffer sizes the memory model counts) from
    `inputs.sources`, the module that reads tensor bytes."""
    tree = ast.parse(path.read_text())
    annotations = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for n in ast.walk(node)}
    return any(isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("sources")
               and id(node) not in annotations and not all(alias.name.isupper() for alias in node.names)
               for node in ast.walk(tree))


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """A circle in `graph` (module -> the modules it imports) as [a, b, ..., a], or None when there is none."""
    done: set[str] = set()
    path: list[str] = []  # the depth-first walk's current chain of imports

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if found := visit(child):
                return found
        path.pop()
        done.add(node)
        return None

    return next((found for node in sorted(graph) if (found := visit(node))), None)


def test_the_cycle_finder_finds_a_circle_and_names_it():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}) is None  # a diamond is no circle
    assert find_cycle({"plan": {"report"}, "report": {"fetchplan"}, "fetchplan": {"plan"}, "cli": {"plan"}}) == [
        "plan", "report", "fetchplan", "plan"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_imports_form_no_circle():
    """Deferred imports inside functions count: they hide a circle from Python's import machinery, not
    from the design."""
    modules = _package_modules()
    actual = {name: _imports(name, path, modules)[0] for name, path in modules.items()}
    cycle = find_cycle(actual)
    assert cycle is None, f"the package's imports form a circle: {' -> '.join(cycle)}"
    cycle = find_cycle(ALLOWED)
    assert cycle is None, f"ALLOWED permits a circle: {' -> '.join(cycle)}"


def test_each_folder_imports_only_the_folders_before_it():
    """inputs -> planning -> compute -> sinks, each importing only what comes before it and the CORE
    vocabulary; the CORE modules import only each other."""
    modules = _package_modules()
    assert CORE == {name for name in modules if not _folder(name) and name in CORE}, "a CORE module is missing"
    for name, path in modules.items():
        imported = _imports(name, path, modules)[0]
        folder = _folder(name)
        if name in CORE:
            assert imported <= CORE, f"{name} is CORE but imports {sorted(imported - CORE)}"
        elif folder:
            may = FOLDER_IMPORTS[folder] | {folder}
            wrong = {m for m in imported if m not in CORE and _folder(m) not in may}
            assert not wrong, f"{name} ({folder}) imports {sorted(wrong)}, outside {sorted(may)} and CORE"
    assert find_cycle(FOLDER_IMPORTS) is None


def test_every_module_is_listed_and_imports_only_downward():
    modules = _package_modules()
    assert set(modules) == set(ALLOWED)
    for name, path in modules.items():
        package, top, _ = _imports(name, path, modules)
        assert package <= ALLOWED[name], f"{name} imports {package - ALLOWED[name]}"
        if name not in TORCH_AT_IMPORT:
            assert "torch" not in top, f"{name} imports torch at import time"
        if name not in BYTE_READERS:
            assert not _reads_from_sources(path) and "numpy" not in top, f"{name} reads tensor bytes"


def test_planning_and_importing_do_not_load_torch(zoo):
    """`import qwen_merge`, `plan_merge` and the CLI's --help run without torch, and local inputs without
    huggingface_hub."""
    code = ("import sys, qwen_merge; from qwen_merge.report import render, to_dict; "
            f"plan = qwen_merge.plan_merge({str(zoo.base('qwen_bf16'))!r}, {str(zoo.adapter('basic'))!r}); "
            "render(plan); to_dict(plan); assert plan.merges; "
            "from qwen_merge.cli import main; "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert 'huggingface_hub' not in sys.modules, 'huggingface_hub was imported for local inputs'")
    run_python(code, check=True)


def test_test_subprocesses_start_through_the_builders_helpers():
    """A test that starts Python itself (`sys.executable`) bypasses `builders.cli_env()`: its child imports
    whichever qwen_merge is installed, or none, instead of this checkout's. Only builders.py may name it."""
    tests = Path(__file__).parent
    offenders = [path.name for path in sorted(tests.glob("*.py")) if path.name != "builders.py"
                 and any(isinstance(node, ast.Attribute) and node.attr == "executable"
                         and isinstance(node.value, ast.Name) and node.value.id == "sys"
                         for node in ast.walk(ast.parse(path.read_text())))]
    assert offenders == [], f"start Python through builders.run_python / cli_argv instead: {offenders}"
