"""Choosing heads and FFN channels: the S2FT paper's strategies R, W, A, S and G.

Scores are per unit (a head is a block of ``head_dim`` input columns of the output projection, a
channel one input column of the down projection): ``weight`` is the unit's weight norm, ``activation``
the norm of its input activations over a calibration set, ``weight_activation`` their product, and
``gradient`` the norm of the loss gradient of its weights, reduced as each layer's gradient arrives
and then dropped (never kept for the whole model). ``random`` is a seeded permutation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import S2RegError
from ..format import Adapter
from ..ops.permute import selection_of
from .targets import ModelMap

Scores = dict[tuple[str, int], torch.Tensor]  # (unit kind "heads"|"channels", layer) -> score per unit


def _unit_norms(columns_sq: torch.Tensor, kind: str, head_dim: int) -> torch.Tensor:
    """Per-unit L2 norms from per-input-column sums of squares."""
    if kind == "heads":
        columns_sq = columns_sq.reshape(-1, head_dim).sum(1)
    return columns_sq.sqrt()


def _modules(mapping: ModelMap, layers: Iterable[int], kinds: Iterable[str]) -> dict[tuple[str, int], nn.Linear]:
    role = {"heads": "o", "channels": "down"}
    return {(kind, layer): mapping.linear(role[kind], layer)[1] for layer in layers for kind in kinds}


def weight_scores(mapping: ModelMap, layers, kinds) -> Scores:
    hd = mapping.info.dims.head_dim
    return {key: _unit_norms(m.weight.detach().double().pow(2).sum(0), key[0], hd)
            for key, m in _modules(mapping, layers, kinds).items()}


def activation_scores(model: nn.Module, mapping: ModelMap, layers, kinds, batches) -> Scores:
    modules = _modules(mapping, layers, kinds)
    sums = {key: torch.zeros(m.in_features, dtype=torch.float64) for key, m in modules.items()}
    def record(key):
        def hook(module, args, output) -> None:  # must return None: a value would replace the output
            x = args[0].detach().double()
            sums[key].add_(x.reshape(-1, x.shape[-1]).pow(2).sum(0).cpu())
        return hook

    hooks = [m.register_forward_hook(record(key)) for key, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in _require(batches, "activation"):
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in hooks:
            h.remove()
    hd = mapping.info.dims.head_dim
    return {key: _unit_norms(s, key[0], hd) for key, s in sums.items()}


def gradient_scores(model: nn.Module, mapping: ModelMap, layers, kinds, batches) -> Scores:
    modules = _modules(mapping, layers, kinds)
    sums = {key: torch.zeros(m.in_features, dtype=torch.float64) for key, m in modules.items()}
    flags = {key: m.weight.requires_grad for key, m in modules.items()}
    hooks = []
    for key, m in modules.items():
        m.weight.requires_grad_(True)

        def reduce(param, key=key):  # reduce each gradient as it arrives, then drop it
            sums[key].add_(param.grad.detach().double().pow(2).sum(0).cpu())
            param.grad = None

        hooks.append(m.weight.register_post_accumulate_grad_hook(reduce))
    try:
        for batch in _require(batches, "gradient"):
            model(**batch).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for key, m in modules.items():
            m.weight.requires_grad_(flags[key])
    hd = mapping.info.dims.head_dim
    return {key: _unit_norms(s, key[0], hd) for key, s in sums.items()}


def _require(batches, strategy: str):
    if batches is None:
        raise S2RegError(f"the {strategy} strategy needs calibration data (pass calibration batches / --data)")
    return batches


def excluded_units(adapters: Iterable[Adapter], mapping: ModelMap) -> dict[tuple[str, int], set[int]]:
    """Heads and channels per layer that existing S2FT adapters already train."""
    taken: dict[tuple[str, int], set[int]] = {}
    for adapter in adapters:
        heads, channels = selection_of(adapter, mapping.info.arch, mapping.info.dims)
        for kind, found in (("heads", heads), ("channels", channels)):
            for layer, units in found.items():
                taken.setdefault((kind, layer), set()).update(units)
    return taken


def choose(count: int, total: int, *, scores: torch.Tensor | None, order: str, excluded: set[int],
           generator: torch.Generator) -> list[int]:
    """``count`` units out of ``total``: random (``scores`` None) or by score, never from ``excluded``."""
    allowed = torch.tensor([i for i in range(total) if i not in excluded], dtype=torch.long)
    if count > allowed.numel():
        raise S2RegError(f"asked for {count} units but only {allowed.numel()} of {total} are free (exclusions)")
    if scores is None:
        picked = allowed[torch.randperm(allowed.numel(), generator=generator)[:count]]
    else:
        ranked = scores[allowed].argsort(descending=order == "largest", stable=True)
        picked = allowed[ranked[:count]]
    return sorted(picked.tolist())


def select(model: nn.Module, mapping: ModelMap, *, layers: list[int], counts: Mapping[str, int], strategy: str,
           order: str, seed: int, exclude: Iterable[Adapter] = (), calibration=None) -> dict[int, dict[str, list[int]]]:
    """``{layer: {"heads": [...], "channels": [...]}}`` chosen by ``strategy``."""
    kinds = [k for k in ("heads", "channels") if counts.get(k)]
    if strategy == "random":
        scores: Scores = {}
    elif strategy == "weight":
        scores = weight_scores(mapping, layers, kinds)
    elif strategy == "activation":
        scores = activation_scores(model, mapping, layers, kinds, calibration)
    elif strategy == "weight_activation":
        w, a = weight_scores(mapping, layers, kinds), activation_scores(model, mapping, layers, kinds, calibration)
        scores = {key: w[key] * a[key] for key in w}
    elif strategy == "gradient":
        scores = gradient_scores(model, mapping, layers, kinds, calibration)
    else:
        raise S2RegError(f"unknown selection strategy {strategy!r}")
    taken = excluded_units(exclude, mapping)
    totals = {"heads": mapping.info.dims.heads, "channels": mapping.info.dims.intermediate}
    generator = torch.Generator().manual_seed(seed)
    return {layer: {kind: choose(counts[kind], totals[kind], scores=scores.get((kind, layer)), order=order,
                                 excluded=taken.get((kind, layer), set()), generator=generator) for kind in kinds}
            for layer in layers}
