"""Find the co-permutation the official S2FT code applied when it saved a fine-tuned checkpoint.

The official code reorders heads and channels so that the trained ones are contiguous, and saves the
model in that order. Units it did not train keep their exact bytes in at least one tensor (usually
the q/k/v/up/gate rows when o/down were trained), so each tuned position is matched to the base units
with identical bytes there. Matching intersects the candidates of every tensor holding the unit, so a
tie is left only between units that are byte-identical everywhere they were compared; such a tie is
resolved in index order and is harmless: swapping identical units is itself a function-preserving
co-permutation. Units trained in every tensor that holds them are placed in ascending order.
"""

from __future__ import annotations

import numpy as np
import torch

from ..arch import ModelInfo, resolve_source
from ..errors import BaseMismatch, S2RegError
from ..format import dtypes
from ..format.arrays import as_array
from ..format.s2ft import axis_dim, take
from .permute import LayerPermutation, Permutation

_UNIT_KINDS = {"heads": ("q", "o"), "kv_heads": ("k", "v"), "channels": ("gate", "up", "down")}


def _unit_bytes(tensor: torch.Tensor, info: ModelInfo, name: str, role: str, expert: str | None = None) -> list[bytes]:
    c = info.coupling_of(name)
    table = info.unit_indices(name, role, range(info.unit_count(name, role)), expert)
    picked = np.moveaxis(take(as_array(tensor), c.axis, table), axis_dim(c.axis), 0)
    units = np.ascontiguousarray(picked).reshape(info.unit_count(name, role), -1)
    return [u.tobytes() for u in units]


def _candidates(base: torch.Tensor, tuned: torch.Tensor, info: ModelInfo, name: str, role: str,
                expert: str | None) -> list[set[int]]:
    """Per tuned position, the base units with the same bytes (empty where the unit was trained)."""
    where: dict[bytes, set[int]] = {}
    for unit, key in enumerate(_unit_bytes(base, info, name, role, expert)):
        where.setdefault(key, set()).add(unit)
    return [set(where.get(key, ())) for key in _unit_bytes(tuned, info, name, role, expert)]


def relocated_units(base: torch.Tensor, tuned: torch.Tensor, info: ModelInfo, name: str) -> int:
    """Changed units of ``tuned`` whose bytes equal a different unit of ``base`` (the mark of a co-permuted save)."""
    moved = 0
    experts: list[str | None] = list(info.stacked_experts(name)) or [None]
    for expert in experts:
        for role in info.coupling_of(name).roles:
            before = _unit_bytes(base, info, name, role, expert)
            where: dict[bytes, set[int]] = {}
            for unit, key in enumerate(before):
                where.setdefault(key, set()).add(unit)
            moved += sum(1 for pos, key in enumerate(_unit_bytes(tuned, info, name, role, expert))
                         if key != before[pos] and where.get(key, set()) - {pos})
    return moved


def _order(evidence: list[list[set[int]]], total: int, what: str) -> list[int]:
    """Combine per-tensor candidates into a full order (new position -> original unit)."""
    if not evidence:
        return list(range(total))
    known: list[set[int] | None] = [None] * total
    for per_tensor in evidence:
        for pos, cands in enumerate(per_tensor):
            if cands:
                prior = known[pos]
                known[pos] = set(cands) if prior is None else prior & cands
    order: dict[int, int] = {}
    taken: set[int] = set()
    # Positions with the same candidate set are a tie between byte-identical units: assign in index order.
    groups: dict[frozenset[int], list[int]] = {}
    for pos, found in enumerate(known):
        if found:
            groups.setdefault(frozenset(found), []).append(pos)
    for shared, positions in sorted(groups.items(), key=lambda kv: len(kv[0])):
        free = sorted(shared - taken)
        if len(free) < len(positions):
            raise S2RegError(f"{what}: the untouched units do not map one-to-one onto the base "
                             f"({len(positions)} positions share {len(free)} free candidates); is TUNED a fine-tune of BASE?")
        # the group's positions take its lowest free units; the rest stay free for the groups after it
        for pos, unit in zip(positions, free, strict=False):
            order[pos] = unit
            taken.add(unit)
    # Units trained in every tensor that holds them left no untouched bytes; they fill the remaining
    # positions in ascending order, as S2FT plans list a selection. Any other assignment would differ
    # only by a co-permutation of whole trained units, which computes the same function.
    missing_pos = [p for p in range(total) if p not in order]
    order.update(zip(missing_pos, sorted(set(range(total)) - taken), strict=True))  # one unit taken per position
    return [order[p] for p in range(total)]


def _check_dtypes(base, tuned, names: list[str]) -> None:
    for name in names:
        if name not in tuned:
            raise BaseMismatch(f"the tuned checkpoint has no tensor {name!r}; is it a fine-tune of this base?")
        if dtypes.name_of(base.dtype(name)) != dtypes.name_of(tuned.dtype(name)):
            raise S2RegError(
                f"the tuned checkpoint has a different dtype than the base ({name}: "
                f"{dtypes.name_of(tuned.dtype(name))} vs {dtypes.name_of(base.dtype(name))}); save it in "
                f"{dtypes.name_of(base.dtype(name))} before extracting")


def detect_permutation(base, tuned, info: ModelInfo | None = None) -> Permutation:
    """The co-permutation that turns BASE's unit order into TUNED's (identity layers omitted)."""
    info = info or resolve_source(base)
    coupled = [n for n in info.names() if (c := info.coupled(n)) and not c.follower]
    _check_dtypes(base, tuned, coupled)
    by_layer: dict[int, list[str]] = {}
    for name in coupled:
        by_layer.setdefault(info.coupling_of(name).layer, []).append(name)
    layers = {}
    for layer in range(info.dims.layers):
        evidence: dict[tuple[str, str | None], list[list[set[int]]]] = {}
        for name in by_layer.get(layer, []):
            c = info.coupling_of(name)
            b, t = base.get(name), tuned.get(name)
            unit_experts: list[str | None] = list(info.stacked_experts(name)) or [c.expert]
            for expert in unit_experts:
                for role in c.roles:
                    kind = next(k for k, roles in _UNIT_KINDS.items() if role in roles)
                    evidence.setdefault((kind, expert if kind == "channels" else None), []).append(
                        _candidates(b, t, info, name, role, expert if c.stacked else None))
        dims = info.dims
        heads = _order(evidence.get(("heads", None), []), dims.heads, f"layer {layer} heads")
        kv = _order(evidence.get(("kv_heads", None), []), dims.kv_heads, f"layer {layer} key/value heads")
        experts = {}
        dense: list[int] = []
        for expert in info.experts(layer):
            total = info.channel_count(layer, expert)
            order = _order(evidence.get(("channels", expert), []), total,
                           f"layer {layer} channels" + (f" of expert {expert}" if expert is not None else ""))
            if expert is None:
                dense = order
            elif order != list(range(total)):
                experts[expert] = order
        perm = LayerPermutation(heads, kv, dense, experts)
        perm.check(info, layer)
        if not perm.is_identity():
            layers[layer] = perm
    return Permutation(layers)
