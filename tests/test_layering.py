"""The package's floors: lower layers never import upper ones (read from the source, not from a run).

``s2reg.home`` is the bottom floor (it imports nothing of s2reg); ``s2reg.format`` and ``s2reg.tensors``
never import ``s2reg.registry``, so the registry can use them without an import cycle. Every import
counts, those under ``if TYPE_CHECKING:`` and inside functions included.
"""

from __future__ import annotations

import ast
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
