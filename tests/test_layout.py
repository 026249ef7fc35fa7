"""The package's layout: no import cycle among dropgrad modules, no private name imported across them.

Every import inside ``dropgrad/`` is read with ``ast`` (lazy imports inside functions too),
resolved to a module of the package, and checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dropgrad"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every intra-package import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("dropgrad"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from . import masks`: a module
                    found.append((sub, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dropgrad"):
                    found.append((alias.name, None, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, known):
            if target in known and target != name:
                graph[name].add(target)
    return graph


def test_the_checks_see_the_package():
    graph = _graph()
    assert {"dropgrad.wrapper", "dropgrad.functional", "dropgrad.kernels.cpu", "dropgrad.masks"} <= set(graph)
    assert "dropgrad.functional" in graph["dropgrad.wrapper"]  # the parser does find imports


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ imports its submodules; submodules importing a sibling through the
    # package is not a cycle of ideas, so edges into __init__ modules are left out
    packages = {m for m, p in _modules().items() if p.name == "__init__.py"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m] - packages):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_name_is_imported_across_modules():
    modules = _modules()
    known = set(modules)
    offenders = []
    for name, path in modules.items():
        for target, imported, line in _imports(name, path, known):
            private_name = imported is not None and imported.startswith("_") and not imported.startswith("__")
            private_module = any(part.startswith("_") and part != "__init__" for part in target.split(".")[1:])
            if target != name and (private_name or private_module):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target} {imported or ''}")
    assert not offenders, "\n".join(offenders)


def test_a_cycle_would_be_caught(tmp_path, monkeypatch):
    # the check can fail: a package with a -> b -> a
    pkg = tmp_path / "dropgrad"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .a import _hidden\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    try:
        test_no_import_cycle()
    except AssertionError as exc:
        assert "dropgrad.a -> dropgrad.b -> dropgrad.a" in str(exc)
    else:
        raise AssertionError("the cycle was not reported")
    try:
        test_no_private_name_is_imported_across_modules()
    except AssertionError as exc:
        assert "_hidden" in str(exc)
    else:
        raise AssertionError("the private import was not reported")
