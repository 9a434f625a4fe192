"""Choosing heads and FFN channels: the S2FT paper's strategies R, W, A, S and G.

A head is scored on the output projection (``o``), an FFN channel on the down projection of its
expert (``down``): the stored indices a unit owns come from the family description, and a unit's
score is the L2 norm over them of a per-index quantity: the weight itself (``weight``), the input
activations over a calibration set (``activation``), their product (``weight_activation``), or the
loss gradient of the weight (``gradient``, reduced as each layer's gradient arrives and then
dropped). ``random`` is a seeded permutation. Activation and gradient scores need the projection to
be a matmul layer the model calls directly (not the fused 3-D experts of an MoE layer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import S2RegError
from ..format import Adapter
from ..kinds import kind_of
from ..arch.matmul import matmul_kind
from .s2ft.config import HEAD_ROLES
from .targets import Coupled, ModelMap, kv_to_heads

SCORED_ROLE = {"heads": "o", "channels": "down"}
Unit = tuple[str, int, str | None]  # (kind "heads"|"channels", layer, expert or None)
Scores = dict[Unit, torch.Tensor]  # per unit id


def units(mapping: ModelMap, layers: Iterable[int], kinds: Iterable[str]) -> list[Unit]:
    found: list[Unit] = []
    for layer in layers:
        for kind in kinds:
            experts: list[str | None] = [None] if kind == "heads" else mapping.info.experts(layer)
            found += [(kind, layer, expert) for expert in experts]
    return found


def total(mapping: ModelMap, unit: Unit) -> int:
    kind, layer, expert = unit
    return mapping.info.dims.heads if kind == "heads" else mapping.info.channel_count(layer, expert)


def _scored_tensor(mapping: ModelMap, unit: Unit) -> Coupled:
    kind, layer, expert = unit
    role = SCORED_ROLE[kind]
    candidates = mapping.tensors(role, layer, expert)
    if not candidates:
        raise S2RegError(f"layer {layer} has no {role} projection to score {kind} by; use --strategy random")
    return candidates[0]


def _per_unit(mapping: ModelMap, unit: Unit, per_index: torch.Tensor) -> torch.Tensor:
    """Unit norms from per-stored-index sums of squares along the scored tensor's unit axis."""
    c = _scored_tensor(mapping, unit)
    role = SCORED_ROLE[unit[0]]
    count = mapping.info.unit_count(c.name, role)
    table = torch.from_numpy(mapping.info.unit_indices(c.name, role, range(count)).reshape(count, -1))  # unit by unit
    return per_index[table].sum(1).sqrt()


def _other_axis(c: Coupled) -> int:
    return 1 if c.axis == "rows" else 0


def weight_scores(mapping: ModelMap, chosen: list[Unit]) -> Scores:
    scores = {}
    for unit in chosen:
        c = _scored_tensor(mapping, unit)
        per_index = c.placement.stored_value(mapping.model).double().pow(2).sum(_other_axis(c)).cpu()
        scores[unit] = _per_unit(mapping, unit, per_index)
    return scores


def _matmul_modules(mapping: ModelMap, chosen: list[Unit], strategy: str) -> dict[Unit, nn.Module]:
    modules = {}
    for unit in chosen:
        c = _scored_tensor(mapping, unit)
        module, attr = mapping.owner(c.placement.parameter)
        if c.placement.converted or attr != "weight" or matmul_kind(module) is None:
            raise S2RegError(f"the {strategy} strategy needs {c.name} to be a linear layer of its own (it is part of "
                             f"{c.placement.parameter}); use --strategy random or weight")
        modules[unit] = module
    return modules


def activation_scores(model: nn.Module, mapping: ModelMap, chosen: list[Unit], batches) -> Scores:
    # o and down read their units on their input features, whatever the storage
    modules = _matmul_modules(mapping, chosen, "activation")
    sums: dict[Unit, torch.Tensor] = {}

    def record(unit):
        def hook(module, args, output) -> None:  # must return None: a value would replace the output
            x = args[0].detach().double()
            s = x.reshape(-1, x.shape[-1]).pow(2).sum(0).cpu()
            sums[unit] = s if unit not in sums else sums[unit] + s
        return hook

    hooks = [m.register_forward_hook(record(unit)) for unit, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in _require(batches, "activation"):
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in hooks:
            h.remove()
    return _scores_of_sums(mapping, modules, sums, "activation")


def gradient_scores(model: nn.Module, mapping: ModelMap, chosen: list[Unit], batches) -> Scores:
    modules = _matmul_modules(mapping, chosen, "gradient")
    axes = {unit: _other_axis(_scored_tensor(mapping, unit)) for unit in modules}
    sums: dict[Unit, torch.Tensor] = {}
    weights = {unit: m.get_parameter("weight") for unit, m in modules.items()}  # _matmul_modules checked it is one
    flags = {unit: w.requires_grad for unit, w in weights.items()}
    hooks = []
    for unit, weight in weights.items():
        weight.requires_grad_(True)

        def reduce(param, unit=unit):  # reduce each gradient as it arrives, then drop it
            s = param.grad.detach().double().pow(2).sum(axes[unit]).cpu()
            sums[unit] = s if unit not in sums else sums[unit] + s
            param.grad = None

        hooks.append(weight.register_post_accumulate_grad_hook(reduce))
    try:
        for batch in _require(batches, "gradient"):
            model(**batch).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for unit, weight in weights.items():
            weight.requires_grad_(flags[unit])
    return _scores_of_sums(mapping, modules, sums, "gradient")


def _scores_of_sums(mapping: ModelMap, modules: Mapping[Unit, nn.Module], sums: Mapping[Unit, torch.Tensor],
                    strategy: str) -> Scores:
    """Each unit's scores from the per-index sums the calibration batches left; every unit must have some."""
    if unseen := [_scored_tensor(mapping, unit).name for unit in modules if unit not in sums]:
        raise S2RegError(f"the {strategy} strategy saw no calibration batch reach {', '.join(unseen)}: the "
                         "calibration data is empty")
    return {unit: _per_unit(mapping, unit, sums[unit]) for unit in modules}


def _require(batches, strategy: str):
    if batches is None:
        raise S2RegError(f"the {strategy} strategy needs calibration data (pass calibration batches / --data)")
    return batches


def excluded_units(adapters: Iterable[Adapter], mapping: ModelMap) -> dict[Unit, set[int]]:
    """Heads and channels (per layer and expert) that existing S2FT adapters already train."""
    taken: dict[Unit, set[int]] = {}
    for adapter in adapters:
        for name, target in adapter.targets.items():
            c = mapping.coupled.get(mapping.stored(name))
            region = kind_of(target).region(target)  # only the rows or columns a target rewrites hold units
            if c is None or region is None:
                continue
            for role, ids in mapping.info.units_of(c.name, region[1].tolist()).items():
                if role in ("k", "v"):  # a key/value head serves its whole query group
                    ids = kv_to_heads(ids, mapping)
                kind = "heads" if role in HEAD_ROLES else "channels"
                taken.setdefault((kind, c.layer, None if kind == "heads" else c.expert), set()).update(ids)
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
           order: str, seed: int, exclude: Iterable[Adapter] = (), calibration=None) -> dict[int, dict]:
    """``{layer: {"heads": [...], "channels": [...]}}``; in an MoE layer ``"channels"`` is ``{expert: [...]}``."""
    kinds = [k for k in ("heads", "channels") if counts.get(k)]
    chosen = units(mapping, layers, kinds)
    if strategy == "random":
        scores: Scores = {}
    elif strategy == "weight":
        scores = weight_scores(mapping, chosen)
    elif strategy == "activation":
        scores = activation_scores(model, mapping, chosen, calibration)
    elif strategy == "weight_activation":
        w, a = weight_scores(mapping, chosen), activation_scores(model, mapping, chosen, calibration)
        scores = {key: w[key] * a[key] for key in w}
    elif strategy == "gradient":
        scores = gradient_scores(model, mapping, chosen, calibration)
    else:
        raise S2RegError(f"unknown selection strategy {strategy!r}")
    taken = excluded_units(exclude, mapping)
    generator = torch.Generator().manual_seed(seed)
    selection: dict[int, dict] = {layer: {} for layer in layers}
    for unit in chosen:
        kind, layer, expert = unit
        picked = choose(counts[kind], total(mapping, unit), scores=scores.get(unit), order=order,
                        excluded=taken.get(unit, set()), generator=generator)
        if kind == "heads" or mapping.info.experts(layer) == [None]:
            selection[layer][kind] = picked
        else:
            selection[layer].setdefault(kind, {})[expert] = picked
    return selection
