"""Mixed-adapter generation end to end on SmolLM2-135M, side by side.

    python bench/serve_smollm2.py [--adapters 1,4,16] [--prompts 32] [--new-tokens 8] [--threads 1]

32 prompts spread evenly over N adapters, greedy ``generate`` of ``--new-tokens`` tokens each (forced:
every contender produces the same number of tokens), fp32 on CPU:

- s2reg: ``AdapterServer`` with N S2FT adapters (32 ``down_proj`` channels per layer x 30 layers,
  552,960 parameters each), one mixed batch;
- PEFT: N LoRA adapters of rank 9 on ``down_proj`` (570,240 parameters each, the nearest rank) and
  PEFT's ``generate(adapter_names=...)``, one mixed batch;
- merge per group: for each adapter, ``s2reg.apply`` (exact S2FT switch in the weights), ``generate`` on
  its prompts, ``s2reg.remove``: what serving without mixed batches costs;
- base: the batch with no adapter, the floor.

Tokens/s counts generated tokens only. The base is the SmolLM2 fixture (``fixtures/smollm2.py``) saved once
as fp32, so that every contender computes in the checkpoint's dtype.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import s2reg
from fixtures.smollm2 import build_smollm2
from s2reg.serve import AdapterServer
from s2reg.serve.prompts import encode
from s2reg.tensors import CheckpointSource

CHANNELS, LORA_RANK = 32, 9
TOPICS = ["the sea", "a library", "mountains", "a robot", "winter", "bread", "a violin", "the moon"]


def prompts(count: int) -> list[str]:
    return [f"Write one sentence about {TOPICS[i % len(TOPICS)]} and the number {i}:" for i in range(count)]


def fp32_copy(base: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).save_pretrained(out)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base / file, out / file)
    return out


def s2ft_adapters(base: Path, count: int) -> list[s2reg.Adapter]:
    g = torch.Generator().manual_seed(0)
    with CheckpointSource(base) as source:
        names = [n for n in source.names() if n.endswith("mlp.down_proj.weight")]
        out = []
        for _ in range(count):
            slices = {}
            for name in names:
                rows, cols = source.shape(name)
                columns = torch.randperm(cols, generator=g)[:CHANNELS].sort().values
                slices[name] = ("columns", columns, torch.randn(rows, CHANNELS, generator=g) * 2e-2)
            out.append(s2reg.S2FTAdapter.from_slices(source, slices, base_name=str(base)))
    return out


T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="1,4,16")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.adapters.split(",")]
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as work:
        base = fp32_copy(build_smollm2(), Path(work) / "fp32")
        tokenizer = AutoTokenizer.from_pretrained(base)
        ids, mask = encode(tokenizer, prompts(args.prompts))
        adapters = s2ft_adapters(base, max(counts))
        server = AdapterServer.from_pretrained(base, max_resident=max(counts))
        for i, adapter in enumerate(adapters):
            server.attach(f"a{i}", adapter)
        lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["down_proj"], init_lora_weights=False)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora, adapter_name="a0")
        for i in range(1, max(counts)):
            peft_model.add_adapter(f"a{i}", lora)
        peft_model.eval()
        options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                   "pad_token_id": tokenizer.pad_token_id}
        generated = args.prompts * args.new_tokens

        def per_group(names: list[str]) -> torch.Tensor:
            out = torch.empty(ids.shape[0], ids.shape[1] + args.new_tokens, dtype=ids.dtype)
            for name in dict.fromkeys(names):
                rows = torch.tensor([r for r, n in enumerate(names) if n == name])
                adapter = adapters[int(name[1:])]
                s2reg.apply(server.model, adapter)
                with torch.no_grad():
                    out[rows] = server.model.generate(input_ids=ids[rows], attention_mask=mask[rows], **options)
                s2reg.remove(server.model, adapter)
            return out

        with torch.no_grad():
            t_base, _ = timed(lambda: server.model.generate(input_ids=ids, attention_mask=mask, **options))
        print(f"{args.prompts} prompts x {args.new_tokens} new tokens, fp32, {args.threads} thread(s); "
              f"S2FT {CHANNELS} down_proj channels/layer vs LoRA rank {LORA_RANK}; base alone {generated / t_base:.1f} tok/s\n")
        print("| adapters | s2reg tok/s | PEFT LoRA tok/s | merge per group tok/s | s2reg / PEFT | s2reg / merge per group "
              "| rows equal to merge per group |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n in counts:
            names = [f"a{r % n}" for r in range(args.prompts)]
            t_ours, ours = timed(lambda names=names: server.generate(ids, mask, adapters=names, **options))
            with torch.no_grad():
                t_peft, _ = timed(lambda names=names: peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=names,
                                                              **options))
            t_group, grouped = timed(lambda names=names: per_group(names))
            same = sum(torch.equal(a[-args.new_tokens:], b[-args.new_tokens:]) for a, b in zip(ours, grouped, strict=True))
            print(f"| {n} | {generated / t_ours:.1f} | {generated / t_peft:.1f} | {generated / t_group:.1f} | "
                  f"{t_peft / t_ours:.2f}x | {t_group / t_ours:.2f}x | {same}/{args.prompts} |", flush=True)
        server.close()


if __name__ == "__main__":
    main()
