"""Mixed-adapter batches on one linear layer (the S2FT paper's Fig. 6c, "adapter parallelism"), side by side.

    python bench/serve_layer.py [--dims 1024,2048,4096,8192] [--adapters 1,4,16,64] [--channels 32] [--tokens 4]

A d x d fp32 layer serves a batch of 64 sequences (``--tokens`` each) spread evenly over N adapters:

- s2reg: ``AdapterServer`` with N S2FT adapters of ``--channels`` input columns each (the paper's
  ``o``/``down`` side): per adapter one gather and one ``[rows, s] @ [s, d]`` matmul;
- PEFT: a ``LoraModel`` over the same layer with N LoRA adapters of the same parameter count
  (rank = channels / 2), run with ``adapter_names=`` (PEFT's own mixed-batch forward);
- merged copy: each adapter's group through a copy of the weight with that adapter merged (one copy
  reused, rewritten per group: what serving without mixed batches costs).

Time per batch is the best of ``--repeats`` runs on one thread; "adapter MiB" is what the N adapters
hold beyond the base weight (the merged path adds its d x d scratch copy). Every path's output is
checked against the merged path before it is timed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from measure import call_times

from s2reg import S2FTAdapter
from s2reg.serve import AdapterServer

BATCH = 64


class Layer(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def best_seconds(fn, repeats: int) -> float:
    return min(call_times(fn, repeats))


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def bench_dim(d: int, counts: list[int], channels: int, tokens: int, repeats: int, work: Path) -> None:
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(d)
    weight = torch.randn(d, d, generator=g) * 0.02
    base = work / f"d{d}"
    base.mkdir()
    save_file({"proj.weight": weight}, base / "model.safetensors")
    most = max(counts)
    columns = [torch.randperm(d, generator=g)[:channels].sort().values for _ in range(most)]
    deltas = [torch.randn(d, channels, generator=g) * 1e-2 for _ in range(most)]
    adapters = [S2FTAdapter.from_slices({"proj.weight": weight}, {"proj.weight": ("columns", c, dl)}, base_name="bench")
                for c, dl in zip(columns, deltas, strict=True)]
    server = AdapterServer(Layer(weight), base, max_resident=most)
    for i, adapter in enumerate(adapters):
        server.attach(f"a{i}", adapter)

    rank = channels // 2
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"], init_lora_weights=False)
    peft_model = get_peft_model(Layer(weight), config, adapter_name="a0")
    for i in range(1, most):
        peft_model.add_adapter(f"a{i}", config)
    peft_model.eval()

    x = torch.randn(BATCH, tokens, d, generator=g)
    scratch = weight.clone()

    def merged_copy(names: list[str]) -> torch.Tensor:
        out = torch.empty(BATCH, tokens, d)
        for i in sorted(set(names), key=names.index):
            rows = torch.tensor([r for r, n in enumerate(names) if n == i])
            a = int(i[1:])
            scratch.copy_(weight)
            scratch[:, columns[a]] += deltas[a]
            out[rows] = x[rows] @ scratch.T
        return out

    for n in counts:
        names = [f"a{r % n}" for r in range(BATCH)]
        with torch.no_grad():
            ours = server.forward(names, x=x)
            reference = merged_copy(names)
            lora = peft_model(x, adapter_names=names)
        error = float((ours - reference).abs().max() / reference.abs().max())
        assert error < 1e-5, f"s2reg differs from the merged copy by {error:.2e}"
        # PEFT really ran each row's LoRA: the first group against its merged weight
        rows = [r for r, name in enumerate(names) if name == "a0"]
        layer = peft_model.base_model.model.proj
        lora_weight = weight + layer.scaling["a0"] * layer.lora_B["a0"].weight @ layer.lora_A["a0"].weight
        with torch.no_grad():
            lora_error = float((lora[rows] - x[rows] @ lora_weight.T).abs().max() / lora[rows].abs().max())
        assert lora_error < 1e-4, f"PEFT's mixed batch differs from its merged LoRA by {lora_error:.2e}"
        with torch.no_grad():
            t_ours = best_seconds(lambda names=names: server.forward(names, x=x), repeats)
            t_lora = best_seconds(lambda names=names: peft_model(x, adapter_names=names), repeats)
            t_merged = best_seconds(lambda names=names: merged_copy(names), repeats)
            t_base = best_seconds(lambda: x @ weight.T, repeats)
        ours_bytes = sum(server.memory()[f"a{i}"] for i in range(n))
        lora_bytes = n * 2 * d * rank * 4
        merged_bytes = n * d * channels * 4 + d * d * 4
        print(f"| {d} | {n} | {1e3 * t_base:.1f} | {1e3 * t_ours:.1f} | {1e3 * t_lora:.1f} | {1e3 * t_merged:.1f} | "
              f"{t_lora / t_ours:.2f}x | {t_merged / t_ours:.2f}x | {mib(ours_bytes)} | {mib(lora_bytes)} | "
              f"{mib(merged_bytes)} | {error:.1e} |", flush=True)
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="1024,2048,4096,8192")
    parser.add_argument("--adapters", default="1,4,16,64")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.adapters.split(",")]
    print(f"batch of {BATCH} sequences x {args.tokens} tokens, fp32; S2FT {args.channels} columns per adapter vs "
          f"LoRA rank {args.channels // 2}; best of {args.repeats}, {args.threads} thread(s)\n")
    print("| d | adapters | base ms | s2reg ms | PEFT LoRA ms | merged copy ms | PEFT / s2reg | merged / s2reg "
          "| s2reg MiB | LoRA MiB | merged MiB | s2reg vs merged (rel) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        for d in (int(x) for x in args.dims.split(",")):
            bench_dim(d, counts, args.channels, args.tokens, args.repeats, Path(work))


if __name__ == "__main__":
    main()
