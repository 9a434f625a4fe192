"""Co-permutations of coupled projections: function-preserving reorderings of heads and channels.

Reordering attention heads consistently in every tensor that holds them (q/k/v output units, o input
units, their biases, per-head norms and sinks), or FFN channels in up/gate and down, leaves the model's
function unchanged (up to float reassociation) while making a selection contiguous, which is what
S2FT's dense-slice training wants. With grouped-query attention a query head must stay with its
key/value group, so a plan reorders whole kv groups and, inside each group, its query heads. MoE
channels are reordered per expert. Where a head or channel sits in a stored tensor (fused, grouped,
transposed) is the family description's business: ``ModelInfo.permute_index``.

A permutation is stored as "new position -> original index" lists; applying one is a gather, hence
exact, and applying the inverse restores the original bits. Checkpoints record theirs in
``s2reg-permutation.json`` (spec/SURGERY.md §4).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..arch import CHANNEL_ROLES, ModelInfo, resolve_source
from ..errors import S2RegError, ShapeError, listing
from ..format import Adapter, S2FTTarget
from ..format.arrays import as_array, is_torch, to_torch
from ..format.s2ft import axis_dim, axis_length, gather
from ..kinds import kind_of
from ..records import RECORD_VERSION, RecordError, checked, read_record
from ..tensors.reader import PERMUTATION_NAME

Selection = tuple[dict[int, set[int]], dict[int, dict[str | None, set[int]]]]


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for new, old in enumerate(order):
        inverse[old] = new
    return inverse


def _selected_first(selected: Iterable[int], total: int, what: str) -> list[int]:
    chosen = sorted(set(selected))
    if chosen and not 0 <= chosen[0] <= chosen[-1] < total:
        raise ShapeError(f"{what} selection {chosen} out of range 0..{total - 1}")
    rest = [i for i in range(total) if i not in set(chosen)]
    return chosen + rest


def _identity(order: list[int]) -> bool:
    return order == list(range(len(order)))


@dataclass(frozen=True)
class LayerPermutation:
    """One layer's reordering (new position -> original): query heads, kv heads, dense FFN channels, experts' channels."""

    heads: list[int]
    kv_heads: list[int]
    channels: list[int]
    experts: dict[str, list[int]] = field(default_factory=dict)

    def order_for(self, role: str, expert: str | None) -> list[int] | None:
        """The order of ``role``'s units (what ``ModelInfo.permute_index`` asks)."""
        if role in ("q", "o"):
            return self.heads
        if role in ("k", "v"):
            return self.kv_heads
        return self.channels if expert is None else self.experts.get(expert)

    def check(self, info: ModelInfo, layer: int) -> None:
        dims = info.dims
        expected = [("heads", self.heads, dims.heads), ("kv_heads", self.kv_heads, dims.kv_heads)]
        for expert in info.experts(layer):
            order = self.channels if expert is None else self.experts.get(expert)
            if order is not None or expert is None:
                expected.append((f"expert {expert} channels" if expert else "channels", order or [],
                                 info.channel_count(layer, expert)))
        unknown = set(self.experts) - {e for e in info.experts(layer) if e is not None}
        if self.channels and None not in info.experts(layer):
            raise ShapeError(f"layer {layer} has no dense FFN to reorder; MoE channels are ordered per expert")
        if unknown:
            raise ShapeError(f"layer {layer}: no expert {sorted(unknown)[0]!r} in this model")
        for what, order, total in expected:
            if sorted(order) != list(range(total)):
                raise ShapeError(f"layer {layer}: {what} is not a permutation of 0..{total - 1}")
        position_of_kv = _inverse(self.kv_heads)
        for new, old in enumerate(self.heads):
            if position_of_kv[old // dims.group] != new // dims.group:
                raise ShapeError(f"layer {layer}: query head {old} would leave its key/value group (GQA)")

    def inverse(self) -> LayerPermutation:
        return LayerPermutation(_inverse(self.heads), _inverse(self.kv_heads), _inverse(self.channels),
                                {e: _inverse(o) for e, o in self.experts.items()})

    def is_identity(self) -> bool:
        return all(_identity(o) for o in (self.heads, self.kv_heads, self.channels, *self.experts.values()))

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"heads": self.heads, "kv_heads": self.kv_heads, "channels": self.channels}
        if self.experts:
            out["experts"] = self.experts
        return out


@dataclass(frozen=True)
class Permutation:
    """A co-permutation of a whole model: one :class:`LayerPermutation` per layer that moves."""

    layers: dict[int, LayerPermutation]

    def inverse(self) -> Permutation:
        return Permutation({i: p.inverse() for i, p in self.layers.items()})

    def as_json(self) -> dict[str, Any]:
        return {"layers": {str(i): p.as_json() for i, p in sorted(self.layers.items())}}

    @classmethod
    def from_json(cls, data: Any) -> Permutation:
        """Parse :meth:`as_json`'s layout (types only; :meth:`check` fits it to a model)."""
        def order(value: Any) -> list[int]:
            if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise ValueError
            return value

        try:
            layers = {int(i): LayerPermutation(order(p["heads"]), order(p["kv_heads"]), order(p["channels"]),
                                               {str(e): order(o) for e, o in p.get("experts", {}).items()})
                      for i, p in data["layers"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise S2RegError("malformed permutation record (expected layers -> heads, kv_heads, channels)") from None
        return cls(layers)

    def check(self, info: ModelInfo) -> Permutation:
        """``self``, after checking that it is a valid co-permutation of the model ``info`` describes."""
        for i, p in self.layers.items():
            if not 0 <= i < info.dims.layers:
                raise ShapeError(f"permutation names layer {i}, the model has {info.dims.layers}")
            p.check(info, i)
        return self

    def index_of(self, info: ModelInfo):
        """``name -> (FORMAT axis, gather index) | None``: this permutation for a permuted view of a tensor source."""
        def index(name: str) -> tuple[str, np.ndarray] | None:
            c = info.coupled(name)
            return info.permute_index(name, self.layers.get(c.layer)) if c else None
        return index


def plan(info: ModelInfo, heads: Mapping[int, Iterable[int]],
         channels: Mapping[int, Iterable[int] | Mapping[str | None, Iterable[int]]]) -> Permutation:
    """The permutation that moves the selected heads and channels of each layer to the front.

    Channels become contiguous (per expert in MoE layers: ``channels[layer]`` is then
    ``{expert: [...]}``). Heads are contiguous within each kv group: groups holding selected heads
    come first, and within a group its selected heads come first (GQA allows no more).
    """
    dims = info.dims
    layers = {}
    for layer in sorted(set(heads) | set(channels)):
        if not 0 <= layer < dims.layers:
            raise ShapeError(f"layer {layer} out of range 0..{dims.layers - 1}")
        chosen = set(heads.get(layer, ()))
        if chosen:
            info.require_roles(["q"])
        if chosen and not 0 <= min(chosen) <= max(chosen) < dims.heads:
            raise ShapeError(f"layer {layer}: head selection {listing(sorted(chosen))} "
                             f"out of range 0..{dims.heads - 1}")
        kv_order = _selected_first({h // dims.group for h in chosen}, dims.kv_heads, f"layer {layer} kv head")
        head_order = []
        for kv in kv_order:
            members = range(kv * dims.group, (kv + 1) * dims.group)
            head_order += sorted(h for h in members if h in chosen) + [h for h in members if h not in chosen]
        wanted = channels.get(layer, ())
        per_expert = dict(wanted) if isinstance(wanted, Mapping) else {None: wanted}
        dense: list[int] | None = None
        orders: dict[str, list[int]] = {}  # by expert
        for expert, selected in per_expert.items():
            if not selected:
                continue
            expert = None if expert in (None, "", "dense") else str(expert)
            if expert not in info.experts(layer):
                raise ShapeError(f"layer {layer} has no {'dense FFN' if expert is None else f'expert {expert!r}'}"
                                 f" (its FFN: {', '.join(str(e) for e in info.experts(layer))})")
            order = _selected_first(selected, info.channel_count(layer, expert), f"layer {layer} channel")
            if expert is None:
                dense = order
            else:
                orders[expert] = order
        if dense is None:
            dense = list(range(info.channel_count(layer))) if None in info.experts(layer) else []
        p = LayerPermutation(head_order, kv_order, dense, {e: o for e, o in orders.items() if not _identity(o)})
        p.check(info, layer)
        if not p.is_identity():
            layers[layer] = p
    return Permutation(layers)


def selection_of(adapter: Adapter, info: ModelInfo) -> Selection:
    """Heads and channels per layer that an S2FT adapter touches (the plan that makes them contiguous).

    Channels are ``{layer: {expert: channels}}`` with expert None for a dense FFN.
    """
    heads: dict[int, set[int]] = {}
    channels: dict[int, dict[str | None, set[int]]] = {}
    for name, target in adapter.targets.items():
        c = info.coupled(name)
        region = kind_of(target).region(target)  # only the rows or columns a target rewrites hold heads and channels
        if c is None or c.follower or region is None:
            continue
        for expert, touched in info.expert_units(name, region[1]).items():
            for role, units in touched.items():
                if role in ("q", "o"):
                    heads.setdefault(c.layer, set()).update(units)
                elif role in ("k", "v"):
                    g = info.dims.group
                    heads.setdefault(c.layer, set()).update(h for kv in units for h in range(kv * g, (kv + 1) * g))
                elif role in CHANNEL_ROLES:
                    channels.setdefault(c.layer, {}).setdefault(expert, set()).update(units)
    return heads, channels


def permute_tensor(name: str, tensor: Any, permutation: Permutation, info: ModelInfo) -> Any:
    """``tensor`` reordered by ``permutation`` (itself when the tensor is not coupled or not moved).

    A numpy array gives a numpy array, a torch tensor a torch tensor: the gather is numpy's either way."""
    found = permutation.index_of(info)(name)
    if found is None:
        return tensor
    axis, index = found
    if axis_length(tuple(tensor.shape), axis) != index.size:
        raise ShapeError(f"{name}: its {axis} are {axis_length(tuple(tensor.shape), axis)}, the permutation covers "
                         f"{index.size}")
    moved = gather(as_array(tensor), axis, index)
    return to_torch(moved) if is_torch(tensor) else moved


def permute_s2ft_target(name: str, target: S2FTTarget, permutation: Permutation, info: ModelInfo) -> S2FTTarget:
    """The same delta expressed in the permuted coordinates (indices mapped, slices reordered)."""
    found = permutation.index_of(info)(name)
    if found is None:
        return target
    axis, index = found
    if target.indices.size and axis != target.axis:
        raise S2RegError(f"{name}: a {target.axis} slice cannot be permuted along {axis}")
    position = np.empty_like(index)
    position[index] = np.arange(index.size)
    moved = position[target.indices.astype(np.int64)]
    order = np.argsort(moved, kind="stable")
    positions = np.empty_like(order)
    positions[order] = np.arange(order.size)
    return target.reordered(moved[order], positions, np.take(target.delta, order, axis=axis_dim(axis)))


@dataclass(frozen=True)
class PermutationRecord:
    """``s2reg-permutation.json`` (spec/SURGERY.md §4): the co-permutation a checkpoint was written with.

    Its fit to the model (layer count, head, kv-head and per-expert channel counts, GQA groups) is
    checked by ``permutation.check(info)`` once the checkpoint's family is known.
    """

    FORMAT = "s2reg.permutation"
    NAME = PERMUTATION_NAME

    permutation: Permutation

    def to_json(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "version": RECORD_VERSION, "permutation": self.permutation.as_json()}

    @classmethod
    def from_json(cls, data: Any) -> PermutationRecord:
        data = checked(data, cls.FORMAT)
        try:
            return cls(Permutation.from_json(data.get("permutation")))
        except S2RegError as exc:
            raise RecordError(str(exc)) from None


def to_original(name: str, tensor: Any, permutation: tuple[Permutation, ModelInfo] | None) -> Any:
    """A tensor (numpy or torch) of a co-permuted checkpoint in original coordinates (as it is when not permuted)."""
    if permutation is None:
        return tensor
    perm, info = permutation
    return permute_tensor(name, tensor, perm.inverse(), info)


def read_permutation(source: Any, arch_file: Any = None) -> tuple[Permutation, ModelInfo] | None:
    """The co-permutation a checkpoint was written with (spec/SURGERY.md §4), if any."""
    file = source.directory / PermutationRecord.NAME
    if not file.is_file():
        return None
    record = read_record(file, PermutationRecord.from_json)
    info = resolve_source(source, arch_file)
    return record.permutation.check(info), info
