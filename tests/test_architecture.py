"""The package's architecture as a test: subpackages in floors, every import pointing down.

The import graph counts every import statement, those inside functions too (a cycle hidden in a
function-level import is still a cycle), and leaves out `if TYPE_CHECKING:` blocks (annotations
only). It must have no cycle between modules, and an import from one subpackage into another must
go to a lower floor (siblings on one floor know nothing of each other). Only entry points stay flat
in the package folder."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flexgen_dist"
# bottom to top; subpackages on one floor may not import each other
FLOORS = [("core",), ("kernels", "system"), ("models", "dist", "formats"), ("storage",), ("runtime",),
          ("engine", "planning"), ("cli",)]
MAX_FLAT = 6  # entry points (`python -m flexgen_dist.run`, ...) beside the package's __init__
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 250


def modules(root: Path) -> dict[str, Path]:
    """Dotted name (package-relative, '' for the root) -> file, packages by their __init__."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return skip


def _imported(node: ast.AST, module: str, is_package: bool, package: str) -> list[str]:
    """Package-relative dotted names an import statement names (module, and module.symbol)."""
    if isinstance(node, ast.Import):
        return [a.name.removeprefix(package + ".") for a in node.names
                if a.name == package or a.name.startswith(package + ".")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if module else []
        base = base if is_package else base[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    elif node.module and (node.module == package or node.module.startswith(package + ".")):
        target = node.module.removeprefix(package).lstrip(".")
    else:
        return []
    return [target] + [f"{target}.{a.name}".lstrip(".") for a in node.names]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of this package it imports (a symbol counts as its module)."""
    mods, package = modules(root), root.name
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            for name in _imported(node, m, path.name == "__init__.py", package):
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != m:
                    graph[m].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def floor_violations(graph: dict[str, set[str]], floors=FLOORS) -> list[str]:
    """Imports from a subpackage into one that is not on a lower floor, as 'a -> b' lines."""
    level = {pkg: i for i, floor in enumerate(floors) for pkg in floor}
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            pa, pb = a.split(".")[0], b.split(".")[0]
            if "." not in a and a not in level or pa == pb or pb not in level:
                continue  # entry points and the package root may import anything
            if pa not in level or level[pa] <= level[pb]:
                bad.append(f"{a} -> {b}")
    return bad


def long_definitions(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_every_import_between_subpackages_points_down():
    assert floor_violations(import_graph(PACKAGE)) == []


def test_every_subpackage_is_on_a_floor_and_says_what_it_may_import():
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert sorted(pkg for floor in FLOORS for pkg in floor) == subpackages
    for name in subpackages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        assert "May import:" in doc, name


def test_only_entry_points_stay_flat():
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(flat) <= MAX_FLAT, flat


def test_functions_and_classes_stay_small():
    assert long_definitions(PACKAGE) == []


@pytest.fixture
def knotted(tmp_path) -> Path:
    """A package with a cycle closed by a function-level import, an upward import, a sibling import
    and an annotation-only import that must not count."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "def f():\n    from ..cli import main\n",
        "kernels/__init__.py": "",
        "kernels/k.py": "from . import j\nfrom ..system import s\n",
        "kernels/j.py": "def g():\n    from .k import x\n",
        "system/__init__.py": "",
        "system/s.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..cli.main import run\n",
        "cli/__init__.py": "",
        "cli/main.py": "def run():\n    pass\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_checks_find_a_hidden_cycle_and_imports_that_point_up_or_sideways(knotted):
    graph = import_graph(knotted)
    assert cycles(graph) == [["kernels.j", "kernels.k"]]
    assert floor_violations(graph) == ["core.a -> cli", "core.a -> cli.main", "kernels.k -> system", "kernels.k -> system.s"]
    assert "cli.main" not in graph["system.s"]  # annotations only
