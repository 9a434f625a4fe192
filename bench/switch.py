"""Adapter switch latency on one linear layer (the S2FT paper's Fig. 6a), side by side.

    python bench/switch.py [--dims 1024,2048,4096,8192,16384] [--channels 32]

s2reg: ``apply`` + ``remove`` of an S2FT adapter holding ``--channels`` columns of a d x d bf16
weight (exact, FORMAT §4.3). LoRA: ``W += B @ A`` and ``W -= B @ A`` with the same number of
parameters (rank = channels / 2), the merge/unmerge that PEFT performs. Median of repeated runs,
one thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from measure import call_times

from s2reg import S2FTAdapter
from s2reg.ops.live import apply, remove


def median_seconds(fn, repeats: int) -> float:
    return statistics.median(call_times(fn, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="1024,2048,4096,8192,16384")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core each: stable on a shared machine, and the same for both contenders
    print(f"{args.channels} channels (S2FT) vs LoRA rank {args.channels // 2}; bf16 weights; median of {args.repeats}\n")
    print("| d | s2reg apply+remove ms | LoRA merge+unmerge ms | speed-up |")
    print("|---:|---:|---:|---:|")
    for d in (int(x) for x in args.dims.split(",")):
        g = torch.Generator().manual_seed(d)
        layer = nn.Linear(d, d, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(d, d, generator=g).to(torch.bfloat16) * 0.02)
        model = nn.ModuleDict({"proj": layer})
        columns = torch.randperm(d, generator=g)[: args.channels].sort().values
        adapter = S2FTAdapter.from_slices(
            {"proj.weight": layer.weight.data},
            {"proj.weight": ("columns", columns, torch.randn(d, args.channels, generator=g) * 1e-3)},
            base_name="bench")
        rank = args.channels // 2
        lora_b = torch.randn(d, rank, generator=g).to(torch.bfloat16) * 1e-2
        lora_a = torch.randn(rank, d, generator=g).to(torch.bfloat16) * 1e-2

        # bound as defaults: each size times its own model and layer
        def s2ft_switch(model=model, adapter=adapter):
            apply(model, adapter)
            remove(model, adapter)

        def lora_switch(layer=layer, lora_b=lora_b, lora_a=lora_a):
            with torch.no_grad():
                layer.weight += lora_b @ lora_a
                layer.weight -= lora_b @ lora_a

        ours = median_seconds(s2ft_switch, args.repeats)
        theirs = median_seconds(lora_switch, args.repeats)
        print(f"| {d} | {1e3 * ours:.2f} | {1e3 * theirs:.2f} | {theirs / ours:.1f}x |")


if __name__ == "__main__":
    main()
