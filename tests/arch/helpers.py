"""Adapters and permutations made from a family description, for any model family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from s2reg.arch import CHANNEL_ROLES, HEAD_ROLES, ModelInfo, resolve_source
from s2reg.format import S2FTAdapter
from s2reg.format.s2ft import slice_shape
from s2reg.ops.permute import LayerPermutation, Permutation
from s2reg.tensors import open_source


def units_for(info: ModelInfo, role: str, heads: tuple[int, ...], channels: tuple[int, ...]) -> list[int]:
    if role in ("q", "o"):
        return list(heads)
    if role in ("k", "v"):
        return sorted({h // info.dims.group for h in heads})
    return list(channels)


def selection_adapter(directory: Path, heads=(1,), channels=(2, 5), layers=None, seed: int = 0,
                      scale: float = 0.02) -> S2FTAdapter:
    """Heads and channels in every trainable tensor of every role the family has (every expert too)."""
    g = torch.Generator().manual_seed(seed)
    with open_source(directory) as source:
        info = resolve_source(source)
        indices, groups = {}, {}
        for layer in layers if layers is not None else range(info.dims.layers):
            for role in info.roles:
                for expert in info.experts(layer) if role in CHANNEL_ROLES else [None]:
                    for name in info.tensors(role, layer, expert):
                        c = info.coupled(name)
                        of = expert if c.stacked else None  # a stacked tensor holds every expert's channels
                        indices.setdefault(name, []).extend(
                            info.unit_indices(name, r, units_for(info, r, heads, channels), of) for r in c.roles)
                        if set(c.roles) <= set(HEAD_ROLES):
                            groups[name] = info.dims.head_dim
        slices = {}
        for name, parts in indices.items():
            axis, index = info.coupled(name).axis, np.unique(np.concatenate(parts))
            shape = slice_shape(tuple(source.shape(name)), axis, index.size)
            slices[name] = (axis, index, torch.randn(*shape, generator=g) * scale)
        return S2FTAdapter.from_slices(source, slices, base_name="zoo", group_sizes=groups)


def shuffled(n: int, g: torch.Generator) -> list[int]:
    """A random permutation of ``range(n)`` that moves something whenever it can."""
    while True:
        order = torch.randperm(n, generator=g).tolist()
        if n < 2 or order != list(range(n)):
            return order


def random_permutation(info: ModelInfo, seed: int = 0) -> Permutation:
    """Every layer's heads (GQA-consistent), kv heads and channels (per expert) shuffled."""
    g = torch.Generator().manual_seed(seed)
    dims = info.dims
    layers = {}
    for layer in range(dims.layers):
        kv = shuffled(dims.kv_heads, g)
        heads = [k * dims.group + j for k in kv for j in shuffled(dims.group, g)]
        experts, dense = {}, []
        for expert in info.experts(layer):
            order = shuffled(info.channel_count(layer, expert), g)
            if expert is None:
                dense = order
            else:
                experts[expert] = order
        layers[layer] = LayerPermutation(heads, kv, dense, experts)
    return Permutation(layers)
