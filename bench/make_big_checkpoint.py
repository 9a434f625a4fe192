"""Write a large deterministic synthetic Llama checkpoint (bf16, sharded) for the merge benchmarks.

    python bench/make_big_checkpoint.py OUT_DIR [--shape big|llama3-8b] [--layers N]

``big`` (the default) gives ~1.7 GB: hidden 2048, FFN 5632, 16 layers, 16 heads with 4 kv heads
(GQA), 32k vocabulary, 500 MiB shards. ``llama3-8b`` is Llama-3-8B's shape: hidden 4096, FFN 14336,
32 layers, 32 heads with 8 kv heads, 128,256 vocabulary, ~16 GB in ~5 GB shards.
Tensors are drawn and written one at a time, so building it needs the memory of one tensor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s2reg.synth import build_checkpoint

BIG = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
           vocab_size=32000, max_position_embeddings=2048)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
# name -> (config overrides, layers, shard size)
SHAPES = {"big": (BIG, 16, 500 * 1024**2), "llama3-8b": (LLAMA3_8B, 32, 5 * 1000**3)}


def make(out: Path, layers: int | None = None, shape: str = "big", progress=lambda _: None) -> Path:
    config, default_layers, shard_bytes = SHAPES[shape]
    return build_checkpoint(out, "llama", seed=0, dtype=torch.bfloat16, max_shard_bytes=shard_bytes,
                            num_hidden_layers=layers or default_layers, progress=progress, **config)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="big")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's own)")
    args = parser.parse_args()
    print(make(args.out, args.layers, args.shape))
