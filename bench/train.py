"""Training step time and memory on SmolLM2-135M, side by side at the same trainable parameter count.

    python bench/train.py [--steps 6] [--batch 2] [--length 256]

s2reg S2FT (32 down_proj channels per layer, partial back-propagation) vs PEFT LoRA on down_proj
(rank matched to the S2FT parameter count) vs full fine-tuning; s2reg PISA (q and v, 64x64 blocks,
32 coefficients each) vs PEFT FourierFT on q and v (n_frequency matched). Each contender runs in its
own process: median optimizer-step time (after one warm-up step) and peak memory (RSS on CPU,
``max_memory_allocated`` on CUDA). AdamW, fp32 on CPU, bf16 on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from measure import run, training_step_times

METHODS = ("s2reg-s2ft", "peft-lora", "full", "s2reg-pisa", "peft-fourierft")
CHANNELS = 32


def prepare(model, method: str) -> None:
    from peft import FourierFTConfig, LoraConfig, get_peft_model

    from s2reg.train import PISAConfig, S2FTConfig, prepare_pisa, prepare_s2ft

    cfg = model.config
    layers = cfg.num_hidden_layers
    if method == "s2reg-s2ft":
        prepare_s2ft(model, S2FTConfig(channels=CHANNELS, heads=0, roles=("down",)))
        return model
    if method == "peft-lora":
        rank = round(CHANNELS * cfg.hidden_size / (cfg.hidden_size + cfg.intermediate_size))
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["down_proj"]))
    if method == "full":
        return model
    if method == "s2reg-pisa":
        prepare_pisa(model, PISAConfig(block=64, coefficients=32, roles=("q", "v")))
        return model
    pisa_params = 2 * 32 * sum(-(-cfg.hidden_size // 64) * -(-n // 64) for n in (
        cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim)) * layers
    n_frequency = pisa_params // (2 * layers)
    return get_peft_model(model, FourierFTConfig(n_frequency=n_frequency, target_modules=["q_proj", "v_proj"]))


def worker(method: str, steps: int, batch: int, length: int) -> None:
    from transformers import AutoModelForCausalLM

    from fixtures.smollm2 import build_smollm2

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(build_smollm2(), dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    model = prepare(model, method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = training_step_times(model, optimizer, ids, steps, cuda)
    print(json.dumps({"method": method, "trainable": sum(p.numel() for p in params),
                      "median_step_s": statistics.median(times),
                      "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.batch, args.length)
    rows = {}
    for method in METHODS:
        command = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--length", str(args.length)]
        _, rss = run(command, durable=False)
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[method] = {**json.loads(out), "peak_rss_mib": rss}
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"SmolLM2-135M, batch {args.batch} x {args.length} tokens, {device}, median of {args.steps} steps\n")
    memory = "cuda_peak_mib" if torch.cuda.is_available() else "peak_rss_mib"
    print("| method | trainable params | step s | peak memory MiB | time vs peer | memory vs peer |")
    print("|---|---:|---:|---:|---:|---:|")
    peers = {"s2reg-s2ft": "peft-lora", "full": "peft-lora", "s2reg-pisa": "peft-fourierft"}
    for method, r in rows.items():
        peer = rows.get(peers.get(method, ""))
        ratio_t = f"{peer['median_step_s'] / r['median_step_s']:.2f}x faster than {peers[method]}" if peer else "—"
        ratio_m = f"{100 * r[memory] / peer[memory]:.0f}% of {peers[method]}" if peer else "—"
        print(f"| {method} | {r['trainable']:,} | {r['median_step_s']:.3f} | {r[memory]:.0f} | {ratio_t} | {ratio_m} |")
    s2ft, full = rows["s2reg-s2ft"], rows["full"]
    print(f"\ns2reg S2FT vs full fine-tuning: {full['median_step_s'] / s2ft['median_step_s']:.2f}x faster, "
          f"{100 * s2ft[memory] / full[memory]:.0f}% of its memory")


if __name__ == "__main__":
    main()
