"""Start-up of everyday commands: s2reg against the hf CLI and bare imports, side by side, one run.

    python bench/startup.py [--runs 7]

Each command is its own process, started ``--runs`` times in turn with the others (so drift of a busy
machine hits them all alike); the table gives the median wall time, the ratio to ``hf cache ls``
(huggingface_hub's own CLI, on an empty cache so that it runs), and the largest peak RSS, which
``os.wait4`` reports per child. ``s2reg ls`` lists a temporary store of 100 refs; ``inspect`` and
``validate`` read a SmolLM2-135M S2FT adapter (32 down_proj channels x 30 layers). ``validate --base``
remembers the base's tensor hashes on its first run (spec/SURGERY.md §6) and finds them on the
others; the ``S2REG_HASH_CACHE=0`` row hashes every time, as a first check of a checkpoint does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter_size import saved_s2ft_adapters
from measure import command_env

from fixtures.smollm2 import build_smollm2
from s2reg.registry import Store


# The timing loop runs in a small interpreter of its own: a child forked from this one (torch loaded, for
# building the fixtures) would count this process's pages in its peak RSS until it execs.
RUNNER = """
import json, os, subprocess, sys, time
commands, env, runs = json.loads(sys.stdin.read())
def once(argv):
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: its peak RSS
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("benchmark command failed: " + " ".join(argv) + "\\n" + child.stderr.read().decode()[-2000:])
    child.stderr.close()
    return wall, usage.ru_maxrss / 1024
for argv in commands.values():  # warm-up: page cache, .pyc files
    once(argv)
walls = {name: [] for name in commands}
peaks = dict.fromkeys(commands, 0.0)
for _ in range(runs):  # interleaved, so a busy machine's drift hits every command alike
    for name, argv in commands.items():
        wall, rss = once(argv)
        walls[name].append(wall)
        peaks[name] = max(peaks[name], rss)
print(json.dumps([walls, peaks]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    base = build_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapters = saved_s2ft_adapters(base, tmp, 4)
        store = Store(tmp / "home")
        for i in range(100):  # 100 refs over 4 adapters: ls reads every ref and its manifest
            store.push(adapters[i % 4], f"task{i % 4}:v{i // 4}")
        (tmp / "hf").mkdir()
        env = {**command_env(), "S2REG_HOME": str(tmp / "home"), "HF_HUB_CACHE": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}
        s2reg = [sys.executable, "-m", "s2reg"]
        commands = {
            "s2reg --help": s2reg + ["--help"],
            "s2reg ls (100 refs)": s2reg + ["ls"],
            "s2reg inspect ADAPTER": s2reg + ["inspect", str(adapters[0])],
            "s2reg validate ADAPTER": s2reg + ["validate", str(adapters[0])],
            "s2reg validate ADAPTER --base SmolLM2 (30 tensor hashes remembered)":
                s2reg + ["validate", str(adapters[0]), "--base", str(base)],
            "s2reg validate ADAPTER --base SmolLM2 (hashing 30 tensors: S2REG_HASH_CACHE=0)":
                ["env", "S2REG_HASH_CACHE=0", *s2reg, "validate", str(adapters[0]), "--base", str(base)],
            "hf cache ls (empty cache)": ["hf", "cache", "ls"],
            'python -c "import numpy, click, rich"': [sys.executable, "-c", "import numpy, click, rich"],
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
        }
        done = subprocess.run([sys.executable, "-S", "-c", RUNNER], input=json.dumps([commands, env, args.runs]),
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(done.stderr)
        walls, peaks = json.loads(done.stdout)
        hf = statistics.median(walls["hf cache ls (empty cache)"])
        print(f"{args.runs} runs each, interleaved; {os.cpu_count()} CPUs\n")
        print("| command | median wall s | vs `hf cache ls` | peak RSS MiB |")
        print("|---|---:|---:|---:|")
        for name in commands:
            median = statistics.median(walls[name])
            print(f"| {name} | {median:.3f} | {median / hf:.2f}x | {peaks[name]:.0f} |")


if __name__ == "__main__":
    main()
