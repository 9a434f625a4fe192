"""Local store throughput, dedup, and ``ls --base`` against plain directories, side by side.

    python bench/registry.py [--adapters 100] [--tags 10]

Adapters are SmolLM2-135M-shaped S2FT adapters (32 down_proj channels x 30 layers, ~0.5 MB
compressed), built against the SmolLM2 fixture. The peer is what people do without a registry:
one directory copy per name, and checking each adapter against a base by loading it and hashing
the base tensors it names.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter_size import saved_s2ft_adapters

from fixtures.smollm2 import build_smollm2
from s2reg import load
from s2reg.registry import Store, list_adapters
from s2reg.tensors import CheckpointSource


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--tags", type=int, default=10, help="refs per adapter for the dedup and ls figures")
    args = parser.parse_args()
    base = build_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = saved_s2ft_adapters(base, tmp / "src", args.adapters)
        size = tree_bytes(tmp / "src")
        store = Store(tmp / "store")
        push = timed(lambda: [store.push(d, f"a{i}:v1") for i, d in enumerate(dirs)])
        pull = timed(lambda: [store.pull(f"a{i}:v1", tmp / "out" / f"a{i}") for i in range(args.adapters)])
        naive = timed(lambda: [shutil.copytree(d, tmp / "naive" / f"a{i}:v1") for i, d in enumerate(dirs)])
        print(f"{args.adapters} SmolLM2 S2FT adapters, {size / 1e6:.1f} MB in all\n")
        print("| operation | s2reg store | plain directory copies |")
        print("|---|---:|---:|")
        print(f"| push (verify + store) | {args.adapters / push:.0f} adapters/s, {size / push / 1e6:.0f} MB/s "
              f"| copy: {args.adapters / naive:.0f} adapters/s (no verification) |")
        print(f"| pull (verify + write) | {args.adapters / pull:.0f} adapters/s, {size / pull / 1e6:.0f} MB/s | — |")

        for i in range(args.adapters):
            for t in range(2, args.tags + 1):
                store.tag(f"a{i}:v1", f"a{i}:v{t}")
                shutil.copytree(dirs[i], tmp / "naive" / f"a{i}:v{t}")
        refs = args.adapters * args.tags
        stored, copies = tree_bytes(tmp / "store" / "blobs"), tree_bytes(tmp / "naive")
        print(f"| {refs} refs on disk | {stored / 1e6:.1f} MB | {copies / 1e6:.1f} MB ({copies / stored:.1f}x) |")

        ls_store = timed(lambda: list_adapters(store, base=base))
        matched = len(list_adapters(store, base=base))

        def naive_ls():
            with CheckpointSource(base) as source:
                for path in sorted((tmp / "naive").iterdir()):
                    load(path).verify_base(source)

        ls_naive = timed(naive_ls)
        print(f"| `ls --base` over {refs} refs ({matched} match) | {ls_store:.2f} s | {ls_naive:.2f} s "
              f"({ls_naive / ls_store:.0f}x slower) |")


if __name__ == "__main__":
    main()
