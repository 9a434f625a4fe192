"""Weight drift after repeated merge/unmerge cycles in bf16: s2reg S2FT vs PEFT LoRA, side by side.

    python bench/drift.py [--cycles 1,100,1000]

One SmolLM2-shaped down_proj (576 x 1536, bf16). s2reg applies and removes an S2FT adapter of 32
channels (exact differences, FORMAT §4.3); PEFT merges and unmerges a LoRA of the same parameter
count (``merge_adapter`` / ``unmerge_adapter``). Reported: max |W - W0| and the share of weights
whose bits changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s2reg import S2FTAdapter
from s2reg.ops.live import apply, remove

ROWS, COLS, CHANNELS = 576, 1536, 32


class Block(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.down_proj = nn.Linear(COLS, ROWS, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            self.down_proj.weight.copy_(weight)

    def forward(self, x):
        return self.down_proj(x)


def drift(weight: torch.Tensor, original: torch.Tensor) -> tuple[float, float]:
    changed = weight.view(torch.int16) != original.view(torch.int16)
    return float((weight.double() - original.double()).abs().max()), float(changed.double().mean())


def main() -> None:
    from peft import LoraConfig, get_peft_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", default="1,100,1000")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    original = (torch.randn(ROWS, COLS, generator=g) * 0.02).to(torch.bfloat16)

    ours = Block(original)
    columns = torch.randperm(COLS, generator=g)[:CHANNELS].sort().values
    adapter = S2FTAdapter.from_slices({"down_proj.weight": original},
                                      {"down_proj.weight": ("columns", columns, torch.randn(ROWS, CHANNELS, generator=g) * 2e-3)},
                                      base_name="bench")
    rank = round(ROWS * CHANNELS / (ROWS + COLS))
    theirs = get_peft_model(Block(original), LoraConfig(r=rank, lora_alpha=rank, target_modules=["down_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2e-2)
    peft_weight = theirs.base_model.model.down_proj.base_layer.weight

    print(f"bf16 {ROWS}x{COLS}; S2FT {adapter.num_params:,} params vs LoRA r={rank} "
          f"({rank * (ROWS + COLS):,} params)\n")
    print("| cycles | s2reg max abs drift | s2reg bits changed | PEFT LoRA max abs drift | PEFT bits changed |")
    print("|---:|---:|---:|---:|---:|")
    done = 0
    for target in (int(c) for c in args.cycles.split(",")):
        for _ in range(target - done):
            apply(ours, adapter)
            remove(ours, adapter)
            theirs.merge_adapter()
            theirs.unmerge_adapter()
        done = target
        a, a_share = drift(ours.down_proj.weight.data, original)
        b, b_share = drift(peft_weight.data, original)
        print(f"| {target} | {a:.3g} | {100 * a_share:.4f}% | {b:.3g} | {100 * b_share:.2f}% |")


if __name__ == "__main__":
    main()
