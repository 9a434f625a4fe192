"""``prepare_pisa``: attach trainable block-FFT deltas to the chosen linear layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import S2RegError
from ..targets import map_model
from .config import PISAConfig
from .layer import attach


@dataclass
class PreparedPISA:
    config: PISAConfig
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters.values())


def _chosen(model: nn.Module, config: PISAConfig) -> list[tuple[str, nn.Linear]]:
    if config.targets:
        modules = dict(model.named_modules())
        missing = [t for t in config.targets if not isinstance(modules.get(t), nn.Linear)]
        if missing:
            raise S2RegError(f"--targets: no linear module named {missing[0]!r} in the model")
        return [(t, modules[t]) for t in config.targets]
    mapping = map_model(model)
    layers = config.layers if config.layers is not None else range(mapping.info.dims.layers)
    return [mapping.linear(role, layer) for layer in layers for role in config.roles if (role, layer) in mapping.modules]


def prepare_pisa(model: nn.Module, config: PISAConfig | None = None) -> PreparedPISA:
    """Freeze ``model`` and add trainable PISA coefficients (zero: the model is unchanged at first)."""
    config = config or PISAConfig()
    config.check()
    chosen = _chosen(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    prepared = PreparedPISA(config)
    for name, linear in chosen:
        block = (min(config.block, linear.out_features), min(config.block, linear.in_features))
        try:
            prepared.parameters[f"{name}.pisa_coefficients"] = attach(
                linear, block, config.coefficients, config.effective_scale, generator)
        except ValueError as exc:
            raise S2RegError(f"{name}: {exc}") from None
    if not prepared.parameters:
        raise S2RegError("nothing to train: no target module matched")
    model.s2reg_prepared = prepared
    return prepared
