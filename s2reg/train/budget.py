"""``--budget N``: how many heads and FFN channels per layer S2FT trains for at most N parameters.

A head or channel costs what its slices hold in the trained roles: ``o`` and ``q`` a head's
``head_dim`` rows or columns times the other side, ``up``/``gate``/``down`` a channel's row or column
in every expert of the layer. Key/value roles are costed per key/value head: ``h`` query heads pull in
at most ``min(h, kv_heads)`` of them, so the count is exact for every other role and an upper bound
when ``k`` or ``v`` is trained under grouped-query attention (chosen heads that share a group cost
less). When both heads and channels are trained, heads get up to ``HEAD_SHARE`` of the budget and
channels the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from ..errors import S2RegError
from ..format.s2ft import slice_shape
from .s2ft.config import CHANNEL_ROLES, HEAD_ROLES, S2FTConfig
from .targets import ModelMap, map_model

HEAD_SHARE = 1 / 3
KV_ROLES = ("k", "v")


@dataclass(frozen=True)
class UnitCosts:
    """Trainable parameters over the trained layers: per query head (q/o), per key/value head, per channel."""

    head: int
    kv_head: int
    channel: int
    heads_available: int
    kv_heads: int
    channels_available: int

    def count(self, heads: int, channels: int) -> int:
        return heads * self.head + min(heads, self.kv_heads) * self.kv_head + channels * self.channel


def _slice_size(mapping: ModelMap, role: str, layer: int, expert) -> int:
    """Parameters one unit of ``role`` holds in ``layer`` (``expert``), over every tensor that carries the role."""
    size = 0
    for c in mapping.tensors(role, layer, expert):
        per_index = math.prod(slice_shape(c.placement.shape, c.axis, 1))  # FORMAT §4.2, expert axes included
        size += mapping.info.unit_indices(c.name, role, [0], expert).size * per_index
    return size


def unit_costs(mapping: ModelMap, layers: Sequence[int], roles: tuple[str, ...]) -> UnitCosts:
    head = kv_head = channel = 0
    channels_available = None
    for layer in layers:
        for role in roles:
            if role in KV_ROLES:
                kv_head += _slice_size(mapping, role, layer, None)
            elif role in HEAD_ROLES:
                head += _slice_size(mapping, role, layer, None)
            else:
                channel += sum(_slice_size(mapping, role, layer, e) for e in mapping.info.experts(layer))
        if set(roles) & set(CHANNEL_ROLES):
            fewest = min(mapping.info.channel_count(layer, e) for e in mapping.info.experts(layer))
            channels_available = fewest if channels_available is None else min(channels_available, fewest)
    dims = mapping.info.dims
    return UnitCosts(head, kv_head, channel, dims.heads, dims.kv_heads, channels_available or 0)


def _most(limit: int, cost, available: int) -> int:
    """The largest n <= available with cost(n) <= limit (cost increasing)."""
    n = 0
    while n < available and cost(n + 1) <= limit:
        n += 1
    return n


def fit_budget(model: nn.Module, budget: int, config: S2FTConfig | None = None, *,
               arch_file: str | Path | None = None) -> S2FTConfig:
    """``config`` with ``heads`` and ``channels`` per layer chosen to train at most ``budget`` parameters.

    The roles are ``config.roles`` (default: ``down``, the trainer's default for channels); heads are
    chosen only when a head role is trained.
    """
    config = config or S2FTConfig()
    if budget < 1:
        raise S2RegError("--budget must be a positive number of parameters")
    mapping = map_model(model, arch_file)
    roles = tuple(config.roles) if config.roles else ("down",)
    mapping.info.require_roles(roles)
    layers = config.layers if config.layers is not None else list(range(mapping.info.dims.layers))
    costs = unit_costs(mapping, layers, roles)
    wants_heads = bool(set(roles) & set(HEAD_ROLES))
    wants_channels = bool(set(roles) & set(CHANNEL_ROLES))
    head_limit = budget * HEAD_SHARE if wants_channels else budget
    heads = _most(int(head_limit), lambda h: costs.count(h, 0), costs.heads_available) if wants_heads else 0
    channels = 0
    if wants_channels:
        left = budget - costs.count(heads, 0)
        channels = min(left // costs.channel, costs.channels_available)
    if wants_heads and wants_channels and channels == costs.channels_available:  # every channel taken: give heads the rest
        heads = _most(budget, lambda h: costs.count(h, channels), costs.heads_available)
    if wants_heads and not heads and not channels:
        heads = _most(budget, lambda h: costs.count(h, 0), costs.heads_available)
    if not heads and not channels:
        cheapest = min(c for c in (costs.count(1, 0) if wants_heads else 0, costs.channel) if c)
        raise S2RegError(f"--budget {budget:,} is below the cost of one unit in every layer ({cheapest:,} parameters "
                         f"for roles {','.join(roles)})")
    return replace(config, heads=heads, channels=channels, roles=roles)
