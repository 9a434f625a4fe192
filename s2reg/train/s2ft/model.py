"""``prepare_s2ft``: select heads and channels, and make exactly their slices trainable.

Which stored indices a head or channel owns in which checkpoint tensor is the family description's
business (``s2reg.arch``: fused, interleaved, transposed, per-expert layouts); where that tensor lives
in memory is ``arch/layout.py``'s. A checkpoint tensor that a matmul layer computes with directly gets
partial back-propagation on its row or column slice (``layer.py``); an expert inside transformers'
fused 3-D expert parameters gets it per expert (``experts.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...errors import S2RegError
from ...format.s2ft import axis_length, slice_shape
from ...arch.layout import Placement
from ...arch.matmul import matmul_kind
from ..select import select
from ..wrapper import refuse_prepared
from ..targets import Coupled, ModelMap, heads_to_kv, map_model
from .config import CHANNEL_ROLES, HEAD_ROLES, S2FTConfig
from .experts import attach_experts
from .layer import attach


@dataclass(frozen=True)
class TrainedSlice:
    """One checkpoint tensor's trained slice: what export turns into an adapter target."""

    name: str          # checkpoint name as the model in memory spells it
    roles: tuple[str, ...]
    axis: str
    indices: torch.Tensor
    group_size: int | None
    placement: Placement
    parameter: str     # the trainable parameter's name in the model
    offset: int | None  # flat-position slices: where this tensor's values start in ``parameter``

    @property
    def shape(self) -> tuple[int, ...]:
        """The slice's shape on the stored tensor."""
        return slice_shape(self.placement.shape, self.axis, self.indices.numel())

    def stored_value(self, model: nn.Module) -> torch.Tensor:
        return self.placement.stored_value(model)


@dataclass
class PreparedS2FT:
    """What ``prepare_s2ft`` did: the selection, the trainable parameters by name, the trained slices."""

    config: S2FTConfig
    selection: dict[int, dict]
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)
    slices: dict[str, TrainedSlice] = field(default_factory=dict)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters.values())

    @property
    def group_sizes(self) -> dict[str, int]:
        return {name: s.group_size for name, s in self.slices.items() if s.group_size}


def _roles(config: S2FTConfig, mapping: ModelMap) -> tuple[str, ...]:
    if config.heads:
        mapping.info.require_roles([r for r in (config.roles or ("o",)) if r in HEAD_ROLES] or ["o"])
    if config.roles is None:  # the paper's output side of what was asked for
        if config.channels:
            mapping.info.require_roles(["down"])  # a family without it says why (its no_roles_reason)
        return (("o",) if config.heads else ()) + (("down",) if config.channels else ())
    mapping.info.require_roles(config.roles)
    return tuple(config.roles)


def _units(role: str, expert: str | None, chosen: dict, mapping: ModelMap) -> list[int]:
    if role in HEAD_ROLES:
        heads = chosen.get("heads") or []
        return heads_to_kv(heads, mapping) if role in ("k", "v") else list(heads)
    channels = chosen.get("channels") or []
    return list(channels.get(expert, [])) if isinstance(channels, dict) else list(channels)


def _group_size(c: Coupled, roles: set[str], indices: torch.Tensor, mapping: ModelMap) -> int | None:
    """``head_dim`` when the slice reads as whole heads (FORMAT §4.1 group_size), else None."""
    hd = mapping.info.dims.head_dim
    if not roles or not roles <= set(HEAD_ROLES) or not hd:
        return None
    length = axis_length(c.placement.shape, c.axis)
    ids = set(indices.tolist())
    whole = length % hd == 0 and all(g * hd + j in ids for g in {i // hd for i in ids} for j in range(hd))
    return hd if whole else None


Wanted = dict[str, tuple[Coupled, set[str], torch.Tensor]]  # checkpoint name -> (tensor, roles, stored indices)


def _wanted(mapping: ModelMap, layers: list[int], roles: tuple[str, ...], selection: dict[int, dict]) -> Wanted:
    """The stored indices to train per checkpoint tensor: the union over the roles it holds (fused tensors)."""
    wanted: Wanted = {}
    for layer in layers:
        experts = dict.fromkeys([None, *mapping.info.experts(layer)])  # attention (None) and every FFN expert
        for role in roles:
            for expert, c in ((e, c) for e in experts for c in mapping.tensors(role, layer, e)):
                units = _units(role, expert, selection[layer], mapping)
                if not units:
                    continue
                indices = torch.from_numpy(mapping.info.unit_indices(c.name, role, units, expert))  # stacked: its units
                _, had_roles, had = wanted.get(c.name, (c, set(), torch.empty(0, dtype=torch.long)))
                wanted[c.name] = (c, had_roles | {role}, torch.cat([had, indices]).unique(sorted=True))
    return wanted


def _attach_all(prepared: PreparedS2FT, mapping: ModelMap, wanted: Wanted) -> None:
    """Make every wanted slice trainable: a matmul layer's own slice parameter, or one trainable vector per
    converted parameter (fused experts) holding all its tensors' slices."""
    carried: dict[str, list[tuple[Coupled, set[str], torch.Tensor]]] = {}  # fused expert parameter -> its tensors
    for name, (c, trained_roles, indices) in wanted.items():
        module, attr = mapping.owner(c.placement.parameter)
        group = _group_size(c, trained_roles, indices, mapping)
        if not c.placement.converted and attr == "weight" and matmul_kind(module) is not None:
            module_name = c.placement.parameter.rpartition('.')[0]
            parameter = f"{module_name}.s2ft_slice"
            prepared.parameters[parameter] = attach(mapping.model, module_name, c.axis, indices)
            prepared.slices[name] = TrainedSlice(name, tuple(sorted(trained_roles)), c.axis, indices, group, c.placement,
                                                 parameter, None)
        else:
            carried.setdefault(c.placement.parameter, []).append((c, trained_roles, indices))
    for parameter, tensors in carried.items():
        module_name, _, attr = parameter.rpartition(".")
        positions, offset = [], 0
        trainable = f"{module_name}.s2ft_{attr}"
        for c, trained_roles, indices in tensors:
            flat = c.placement.slice_positions(c.axis, indices).reshape(-1)
            prepared.slices[c.name] = TrainedSlice(c.name, tuple(sorted(trained_roles)), c.axis, indices,
                                                   _group_size(c, trained_roles, indices, mapping), c.placement,
                                                   trainable, offset)
            positions.append(flat)
            offset += flat.numel()
        prepared.parameters[trainable] = attach_experts(mapping.model, module_name, attr, torch.cat(positions))


def prepare_s2ft(model: nn.Module, config: S2FTConfig | None = None, *, calibration=None,
                 arch_file: str | Path | None = None) -> PreparedS2FT:
    """Freeze ``model`` except the S2FT slices chosen by ``config``; return the selection and parameters.

    Every other parameter gets ``requires_grad=False``; the slices become new parameters (named
    ``<module>.s2ft_slice`` on matmul layers, ``<module>.s2ft_<param>`` on fused experts), so
    ``[p for p in model.parameters() if p.requires_grad]`` is exactly what to give an optimizer.
    """
    config = config or S2FTConfig()
    config.check()
    refuse_prepared(model)
    mapping = map_model(model, arch_file)
    roles = _roles(config, mapping)
    layers_total = mapping.info.dims.layers
    layers = list(config.layers) if config.layers is not None else list(range(layers_total))
    if any(not 0 <= i < layers_total for i in layers):
        raise S2RegError(f"layers {layers} out of range 0..{layers_total - 1}")
    for p in model.parameters():
        p.requires_grad_(False)
    counts = {"heads": config.heads if set(roles) & set(HEAD_ROLES) else 0,
              "channels": config.channels if set(roles) & set(CHANNEL_ROLES) else 0}
    if not any(counts.values()):
        raise S2RegError(f"nothing to train: roles {list(roles)} need {'heads' if not config.heads else 'channels'}")
    selection = select(model, mapping, layers=layers, counts=counts, strategy=config.strategy, order=config.order,
                       seed=config.seed, exclude=config.exclude, calibration=calibration)
    prepared = PreparedS2FT(config, selection)
    wanted = _wanted(mapping, layers, roles, selection)
    if not wanted:
        raise S2RegError(f"nothing to train: roles {list(roles)} have no selected heads/channels")
    _attach_all(prepared, mapping, wanted)
    model.s2reg_prepared = prepared  # type: ignore[assignment]  # nn.Module types attributes as tensors
    return prepared
