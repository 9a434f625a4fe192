"""``prepare_s2ft``: select heads and channels, and attach partial back-propagation to their slices."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import S2RegError
from ..select import select
from ..targets import ModelMap, map_model
from .config import CHANNEL_ROLES, HEAD_ROLES, S2FTConfig
from .layer import attach

AXIS = {"q": "rows", "k": "rows", "v": "rows", "o": "columns", "up": "rows", "gate": "rows", "down": "columns"}


@dataclass
class PreparedS2FT:
    """What ``prepare_s2ft`` did: the selection, and the trainable parameters by module name."""

    config: S2FTConfig
    selection: dict[int, dict[str, list[int]]]
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)
    group_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters.values())


def _indices(role: str, units: dict[str, list[int]], mapping: ModelMap) -> torch.Tensor | None:
    dims = mapping.info.dims
    if role in CHANNEL_ROLES:
        chosen = units.get("channels") or []
        return torch.tensor(chosen, dtype=torch.long) if chosen else None
    heads = units.get("heads") or []
    if not heads:
        return None
    blocks = sorted({h // dims.group for h in heads}) if role in ("k", "v") else heads
    rows = torch.tensor(blocks, dtype=torch.long)[:, None] * dims.head_dim + torch.arange(dims.head_dim)
    return rows.reshape(-1)


def prepare_s2ft(model: nn.Module, config: S2FTConfig | None = None, *, calibration=None) -> PreparedS2FT:
    """Freeze ``model`` except the S2FT slices chosen by ``config``; return the selection and parameters.

    Every other parameter gets ``requires_grad=False``; the slices become parameters named
    ``<module>.s2ft_slice``, so ``[p for p in model.parameters() if p.requires_grad]`` is exactly
    what to give an optimizer.
    """
    config = config or S2FTConfig()
    config.check()
    mapping = map_model(model)
    dims = mapping.info.dims
    layers = config.layers if config.layers is not None else list(range(dims.layers))
    if any(not 0 <= i < dims.layers for i in layers):
        raise S2RegError(f"layers {layers} out of range 0..{dims.layers - 1}")
    for p in model.parameters():
        p.requires_grad_(False)
    counts = {"heads": config.heads, "channels": config.channels}
    selection = select(model, mapping, layers=layers, counts=counts, strategy=config.strategy, order=config.order,
                       seed=config.seed, exclude=config.exclude, calibration=calibration)
    prepared = PreparedS2FT(config, selection)
    for layer in layers:
        for role in config.roles:
            indices = _indices(role, selection[layer], mapping)
            if indices is None or (role, layer) not in mapping.modules:
                continue
            name, linear = mapping.linear(role, layer)
            prepared.parameters[f"{name}.s2ft_slice"] = attach(linear, AXIS[role], indices)
            if role in HEAD_ROLES:
                prepared.group_sizes[f"{name}.weight"] = dims.head_dim
    if not prepared.parameters:
        raise S2RegError(f"nothing to train: roles {list(config.roles)} have no selected heads/channels")
    model.s2reg_prepared = prepared
    return prepared
