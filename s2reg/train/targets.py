"""A live model seen through its family description: which checkpoint tensors hold which roles, and
where each of them lives in memory.

The family description (``s2reg.arch``) speaks about CHECKPOINT tensors; ``layout.placements`` says
where transformers keeps each of them in memory. Together they give, for every trainable coupled
tensor, its layer, expert, roles and stored axis, and the parameter that computes with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..arch import ModelInfo, resolve
from ..arch.model import Coupling
from ..errors import S2RegError
from ..arch.layout import Placement, placements, stored_name


@dataclass(frozen=True)
class Coupled:
    """One trainable checkpoint tensor that holds heads or channels, and its home in memory."""

    coupling: Coupling
    placement: Placement

    @property
    def name(self) -> str:  # checkpoint name, with the in-memory model's prefix
        return self.coupling.name

    @property
    def layer(self) -> int:
        return self.coupling.layer

    @property
    def expert(self) -> str | None:
        return self.coupling.expert

    @property
    def roles(self) -> tuple[str, ...]:
        return self.coupling.roles

    @property
    def axis(self) -> str:
        return self.coupling.axis


@dataclass
class ModelMap:
    model: nn.Module
    info: ModelInfo
    coupled: dict[str, Coupled]
    placements: dict[str, Placement]

    def tensors(self, role: str, layer: int, expert: str | None = None) -> list[Coupled]:
        return [self.coupled[n] for n in self.info.tensors(role, layer, expert) if n in self.coupled]

    def owner(self, parameter: str) -> tuple[nn.Module, str]:
        """The module holding an in-memory parameter, and the parameter's attribute name."""
        module_name, _, attr = parameter.rpartition(".")
        return self.model.get_submodule(module_name), attr

    def stored(self, name: str) -> str:
        """A name from an adapter or the checkpoint, as this model's map spells it (prefix or not)."""
        return stored_name(name, self.model, self.placements)


def _config(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return config.to_dict()
    return config


def map_model(model: nn.Module, arch_file: str | Path | None = None) -> ModelMap:
    """The coupled tensors of ``model``; a clear error for a layout no description covers."""
    found = placements(model)
    try:
        info = resolve(_config(model), {name: p.shape for name, p in found.items()}, arch_file=arch_file)
    except S2RegError as exc:
        raise S2RegError(f"{exc} (PISA also trains any linear modules named with --targets)") from None
    coupled = {}
    for name, placement in found.items():
        c = info.coupled(name)
        if c is not None and not c.follower and c.part != "bias":
            coupled[name] = Coupled(c, placement)
    if not coupled:
        raise S2RegError(f"no {info.family.name} projections found in the model; name modules with --targets (PISA)")
    return ModelMap(model, info, coupled, found)


def heads_to_kv(heads: Iterable[int], mapping: ModelMap) -> list[int]:
    """The key/value heads that serve query heads ``heads`` (GQA: ``group`` query heads per kv head)."""
    return sorted({h // mapping.info.dims.group for h in heads})


def kv_to_heads(kv_heads: Iterable[int], mapping: ModelMap) -> list[int]:
    """The query heads a key/value head serves."""
    group = mapping.info.dims.group
    return [h for kv in kv_heads for h in range(kv * group, (kv + 1) * group)]
