"""The package's floors: lower layers never import upper ones (read from the source, not from a run).

``s2reg.home`` is the bottom floor (it imports nothing of s2reg); ``s2reg.format`` and ``s2reg.tensors``
never import ``s2reg.registry``, so the registry can use them without an import cycle. Every import
counts, those under ``if TYPE_CHECKING:`` and inside functions included. Across the whole package, no
module-level import cycle exists (``import_cycles``): lazy imports inside functions may reach upward
(``s2reg.format`` asks ``s2reg.kinds`` for an adapter's type when it loads one), module-level ones never.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "s2reg"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module ``path`` (a file of the package at ``root``) imports, as absolute dotted names
    (``from X import y`` also counts ``X.y``: ``y`` may be a module)."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return found


def _imports_under(path: Path, prefix: str, root: Path = PACKAGE) -> list[str]:
    return sorted(name for name in imported_modules(path, root) if name == prefix or name.startswith(prefix + "."))


def test_the_import_reader_sees_every_form_of_import(tmp_path):
    """The reader must not miss a relative import, a ``from .. import``, a function-level or a TYPE_CHECKING one."""
    package = tmp_path / "s2reg" / "tensors"
    package.mkdir(parents=True)
    source = package / "example.py"
    source.write_text("import json\nfrom ..registry.store import Store\ndef f():\n    from .. import registry\n"
                      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import s2reg.registry.names\n"
                      "from .header import layout\n")
    assert _imports_under(source, "s2reg.registry", tmp_path / "s2reg") == [
        "s2reg.registry", "s2reg.registry.names", "s2reg.registry.store", "s2reg.registry.store.Store"]
    assert "s2reg.tensors.header.layout" in imported_modules(source, tmp_path / "s2reg")


@pytest.mark.parametrize("layer", ["format", "tensors"])
def test_format_and_tensors_never_import_the_registry(layer):
    offenders = {str(path.relative_to(PACKAGE.parent)): _imports_under(path, "s2reg.registry")
                 for path in sorted((PACKAGE / layer).rglob("*.py"))}
    assert {path: names for path, names in offenders.items() if names} == {}
    assert len(offenders) > 5  # the walk found the layer's modules


def test_home_is_the_bottom_floor():
    assert _imports_under(PACKAGE / "home.py", "s2reg") == []


@pytest.mark.parametrize("part", ["blobs", "entry", "files", "gc", "locks", "refs", "verify", "views"])
def test_the_store_parts_sit_below_the_store_facade(part):
    """``registry.store.Store`` is built of its parts; a part that imported it back would close a cycle."""
    assert _imports_under(PACKAGE / "registry" / f"{part}.py", "s2reg.registry.store") == []


def module_level_imports(path: Path, modules: Mapping[str, Path], root: Path = PACKAGE) -> set[str]:
    """The package's modules that importing ``path`` runs first: imports at module level (under ``if``/``try``
    too), not inside functions nor under ``if TYPE_CHECKING:``. A module's own parent packages are already
    initialising when it runs, so they count only where it takes a name (not a submodule) from them, as
    ``from . import register`` does from an ``__init__`` that imports this module back."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    if path.name == "__init__.py":
        ancestors.add(module)

    def statements(nodes: list[ast.stmt]) -> Iterator[ast.stmt]:
        for node in nodes:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    yield from statements(node.body)
                yield from statements(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    yield from statements(block)
            else:
                yield node

    found: set[str] = set()
    taken_from_ancestor: set[str] = set()
    for node in statements(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            for alias in node.names:  # ``import a.b.c`` runs a, a.b and a.b.c
                parts = alias.name.split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                source = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            parts = source.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
            found.update(submodules)
            if source in ancestors and len(submodules) < len(node.names):
                taken_from_ancestor.add(source)
    return {name for name in found if name in modules and name != module and name not in ancestors} | taken_from_ancestor


def import_cycles(root: Path = PACKAGE) -> list[list[str]]:
    """The strongly connected components of more than one module in the module-level import graph (Tarjan)."""
    modules = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph = {name: sorted(module_level_imports(path, modules, root)) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for after in graph[node]:
            if after not in index:
                visit(after)
                low[node] = min(low[node], low[after])
            elif after in stack:
                low[node] = min(low[node], index[after])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    return cycles


def test_no_module_level_import_cycle_in_the_package():
    """Every module can be imported first: no module needs, at import time, one that needs it back."""
    assert import_cycles() == []


def test_the_cycle_walk_finds_a_cycle_through_a_package_init(tmp_path):
    """The kinds' old shape: ``__init__`` imports a kind that takes ``register`` from that ``__init__``; and a
    cycle two modules apart; while a child's plain ``from . import sibling`` and TYPE_CHECKING imports are no cycle."""
    root = tmp_path / "s2reg"
    (root / "kinds").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "kinds" / "__init__.py").write_text("def register(k):\n    return k\nfrom . import s2ft\n")
    (root / "kinds" / "s2ft.py").write_text("from . import register\n")
    (root / "a.py").write_text("try:\n    from . import b\nexcept ImportError:\n    pass\n")
    (root / "b.py").write_text("if True:\n    import s2reg.a\n")
    (root / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n"
                               "def f():\n    from . import d\n")
    (root / "d.py").write_text("from . import c\n")
    (root / "tools").mkdir()
    (root / "tools" / "__init__.py").write_text("from . import one\n")
    (root / "tools" / "one.py").write_text("from . import two\n")
    (root / "tools" / "two.py").write_text("x = 1\n")
    assert sorted(import_cycles(root)) == [["s2reg.a", "s2reg.b"], ["s2reg.kinds", "s2reg.kinds.s2ft"]]
