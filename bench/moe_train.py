"""MoE training memory and step time: s2reg S2FT on transformers' fused experts vs full fine-tuning of
the same experts, on a small random Mixtral.

    python bench/moe_train.py [--steps 5] [--batch 4] [--length 128]

Contenders, each in its own process, everything outside the experts frozen in all of them:
- ``s2reg-s2ft down``: ``prepare_s2ft`` with 32 channels per expert, ``down`` (the paper's default);
- ``s2reg-s2ft up,gate,down``: the same channels in all three expert projections;
- ``full experts``: every expert weight (``gate_up_proj``, ``down_proj``) trainable, plain autograd.
AdamW, fp32 on CPU (bf16 on CUDA), transformers' default experts kernel (``grouped_mm``). Reported:
median optimizer-step time after one warm-up step, and memory: on CPU the growth of peak RSS over the
RSS before the first step (what training adds to the loaded model: gradients, optimizer state,
activations), on CUDA ``max_memory_allocated`` over the same baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from measure import training_step_times

METHODS = {"s2reg-s2ft down": ("down",), "s2reg-s2ft up,gate,down": ("up", "gate", "down"), "full experts": None}
CHANNELS = 32
CONFIG = {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
          "max_position_embeddings": 512, "sliding_window": None, "router_jitter_noise": 0.0}


def _peak_mib(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_mib(cuda: bool) -> float:
    if cuda:
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def worker(method: str, steps: int, batch: int, length: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from s2reg.train import S2FTConfig, prepare_s2ft

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **CONFIG))
    model = model.to(device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    roles = METHODS[method]
    if roles is None:
        for name, p in model.named_parameters():
            p.requires_grad_(".experts." in name)
    else:
        prepare_s2ft(model, S2FTConfig(channels=CHANNELS, heads=0, roles=roles))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(3, CONFIG["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _current_mib(cuda)
    times = training_step_times(model, optimizer, ids, steps, cuda)
    experts = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".gate_up_proj", ".down_proj")))
    print(json.dumps({"method": method, "trainable": sum(p.numel() for p in params), "expert_params": experts,
                      "median_step_s": statistics.median(times), "before_mib": before,
                      "training_mib": _peak_mib(cuda) - before, "peak_mib": _peak_mib(cuda)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.batch, args.length)
    rows = {}
    for method in METHODS:
        command = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--length", str(args.length)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[method] = json.loads(out)
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    full = rows["full experts"]
    print(f"random Mixtral: {CONFIG['num_hidden_layers']} layers x {CONFIG['num_local_experts']} experts "
          f"(top-{CONFIG['num_experts_per_tok']}), hidden {CONFIG['hidden_size']}, expert intermediate "
          f"{CONFIG['intermediate_size']} ({full['expert_params']:,} expert parameters); batch {args.batch} x "
          f"{args.length} tokens, {device}, median of {args.steps} steps\n")
    print("| method | trainable params | step s | training memory MiB | peak MiB | time vs full "
          "| training memory vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, r in rows.items():
        print(f"| {method} | {r['trainable']:,} | {r['median_step_s']:.3f} | {r['training_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {full['median_step_s'] / r['median_step_s']:.2f}x faster | "
              f"{100 * r['training_mib'] / full['training_mib']:.0f}% |")


if __name__ == "__main__":
    main()
