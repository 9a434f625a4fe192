"""Shared by the benchmarks: run a command as its own process, return wall time and peak RSS."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@cache
def command_env() -> dict[str, str]:
    """The environment of a timed command: s2reg from this checkout, its bytecode cached as after any
    pip install (pip compiles what it installs). Where the environment says not to write bytecode
    (PYTHONDONTWRITEBYTECODE), s2reg's source would be compiled on every start and no installed
    package's would, which is not what users run."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "s2reg")], check=True, env=env)
    return env


def run(argv: list[str], *, env: dict[str, str] | None = None, durable: bool = True) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of ``argv`` run under ``/usr/bin/time -v``.

    With ``durable`` the wall time runs until the written data is on disk (a ``sync`` after the
    command), so a tool that fsyncs its output and one that leaves it in the page cache are timed
    to the same point.
    """
    os.sync()
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, check=False,
                          env={**command_env(), **(env or {})})
    if durable:
        os.sync()
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return wall, peak_kib / 1024


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def call_times(fn, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def training_step_times(model, optimizer, ids, steps: int, cuda: bool) -> list[float]:
    """Wall seconds of ``steps`` causal-LM training steps on ``ids`` (after one untimed warm-up step);
    CUDA work is synchronised so each time covers its step."""
    import torch

    times = []
    for _ in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times[1:]
