"""Shared by the benchmarks: run a command as its own process, return wall time and peak RSS."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
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


def training_step_times(model, optimizer, ids, steps: int, cuda: bool, warmup: int = 1) -> list[float]:
    """Wall seconds of ``steps`` causal-LM training steps on ``ids`` (after ``warmup`` untimed warm-up
    steps); CUDA work is synchronised so each time covers its step."""
    import torch

    times = []
    for _ in range(steps + warmup):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times[warmup:]


def available_mib() -> float:
    """MemAvailable of this machine now, in MiB."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024


class MemoryGuard(threading.Thread):
    """Kills (SIGKILL) process ``pid`` as soon as its resident memory passes ``limit_mib``, so a contender
    that needs more than the machine has fails alone instead of calling the OOM killer on everything
    else. ``RLIMIT_AS`` would not do: torch and safetensors map far more address space than they touch.
    With ``anon`` the limit is on anonymous memory only (``RssAnon``: what the kernel cannot drop; pages
    of memory-mapped files can be). ``most`` is the most it saw, ``killed_at`` what it saw when it killed."""

    def __init__(self, pid: int, limit_mib: float, *, anon: bool = False, poll_s: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.limit_mib, self.poll_s = pid, limit_mib, poll_s
        self.field = "RssAnon:" if anon else "VmRSS:"
        self.most, self.killed_at = 0.0, None
        self.start()

    def run(self) -> None:
        while True:  # until it is gone (or a zombie, whose status has no memory lines)
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    used = next(int(line.split()[1]) for line in f if line.startswith(self.field)) / 1024
            except (FileNotFoundError, StopIteration, ProcessLookupError):
                return
            self.most = max(self.most, used)
            if used > self.limit_mib:
                self.killed_at = used
                os.kill(self.pid, signal.SIGKILL)
                return
            time.sleep(self.poll_s)


def run_limited(argv: list[str], limit_mib: float, *, env: dict[str, str] | None = None, durable: bool = False,
                anon: bool = False) -> dict:
    """Run ``argv`` as its own process under a :class:`MemoryGuard`. Returns wall seconds (to the data on
    disk with ``durable``), peak RSS in MiB and the bytes it wrote to files (``/usr/bin/time``'s, as
    :func:`run`: a small process starts it, so no pages forked from this one are counted), the most
    memory the guard saw, the return code, whether the limit killed it, and its output."""
    if durable:
        os.sync()
    started = time.perf_counter()
    report = tempfile.NamedTemporaryFile(mode="r", suffix=".time")
    proc = subprocess.Popen(["/usr/bin/time", "-q", "-f", "%M %O", "-o", report.name, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**command_env(), **(env or {})})
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k, f: out.__setitem__(k, f.read()), args=(k, f), daemon=True)
               for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    child = None
    while child is None and proc.poll() is None:  # the command, once /usr/bin/time has started it
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            pids = f.read().split()
        child = int(pids[0]) if pids else time.sleep(0.01)
    guard = MemoryGuard(child, limit_mib, anon=anon) if child else None
    proc.wait()
    if guard:
        guard.join()
    for t in readers:
        t.join()
    if durable:
        os.sync()
    wall = time.perf_counter() - started
    fields = report.read().split()
    peak_kib, blocks = (int(fields[-2]), int(fields[-1])) if len(fields) >= 2 else (0, 0)
    killed = guard.killed_at if guard else None
    return {"wall_s": wall, "peak_rss_mib": peak_kib / 1024, "rc": -9 if killed else proc.returncode,
            "most_anon_mib" if anon else "most_rss_mib": guard.most if guard else 0.0, "written_bytes": blocks * 512,
            "killed_at_mib": killed, "limit_mib": limit_mib, "stdout": out.get("stdout", ""),
            "stderr": out.get("stderr", "")}
