"""Write a large deterministic synthetic Llama checkpoint (bf16, sharded) for the merge benchmark.

    python bench/make_big_checkpoint.py OUT_DIR [--layers 16]

Defaults give ~1.7 GB: hidden 2048, FFN 5632, 16 heads with 4 kv heads (GQA), 32k vocabulary.
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


def make(out: Path, layers: int = 16) -> Path:
    return build_checkpoint(out, "llama", seed=0, dtype=torch.bfloat16, max_shard_bytes=500 * 1024**2,
                            num_hidden_layers=layers, **BIG)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    print(make(args.out, args.layers))
