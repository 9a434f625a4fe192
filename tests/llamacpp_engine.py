"""llama-cpp-python, built from its PyPI source package, in a virtual environment of its own.

llama-cpp-python ships as an sdist that compiles llama.cpp with the machine's C++ compiler (about
10 CPU-minutes). The tests that run s2reg's GGUF LoRA adapters in it must not rebuild it every time
nor touch the project's own environment, so the first use

1. downloads the sdist (``pip download``) and unpacks it: its ``vendor/llama.cpp`` holds llama.cpp's
   own ``convert_hf_to_gguf.py``, which makes the GGUF of a base checkpoint;
2. builds a wheel with the parts a Python binding does not use switched off (llama.cpp's tools,
   examples, tests, server, the multimodal library), timing the build into ``build.json``;
3. makes a virtual environment and installs the wheel into it (its dependencies from PyPI).

Everything lives under ``$S2REG_ENGINES_CACHE`` or ``~/.cache/s2reg-engines``, in a directory keyed
by the version and the machine; each step is skipped when its result is already there, so a rerun
costs nothing. An exclusive ``fcntl`` lock makes parallel test workers build once; each result is
made in a temporary directory and renamed into place, so a killed build leaves nothing half-made.

    python -m tests.llamacpp_engine     # builds (or finds) the engine, prints its record
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"
# What the binding needs is libllama and libggml; everything else llama.cpp builds by default is skipped.
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF "
              "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF")


def cache_root() -> Path:
    return Path(os.environ.get("S2REG_ENGINES_CACHE") or Path.home() / ".cache" / "s2reg-engines")


@dataclass(frozen=True)
class LlamaCpp:
    """A ready llama-cpp-python: the venv's interpreter and llama.cpp's source tree (its converters)."""

    python: Path
    source: Path
    record: dict



def _run(command: list[str], **kwargs) -> None:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


@contextmanager
def _made(final: Path):
    """A temporary sibling of ``final`` that becomes ``final`` when the block completes."""
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield temporary
        temporary.rename(final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _sdist(root: Path) -> Path:
    folder = root / "sdist"
    if not folder.is_dir():
        with _made(folder) as temporary:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"{PACKAGE}=={VERSION}", "-d", str(temporary)])
    return next(folder.glob("*.tar.gz"))


def _source(root: Path, sdist: Path) -> Path:
    folder = root / "source"
    if not folder.is_dir():
        with _made(folder) as temporary, tarfile.open(sdist) as archive:
            archive.extractall(temporary, filter="data")
    return next(p for p in folder.iterdir() if p.is_dir())


def _wheel(root: Path, sdist: Path) -> dict:
    folder = root / "wheel"
    if not folder.is_dir():
        with _made(folder) as temporary:
            environment = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS,
                           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
            started = time.monotonic()
            _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(temporary), str(sdist)], env=environment)
            record = {"version": VERSION, "cmake_args": CMAKE_ARGS, "build_seconds": round(time.monotonic() - started, 1),
                      "cpus": os.cpu_count(), "machine": platform.machine(), "compiler": _compiler()}
            (temporary / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return json.loads((folder / "build.json").read_text())


def _compiler() -> str:
    try:
        return subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def _venv(root: Path) -> Path:
    folder = root / f"venv-py{sys.version_info.major}{sys.version_info.minor}"
    if not folder.is_dir():
        wheel = next((root / "wheel").glob("*.whl"))
        with _made(folder) as temporary:
            _run([sys.executable, "-m", "venv", str(temporary)])
            _run([str(temporary / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)])
    return folder / "bin" / "python"


def ensure() -> LlamaCpp:
    """The built engine (building whatever part is missing), under an exclusive lock."""
    root = cache_root() / f"{PACKAGE}-{VERSION}-{platform.machine()}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sdist = _sdist(root)
        source = _source(root, sdist)
        record = _wheel(root, sdist)
        python = _venv(root)
    return LlamaCpp(python, source, record)



# Run inside the engine's venv (no s2reg there): token ids in, llama.cpp's logits and greedy continuations out.
_EVALUATE = r"""
import json, sys
import numpy as np
from llama_cpp import Llama

job = json.load(sys.stdin)
kwargs = {"lora_path": job["lora"]} if job["lora"] else {}
# an F32 KV cache (type 0): llama.cpp's default F16 cache would round the attention keys and values
llm = Llama(job["model"], n_ctx=job["n_ctx"], n_threads=job["threads"], logits_all=True, verbose=False, seed=0,
            type_k=0, type_v=0, **kwargs)
result = {"logits": [], "continuations": []}
for prompt in job["prompts"]:
    llm.reset()
    llm.eval(prompt)
    if job["logits"]:
        result["logits"].append(np.asarray(llm.scores[:len(prompt)], dtype=np.float64).tolist())
    tokens = []
    for _ in range(job["new_tokens"]):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    result["continuations"].append(tokens)
json.dump(result, sys.stdout)
"""


def evaluate(engine: LlamaCpp, model: Path, lora: Path | None, prompts: list[list[int]], *, new_tokens: int,
             logits: bool = True, n_ctx: int = 128) -> dict:
    """llama-cpp-python's ``Llama(model, lora_path=lora)`` on token-id ``prompts``: the logits of every prompt
    position (``logits``) and ``new_tokens`` greedy tokens after each prompt."""
    job = {"model": str(model), "lora": str(lora) if lora else None, "prompts": prompts, "new_tokens": new_tokens,
           "logits": logits, "n_ctx": n_ctx, "threads": min(4, os.cpu_count() or 1)}
    done = subprocess.run([str(engine.python), "-c", _EVALUATE], input=json.dumps(job), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-cpp-python failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


# Runs llama.cpp's converter scripts (which need torch, transformers and their vendored gguf-py: the project's
# environment has the first two) several times in one process, so torch is imported once.
_CONVERT = r"""
import json, runpy, sys
for argv in json.load(sys.stdin):
    sys.argv = argv
    sys.path.insert(0, argv[0].rsplit("/", 1)[0])
    runpy.run_path(argv[0], run_name="__main__")
"""


def convert(engine: LlamaCpp, script: str, runs: list[list[str]]) -> None:
    """Run llama.cpp's ``script`` (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``) with each argument list."""
    path = str(engine.source / "vendor" / "llama.cpp" / script)
    done = subprocess.run([sys.executable, "-c", _CONVERT], input=json.dumps([[path, *run] for run in runs]),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{done.stderr[-4000:]}")


if __name__ == "__main__":
    engine = ensure()
    print(json.dumps({"python": str(engine.python), "source": str(engine.source), **engine.record}, indent=2))
