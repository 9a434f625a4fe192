"""Per-rank memory of sharded (FSDP2) against replicated (DDP) S2FT training, two processes.

    python bench/fsdp_memory.py [--hidden 1536 --layers 16 --ffn 6144 --processes 2 --steps 3]

A random-weight Llama (fp32, the issue's middle shape by default) is built once and saved; then
``torchrun`` starts N ranks that each load it, prepare S2FT (32 channels, 2 heads per layer), and
either shard it with ``s2reg.train.fsdp.shard`` or wrap it in DDP, and train a few AdamW steps.
Each rank reports its resident memory (RSS) after loading, after sharding/wrapping, and its peak
over the whole run. The weights' share of a rank under FSDP should be about 1/N of DDP's; the peak
still holds the whole model once, while loading (every rank loads before it shards).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(model_dir: str, mode: str, steps: int, out: str) -> None:
    import gc

    import torch.distributed as dist
    import transformers

    from s2reg.train import S2FTConfig, prepare_s2ft
    from s2reg.train.fsdp import shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = _rss_mib()
    prepare_s2ft(model, S2FTConfig(channels=32, heads=2, seed=0))
    runner = shard(model, device="cpu") if mode == "fsdp" else torch.nn.parallel.DistributedDataParallel(model)
    gc.collect()
    placed = _rss_mib()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(rank))
    for _ in range(steps):
        runner(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    record = {"mode": mode, "rank": rank, "after_load_mib": loaded, "after_shard_mib": placed,
              "after_steps_mib": _rss_mib(), "peak_mib": _peak_mib()}
    Path(out).with_suffix(f".{mode}.{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=6144)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "MODE", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_dir, mode, steps, out = args.worker
        worker(model_dir, mode, int(steps), out)
        return
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn,
                                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                                          num_key_value_heads=max(1, args.hidden // 512), vocab_size=32000)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        rows = []
        for mode in ("ddp", "fsdp"):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(args.processes), __file__, "--worker", tmp, mode, str(args.steps), f"{tmp}/r"],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows += [json.loads(Path(f"{tmp}/r.{mode}.{r}.json").read_text()) for r in range(args.processes)]
    weights = parameters * 4 / 2**20
    print(f"model: {parameters / 1e6:.0f} M parameters, {weights:.0f} MiB of fp32 weights; {args.processes} ranks")
    print(f"{'mode':5} {'rank':>4} {'after load':>11} {'after shard':>12} {'after steps':>12} {'peak':>8}  (MiB RSS)")
    for r in rows:
        print(f"{r['mode']:5} {r['rank']:>4} {r['after_load_mib']:>11.0f} {r['after_shard_mib']:>12.0f} "
              f"{r['after_steps_mib']:>12.0f} {r['peak_mib']:>8.0f}")
    mean = {m: sum(r["after_steps_mib"] for r in rows if r["mode"] == m) / args.processes for m in ("ddp", "fsdp")}
    print(f"steady RSS per rank, FSDP / DDP: {mean['fsdp'] / mean['ddp']:.2f}")
    print(json.dumps({"parameters": parameters, "processes": args.processes, "rows": rows}))


if __name__ == "__main__":
    main()
