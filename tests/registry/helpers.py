"""Adapters to store: small S2FT/PISA adapters against a tiny synthetic base."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from s2reg import S2FTAdapter
from s2reg.synth import build_checkpoint
from s2reg.tensors import CheckpointSource

DOWN = "model.layers.0.mlp.down_proj.weight"


def base_checkpoint(path: Path, seed: int = 0) -> Path:
    return build_checkpoint(path, "llama", seed=seed, dtype=torch.bfloat16)


def adapter_dir(base: Path, out: Path, seed: int = 1) -> Path:
    with CheckpointSource(base) as source:
        g = torch.Generator().manual_seed(seed)
        adapter = S2FTAdapter.from_slices(
            source, {DOWN: ("columns", [seed % 7, 20, 30], torch.randn(64, 3, generator=g) * 0.05)}, base_name="tiny")
    adapter.save(out)
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (to show a store did not change)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock"}
