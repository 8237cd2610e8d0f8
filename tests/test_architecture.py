"""The package's floors import only downward: no import cycle among flowmatch's modules (counting the imports
inside functions, ignoring ``if TYPE_CHECKING:`` blocks), at most a few function-local imports of its own modules,
each with a one-line ``# reason:`` comment (an optional heavy dependency or start-up cost). A new ring, or a local
import added to hide one, fails here.

The analysis reads the source with :mod:`ast` (nothing is imported), so it takes well under a second.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import flowmatch

PACKAGE = Path(flowmatch.__file__).parent
MAX_LOCAL_IMPORTS = 20
REASON = "# reason:"


@dataclass(frozen=True)
class LocalImport:
    module: str
    target: str
    line: int


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under ``root``."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _targets(modules: dict[str, Path], current: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement names (one per imported name, as ``from a import b, c`` may name
    modules ``a.b`` and ``a.c`` or names in ``a``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = current.split(".")
            if modules[current].name != "__init__.py":
                package = package[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != current:
            out.append(name)
    return out


def import_graph(root: Path = PACKAGE) -> tuple[dict[str, set[str]], list[LocalImport], dict[str, Path]]:
    """(module -> modules it imports, the function-local imports of package modules, the module files)."""
    modules = module_files(root)
    edges: dict[str, set[str]] = {name: set() for name in modules}
    local: list[LocalImport] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        type_checking = {id(n) for block in ast.walk(tree)
                         if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                         for n in ast.walk(block)}
        in_function = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(fn) if n is not fn}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in type_checking:
                continue
            for target in _targets(modules, name, node):
                edges[name].add(target)
                if id(node) in in_function:
                    local.append(LocalImport(name, target, node.lineno))
    return edges, local, modules


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle():
    edges, _, _ = import_graph()
    assert cycles(edges) == []


def test_few_function_local_imports_of_the_package_remain():
    _, local, _ = import_graph()
    assert len(local) <= MAX_LOCAL_IMPORTS, "\n".join(f"{i.module}:{i.line} -> {i.target}" for i in local)


def test_each_function_local_import_says_why():
    _, local, modules = import_graph()
    unexplained = []
    for imp in local:
        lines = modules[imp.module].read_text().splitlines()
        if REASON not in lines[imp.line - 1] and REASON not in lines[imp.line - 2]:
            unexplained.append(f"{imp.module}:{imp.line} -> {imp.target}")
    assert unexplained == [], f"add a one-line '{REASON} ...' comment (optional heavy dependency or start-up cost)"


def test_the_bottom_floor_names_nothing_above_it():
    """errors, dtypes, version, the conditioning type and the task protocol import no other package module
    (beside errors), not even for type checking."""
    modules = module_files(PACKAGE)
    bottom = {"flowmatch.errors", "flowmatch.dtypes", "flowmatch.version", "flowmatch.conditioning",
              "flowmatch.tasks"}
    for name in sorted(bottom & modules.keys()):
        tree = ast.parse(modules[name].read_text())
        named = {t for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for t in _targets(modules, name, n)}
        assert named <= {"flowmatch.errors"}, (name, named)


def test_the_analysis_sees_a_ring_and_a_local_import(tmp_path):
    """The checks above can fail: a two-module ring through a function-local import is found, and counted."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
                              "def f():\n    from pkg.a import x\n")
    (pkg / "c.py").write_text("import pkg.b\n")
    edges, local, _ = import_graph(pkg)
    assert cycles(edges) == [["pkg.a", "pkg.b"]]  # c -> b is no ring: b names c only for type checking
    assert local == [LocalImport("pkg.b", "pkg.a", 5)]
