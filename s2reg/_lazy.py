"""Names a package exports from its modules, imported on first use (PEP 562 module ``__getattr__``).

Keeps ``import s2reg`` and ``from s2reg.format import limits`` cheap: a name's module (numpy, or torch
for the code that runs it) is imported when the name is first looked up, then cached in the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, table: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``package`` for ``table`` (name -> module, relative to ``package``)."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # looked up once
        return value

    return __getattr__
