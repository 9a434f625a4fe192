"""PISA -> LoRA export: the old path (dense float64 SVD per target) against the new (FFT operator, randomized SVD,
tolerance), side by side on SmolLM2-135M's default PISA adapter.

    python bench/export_lowrank.py [--adapter DIR] [--old-targets 14] [--ranks 16,64]

The adapter: ``--adapter`` (e.g. one written by ``s2reg train --method pisa``), else the trainer's default
PISA set-up (PISAConfig(): 64 x 64 blocks, 32 coefficients per block, every q/k/v/o/gate/up/down projection:
210 targets) with seeded random coefficients. The old path is the code export shipped before issue 27:
``torch.linalg.svd`` of the float64 dense delta at torch's default thread count; it is also run on one
thread, which separates what the thread count does from what the algorithm does. The old path runs on the first
``--old-targets`` targets only (minutes per target on a busy two-core machine); the new one on those and on all.
Errors are relative Frobenius errors: the old path's is the optimal one at its rank (Eckart-Young), the new
path's is that of the float32 factors it writes (s2reg/interop/pisa_lowrank.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixtures.smollm2 import build_smollm2
from s2reg.errors import S2RegError
from s2reg.format.arrays import to_torch
from s2reg.interop.pisa_lowrank import DEFAULT_MAX_ERROR, one_thread, pisa_low_rank


def default_adapter(base: Path):
    """The trainer's default PISA targets and shapes on SmolLM2, with seeded random coefficients."""
    from transformers import AutoModelForCausalLM

    import s2reg
    from s2reg.tensors import CheckpointSource
    from s2reg.train import PISAConfig, export_adapter, prepare_pisa

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    prepared = prepare_pisa(model, PISAConfig())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in prepared.parameters.values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    with CheckpointSource(base) as source:
        return export_adapter(model, base=source, base_name=s2reg.__name__ + "-bench")


def old_factors(target, rank: int) -> float:
    """Export's PISA path before issue 27: the dense delta's float64 SVD, truncated; its relative error."""
    dense = to_torch(target.to_dense()).double()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]
    return float((dense - b @ a).norm() / dense.norm())


def timed(label: str, fn, targets: dict) -> dict:
    errors, ranks, started = [], [], time.perf_counter()
    for name, target in targets.items():
        error, rank = fn(name, target)
        errors.append(error)
        ranks.append(rank)
    seconds = time.perf_counter() - started
    row = {"path": label, "targets": len(targets), "seconds": seconds, "per_target": seconds / len(targets),
           "max_error": max(errors), "ranks": (min(ranks), max(ranks))}
    print(f"  {label}: {seconds:.1f} s for {len(targets)} targets, max error {max(errors):.4g}, "
          f"ranks {min(ranks)}..{max(ranks)}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="a PISA adapter for SmolLM2 (default: random, default shape)")
    parser.add_argument("--old-targets", type=int, default=14, help="targets the old path runs on (the first N)")
    parser.add_argument("--ranks", default="16,64", help="fixed ranks to compare")
    args = parser.parse_args()
    import s2reg

    base = build_smollm2()
    adapter = s2reg.load(args.adapter) if args.adapter else default_adapter(base)
    targets = dict(adapter.targets)
    first = dict(list(targets.items())[: args.old_targets])
    print(f"{len(targets)} targets, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    rows = []
    for rank in (int(r) for r in args.ranks.split(",")):
        print(f"rank {rank}:", flush=True)
        old = timed(f"old, dense SVD, {torch.get_num_threads()} threads", lambda n, t, rank=rank: (old_factors(t, rank), rank), first)

        def one_threaded(name, target, rank=rank):
            with one_thread():
                return old_factors(target, rank), rank

        old_one = timed("old, dense SVD, 1 thread", one_threaded, first)

        def new(name, target, rank=rank):
            result = pisa_low_rank(name, target, rank=rank, max_error=1.0)
            return result.error, result.rank

        new_first = timed("new", new, first)
        new_all = timed("new, all targets", new, targets)
        rows += [(rank, old, old_one, new_first, new_all)]
    print(f"automatic rank (max_error {DEFAULT_MAX_ERROR:g}):", flush=True)

    def auto(name, target):
        result = pisa_low_rank(name, target, rank=None)
        return result.error, result.rank

    auto_all = timed("new, smallest rank within the tolerance", auto, targets)
    try:
        pisa_low_rank(*next(iter(targets.items())), rank=rows[0][0])
    except S2RegError as refusal:
        print(f"rank {rows[0][0]} at the default tolerance: {refusal}")

    print("\n| rank | old s/target (threads) | old s/target (1 thread) | new s/target | old / new | old error (optimal) "
          "| new error | new / optimal | new, all targets s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rank, old, old_one, new_first, new_all in rows:
        print(f"| {rank} | {old['per_target']:.3f} | {old_one['per_target']:.3f} | {new_first['per_target']:.3f} | "
              f"{old['per_target'] / new_first['per_target']:.1f}x ({old_one['per_target'] / new_first['per_target']:.1f}x "
              f"on 1 thread) | {old['max_error']:.4f} | {new_first['max_error']:.4f} | "
              f"{new_first['max_error'] / old['max_error']:.3f} | {new_all['seconds']:.1f} |")
    low, high = auto_all["ranks"]
    print(f"\nautomatic rank: {auto_all['seconds']:.1f} s for {auto_all['targets']} targets, ranks {low}..{high}, "
          f"max error {auto_all['max_error']:.3g}")


if __name__ == "__main__":
    main()
