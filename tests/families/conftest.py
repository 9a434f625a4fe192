"""Fixtures of the families suite: the tiny zoo, built once per test session (per xdist worker)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from . import zoo


@pytest.fixture(scope="session")
def zoo_checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """``zoo_checkpoint(name)`` -> the directory of that species' tiny checkpoint (read-only: copy to modify)."""
    root = tmp_path_factory.mktemp("zoo")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = zoo.build(name, root / name)
        return built[name]

    return get
