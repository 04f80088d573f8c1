"""Imports go in one direction; torch stays on its side of the line; only a few modules read tensor bytes.

* Each module may import only the package modules listed in ALLOWED (imports under `if TYPE_CHECKING:`
  are for annotations and do not count; a deferred import inside a function does).
* The imports form no circle, deferred ones included: neither the modules' actual imports nor ALLOWED.
* torch is imported at module level only by the modules that compute (TORCH_AT_IMPORT); everything
  else plans, copies and writes bytes without it, and `import qwen_merge` does not load it.
* Tensor bytes are read only through `sources` (positioned reads into owned buffers), by the modules in
  BYTE_READERS: the planner decides from headers and JSON alone.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import qwen_merge
from builders import run_python

ALLOWED = {
    "errors": set(),
    "version": set(),
    "units": set(),
    "architectures": set(),
    "options": {"errors", "units"},
    "tensorfile": {"errors"},
    "checkpoint": {"errors", "tensorfile"},
    "adapter": {"errors", "tensorfile", "checkpoint"},
    "names": {"errors", "architectures"},
    "recipe": {"adapter", "tensorfile"},
    "ties": {"recipe", "tensorfile"},
    "experts": {"errors", "tensorfile", "adapter"},
    "targets": {"adapter", "architectures", "errors", "experts", "tensorfile"},
    "quant": {"errors", "recipe", "tensorfile"},
    "layout": {"checkpoint", "tensorfile"},
    "memory": {"tensorfile"},
    "report": {"adapter", "checkpoint", "fetchplan", "manifest", "options", "recipe", "units", "version"},
    "plan": {"errors", "tensorfile", "checkpoint", "adapter", "names", "ties", "experts", "targets", "memory",
             "options", "recipe", "quant", "layout", "manifest"},
    "sources": {"errors", "memory", "tensorfile"},
    "hub": {"checkpoint", "errors", "tensorfile"},
    "tokenizer": {"errors", "output"},
    "basemodel": {"adapter", "checkpoint", "errors", "hub"},
    "fetchplan": {"plan"},
    "pieces": {"memory", "plan", "sources", "tensorfile"},
    "compute": set(),
    "blockquant": set(),
    "stream": {"adapter", "blockquant", "compute", "errors", "pieces", "plan", "quant", "recipe", "sources",
               "tensorfile"},
    "output": {"errors", "memory", "units"},
    "manifest": {"checkpoint", "errors", "output", "tokenizer", "version"},
    "writer": {"checkpoint", "errors", "manifest", "memory", "output", "pieces", "sources"},
    "progress": {"units"},
    "pickled": {"errors", "adapter"},
    "merge": {"adapter", "basemodel", "checkpoint", "compute", "errors", "fetchplan", "hub", "manifest", "memory",
              "options", "output", "pickled",
              "pieces", "plan", "progress", "sources", "stream", "tensorfile", "tokenizer", "units", "writer"},
    "demo": {"merge"},
    "verify": {"checkpoint", "errors", "fetchplan", "manifest", "merge", "options", "pieces", "plan", "sources",
               "tensorfile", "ties", "units"},
    "cli": {"basemodel", "errors", "merge", "demo", "options", "report", "verify", "units", "version"},
    "__main__": {"cli"},
    "__init__": {"version"},  # the public names are imported on first use
}
TORCH_AT_IMPORT = {"compute", "blockquant", "stream", "pickled", "demo"}
BYTE_READERS = {"sources", "pieces", "stream", "writer", "merge", "verify"}


def _imports(path: Path) -> tuple[set[str], set[str], set[str]]:
    """(package modules imported anywhere, external modules imported at module level, external anywhere),
    leaving out `if TYPE_CHECKING:` blocks."""
    package, top, anywhere = set(), set(), set()
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
               for n in ast.walk(node)}
    module_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: set[str] = set()
        if isinstance(node, ast.ImportFrom) and node.level and node.module is None:
            package.update(a.name for a in node.names)  # from . import x
        elif isinstance(node, ast.ImportFrom) and node.level:
            package.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        anywhere |= names
        if id(node) in module_level:
            top |= names
    return package, top, anywhere


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


def _package_modules() -> dict[str, Path]:
    return {p.stem: p for p in Path(qwen_merge.__file__).parent.glob("*.py")}


def test_the_cycle_finder_finds_a_circle_and_names_it():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}) is None  # a diamond is no circle
    assert find_cycle({"plan": {"report"}, "report": {"fetchplan"}, "fetchplan": {"plan"}, "cli": {"plan"}}) == [
        "plan", "report", "fetchplan", "plan"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_imports_form_no_circle():
    """Deferred imports inside functions count: they hide a circle from Python's import machinery, not
    from the design."""
    actual = {name: _imports(path)[0] for name, path in _package_modules().items()}
    cycle = find_cycle(actual)
    assert cycle is None, f"the package's imports form a circle: {' -> '.join(cycle)}"
    cycle = find_cycle(ALLOWED)
    assert cycle is None, f"ALLOWED permits a circle: {' -> '.join(cycle)}"


def test_every_module_is_listed_and_imports_only_downward():
    modules = _package_modules()
    assert set(modules) == set(ALLOWED)
    for name, path in modules.items():
        package, top, _ = _imports(path)
        assert package <= ALLOWED[name], f"{name} imports {package - ALLOWED[name]}"
        if name not in TORCH_AT_IMPORT:
            assert "torch" not in top, f"{name} imports torch at import time"
        if name not in BYTE_READERS:
            assert "sources" not in package and "numpy" not in top, f"{name} reads tensor bytes"


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
