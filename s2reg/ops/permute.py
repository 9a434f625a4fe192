"""Co-permutations of coupled projections: function-preserving reorderings of heads and channels.

Reordering attention heads consistently in the q/k/v rows and the o columns, or FFN channels in
the up/gate rows and the down columns, leaves the model's function unchanged (up to float
reassociation) while making a selection contiguous, which is what S2FT's dense-slice training
wants. With grouped-query attention a query head must stay with its key/value group, so a plan
reorders whole kv groups and, inside each group, its query heads.

A permutation is stored as "new position -> original index" lists; applying one is a gather,
hence exact, and applying the inverse restores the original bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..arch import Architecture, Dims
from ..errors import S2RegError, ShapeError
from ..format import Adapter, S2FTTarget


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for new, old in enumerate(order):
        inverse[old] = new
    return inverse


def _selected_first(selected: Iterable[int], total: int) -> list[int]:
    chosen = sorted(set(selected))
    if chosen and not 0 <= chosen[0] <= chosen[-1] < total:
        raise ShapeError(f"selection {chosen} out of range 0..{total - 1}")
    rest = [i for i in range(total) if i not in set(chosen)]
    return chosen + rest


@dataclass(frozen=True)
class LayerPermutation:
    """One layer's reordering: query heads, kv heads and FFN channels (new position -> original)."""

    heads: list[int]
    kv_heads: list[int]
    channels: list[int]

    def check(self, dims: Dims, layer: int) -> None:
        for what, order, total in (("heads", self.heads, dims.heads), ("kv_heads", self.kv_heads, dims.kv_heads),
                                   ("channels", self.channels, dims.intermediate)):
            if sorted(order) != list(range(total)):
                raise ShapeError(f"layer {layer}: {what} is not a permutation of 0..{total - 1}")
        position_of_kv = _inverse(self.kv_heads)
        for new, old in enumerate(self.heads):
            if position_of_kv[old // dims.group] != new // dims.group:
                raise ShapeError(f"layer {layer}: query head {old} would leave its key/value group (GQA)")

    def inverse(self) -> LayerPermutation:
        return LayerPermutation(_inverse(self.heads), _inverse(self.kv_heads), _inverse(self.channels))

    def is_identity(self) -> bool:
        return all(order == sorted(order) for order in (self.heads, self.kv_heads, self.channels))


@dataclass(frozen=True)
class Permutation:
    """A co-permutation of a whole model: one :class:`LayerPermutation` per layer that moves."""

    layers: dict[int, LayerPermutation]

    def inverse(self) -> Permutation:
        return Permutation({i: p.inverse() for i, p in self.layers.items()})

    def as_json(self) -> dict[str, Any]:
        return {"layers": {str(i): {"heads": p.heads, "kv_heads": p.kv_heads, "channels": p.channels}
                           for i, p in sorted(self.layers.items())}}

    @classmethod
    def from_json(cls, data: Any) -> Permutation:
        """Parse :meth:`as_json`'s layout (types only; :meth:`check` fits it to a model)."""
        def order(value: Any) -> list[int]:
            if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise ValueError
            return value

        try:
            layers = {int(i): LayerPermutation(order(p["heads"]), order(p["kv_heads"]), order(p["channels"]))
                      for i, p in data["layers"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise S2RegError("malformed permutation record (expected layers -> heads, kv_heads, channels)") from None
        return cls(layers)

    def check(self, dims: Dims) -> Permutation:
        """``self``, after checking that it is a valid co-permutation of a model with ``dims``."""
        for i, p in self.layers.items():
            if not 0 <= i < dims.layers:
                raise ShapeError(f"permutation names layer {i}, the model has {dims.layers}")
            p.check(dims, i)
        return self


def plan(dims: Dims, heads: Mapping[int, Iterable[int]], channels: Mapping[int, Iterable[int]]) -> Permutation:
    """The permutation that moves the selected heads and channels of each layer to the front.

    Channels become contiguous. Heads are contiguous within each kv group: groups holding selected
    heads come first, and within a group its selected heads come first (GQA allows no more).
    """
    layers = {}
    for layer in sorted(set(heads) | set(channels)):
        chosen = set(heads.get(layer, ()))
        if chosen and not 0 <= min(chosen) <= max(chosen) < dims.heads:
            raise ShapeError(f"layer {layer}: head selection {sorted(chosen)} out of range 0..{dims.heads - 1}")
        kv_order = _selected_first({h // dims.group for h in chosen}, dims.kv_heads)
        head_order = []
        for kv in kv_order:
            members = range(kv * dims.group, (kv + 1) * dims.group)
            head_order += sorted(h for h in members if h in chosen) + [h for h in members if h not in chosen]
        p = LayerPermutation(head_order, kv_order, _selected_first(channels.get(layer, ()), dims.intermediate))
        p.check(dims, layer)
        if not p.is_identity():
            layers[layer] = p
    return Permutation(layers)


def selection_of(adapter: Adapter, arch: Architecture, dims: Dims) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
    """Heads and channels per layer that an S2FT adapter touches (the plan that makes them contiguous)."""
    heads: dict[int, set[int]] = {}
    channels: dict[int, set[int]] = {}
    for name, target in adapter.targets.items():
        found = arch.role_of(name)
        if found is None or not isinstance(target, S2FTTarget):
            continue
        role, layer, _ = found
        idx = {int(i) for i in target.indices}
        if role in ("q", "o"):
            heads.setdefault(layer, set()).update(i // dims.head_dim for i in idx)
        elif role in ("k", "v"):
            heads.setdefault(layer, set()).update(
                h for kv in {i // dims.head_dim for i in idx} for h in range(kv * dims.group, (kv + 1) * dims.group))
        else:
            channels.setdefault(layer, set()).update(idx)
    return heads, channels


def index_map(role: str, perm: LayerPermutation, dims: Dims) -> tuple[int, torch.Tensor] | None:
    """``(dim, gather index)`` that permutes a tensor of ``role``; None when the role does not move."""
    def blocks(order: list[int]) -> torch.Tensor:
        order_t = torch.tensor(order, dtype=torch.long)
        return (order_t[:, None] * dims.head_dim + torch.arange(dims.head_dim)).reshape(-1)

    if role == "q":
        return 0, blocks(perm.heads)
    if role in ("k", "v"):
        return 0, blocks(perm.kv_heads)
    if role == "o":
        return 1, blocks(perm.heads)
    if role in ("up", "gate"):
        return 0, torch.tensor(perm.channels, dtype=torch.long)
    if role == "down":
        return 1, torch.tensor(perm.channels, dtype=torch.long)
    raise S2RegError(f"unknown role {role!r}")


def permute_tensor(name: str, tensor: torch.Tensor, permutation: Permutation, arch: Architecture, dims: Dims) -> torch.Tensor:
    """``tensor`` reordered by ``permutation`` (itself when the tensor is not coupled or not moved)."""
    found = arch.role_of(name)
    if found is None:
        return tensor
    role, layer, part = found
    perm = permutation.layers.get(layer)
    if perm is None or (part == "bias" and role in ("o", "down")):
        return tensor  # output-side biases live in the residual stream, which does not move
    dim, index = index_map(role, perm, dims)
    if tensor.shape[dim] != index.numel():
        raise ShapeError(f"{name}: dimension {dim} is {tensor.shape[dim]}, the permutation covers {index.numel()}")
    return tensor.index_select(dim, index)


def permute_s2ft_target(name: str, target: S2FTTarget, permutation: Permutation, arch: Architecture, dims: Dims) -> S2FTTarget:
    """The same delta expressed in the permuted coordinates (indices mapped, slices reordered)."""
    found = arch.role_of(name)
    perm = permutation.layers.get(found[1]) if found else None
    if perm is None or (found[2] == "bias" and found[0] in ("o", "down")):
        return target
    dim, index = index_map(found[0], perm, dims)
    if (dim == 0) != (target.axis == "rows"):
        raise S2RegError(f"{name}: a {target.axis} slice cannot be permuted along dimension {dim}")
    position = torch.empty_like(index)
    position[index] = torch.arange(index.numel())
    moved = position[target.indices.long()]
    order = moved.argsort()
    positions = torch.empty_like(order)
    positions[order] = torch.arange(order.numel())
    return target.reordered(moved[order], positions, target.delta.index_select(dim, order))
