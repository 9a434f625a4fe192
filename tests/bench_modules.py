"""bench/ scripts imported as modules by the tests that check them (bench/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(script: str) -> ModuleType:
    """``bench/<script>.py`` as the module ``bench_<script>``, imported once per process."""
    name = f"bench_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up while they are built
        spec.loader.exec_module(module)
    return sys.modules[name]
