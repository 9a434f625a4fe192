"""``prepare_pisa``: attach trainable block-FFT deltas to the chosen matmul layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...errors import S2RegError
from ...arch.layout import placements
from ...arch.matmul import matmul_kind
from ..wrapper import refuse_prepared
from ..targets import map_model
from .config import PISAConfig
from .layer import attach


@dataclass
class PreparedPISA:
    config: PISAConfig
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)
    # module name -> the checkpoint name of its weight, read before the module was wrapped (the wrapper's
    # parameter names are not the model's: ``<module>.base_layer.weight``)
    stored_names: dict[str, str] = field(default_factory=dict)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters.values())


def _matching(modules: dict[str, nn.Module], target: str) -> list[str]:
    """Modules named ``target`` in full, or whose name ends with it (``q_proj``, ``self_attn.q_proj``)."""
    if target in modules:
        return [target]
    return [name for name in modules if name.endswith(f".{target}")]


def chosen_targets(model: nn.Module, config: PISAConfig, arch_file: str | Path | None) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` matmul layers that ``config`` trains, sorted by name."""
    matmuls = {n: m for n, m in model.named_modules() if matmul_kind(m) is not None}
    layers = set(config.layers) if config.layers is not None else None
    if config.targets:
        chosen: dict[str, nn.Module] = {}
        for target in config.targets:
            names = _matching(matmuls, target)
            if not names:
                raise S2RegError(f"--targets: no linear module named {target!r} (or ending in .{target}) in the model")
            chosen.update((n, matmuls[n]) for n in names)
        return sorted(chosen.items())
    mapping = map_model(model, arch_file)
    if config.roles is not None:
        mapping.info.require_roles(config.roles)
    roles = set(config.roles if config.roles is not None else mapping.info.roles)
    chosen = {}
    for c in mapping.coupled.values():
        if not set(c.roles) & roles or (layers is not None and c.layer not in layers):
            continue
        module_name, _, attr = c.placement.parameter.rpartition(".")
        if c.placement.converted or attr != "weight" or module_name not in matmuls:
            if config.roles is None:
                continue  # by default, only what is a matmul layer of its own: not stacked experts
            raise S2RegError(f"{c.name} is part of {c.placement.parameter}, not a matmul layer of its own: "
                             "PISA trains 2-D projections; name them with --targets")
        chosen[module_name] = matmuls[module_name]
    return sorted(chosen.items())


def prepare_pisa(model: nn.Module, config: PISAConfig | None = None, *, arch_file: str | Path | None = None) -> PreparedPISA:
    """Freeze ``model`` and add trainable PISA coefficients (zero: the model is unchanged at first)."""
    config = config or PISAConfig()
    config.check()
    refuse_prepared(model)
    chosen = chosen_targets(model, config, arch_file)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    stored = placements(model, {f"{name}.weight" for name, _ in chosen})
    prepared = PreparedPISA(config, stored_names={p.parameter.removesuffix(".weight"): key for key, p in stored.items()})
    for name, module in chosen:
        shape = tuple(module.get_parameter("weight").shape)
        block = (min(config.block, shape[0]), min(config.block, shape[1]))
        try:
            prepared.parameters[f"{name}.pisa_coefficients"] = attach(
                model, name, block, config.coefficients, config.scale_for(block), generator)
        except ValueError as exc:
            raise S2RegError(f"{name}: {exc}") from None
    if not prepared.parameters:
        raise S2RegError("nothing to train: no target module matched")
    model.s2reg_prepared = prepared  # type: ignore[assignment]  # nn.Module types attributes as tensors
    return prepared
