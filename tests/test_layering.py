"""Imports go in one direction. Each module may import only the package modules listed here."""

from __future__ import annotations

import ast
from pathlib import Path

import qwen_merge

ALLOWED = {
    "errors": set(),
    "tensorfile": {"errors"},
    "checkpoint": {"errors", "tensorfile"},
    "adapter": {"errors", "tensorfile", "checkpoint"},
    "architectures": set(),
    "names": {"errors", "architectures"},
    "ties": {"errors"},
    "experts": {"errors", "tensorfile", "adapter"},
    "plan": {"errors", "tensorfile", "checkpoint", "adapter", "names", "ties", "experts", "architectures", "units"},
    "compute": set(),
    "stream": {"errors", "tensorfile", "adapter", "plan", "compute"},
    "units": set(),
    "progress": {"units"},
    "output": {"errors", "compute", "stream", "units"},
    "pickled": {"errors", "adapter"},
    "manifest": {"errors", "checkpoint", "plan", "output"},
    "merge": {"errors", "tensorfile", "checkpoint", "adapter", "plan", "compute", "stream", "output", "pickled",
              "manifest", "progress", "units"},
    "demo": {"merge"},
    "verify": {"errors", "tensorfile", "checkpoint", "plan", "stream", "compute", "merge", "ties", "units"},
    "cli": {"errors", "merge", "demo", "verify", "units"},
    "__main__": {"cli"},
    "__init__": {"errors", "merge", "plan", "manifest", "verify"},
}
TORCH_FREE = {"architectures", "errors", "tensorfile", "checkpoint", "adapter", "names", "ties", "experts", "plan", "units", "progress"}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    package, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level and node.module is None:
            package.update(a.name for a in node.names)  # from . import x
        elif isinstance(node, ast.ImportFrom) and node.level:
            package.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            external.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            external.update(a.name.split(".")[0] for a in node.names)
    return package, external


def test_every_module_is_listed_and_imports_only_downward():
    folder = Path(qwen_merge.__file__).parent
    modules = {p.stem: p for p in folder.glob("*.py")}
    assert set(modules) == set(ALLOWED)
    for name, path in modules.items():
        package, external = _imports(path)
        assert package <= ALLOWED[name], f"{name} imports {package - ALLOWED[name]}"
        if name in TORCH_FREE:
            assert "torch" not in external, f"{name} must plan without torch"
