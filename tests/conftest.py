"""Session-wide fixtures shared by every test area."""

from __future__ import annotations

import pytest

from fixtures.smollm2 import build_smollm2


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a sharded bf16 HF checkpoint (built once, cached, locked)."""
    return build_smollm2()
