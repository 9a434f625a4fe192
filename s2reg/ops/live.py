"""Apply and remove adapters on a live ``torch.nn.Module``: the fast adapter switch.

An S2FT adapter touches only its slices: applying it is a scatter of ``cast(W_slice + delta)`` into
the parameter, removing it the exact inverse (FORMAT §4.3), so any number of apply/remove cycles
leaves the weights bit-identical. The cost grows with the slice (d x s), not with d x d as a LoRA
merge ``W += B @ A`` does. PISA adapters are applied densely in float32 (FORMAT §5.3) and their
removal is exact to one unit in the last place of the parameter dtype.

Which adapters a module holds is recorded on the module itself (``module.s2reg_applied``, oldest
first). The record holds the adapter objects, so an applied adapter stays alive as long as its
delta is in the weights: it can always be removed, and a new adapter can never be taken for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BaseMismatch, S2RegError
from ..format import Adapter, dtypes
from ..format.arrays import as_array, to_torch
from ..format.s2ft import EXPERT_AXES, axis_dim
from ..kinds import kind_of
from ..arch.layout import Placement, placements, stored_name

APPLIED_ATTRIBUTE = "s2reg_applied"


def applied_adapters(model: nn.Module) -> list[Adapter]:
    """The adapters applied to ``model`` and not removed yet, oldest first."""
    return list(getattr(model, APPLIED_ATTRIBUTE, ()))


def _is_applied(model: nn.Module, adapter: Adapter) -> bool:
    return any(a is adapter for a in applied_adapters(model))


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    found.update(dict(model.named_buffers(remove_duplicate=False)))
    return found


@dataclass(frozen=True)
class _Home:
    """Where a checkpoint tensor's values live in the model: ``tensor`` itself, or (a tensor that transformers
    converted on load: fused MoE experts) the flat ``positions`` of its elements in ``tensor``."""

    tensor: torch.Tensor
    shape: tuple[int, ...]
    placement: Placement | None = None

    def read(self, region: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The checkpoint tensor's values (only its ``region``, an axis and its indices, when given)."""
        positions = self._positions(region)
        if positions is not None:
            return self.tensor.reshape(-1)[positions.reshape(-1)].reshape(positions.shape)
        return self.tensor if region is None else self.tensor.index_select(axis_dim(region[0]), region[1])

    def write(self, values: torch.Tensor, region: tuple[str, torch.Tensor] | None = None) -> None:
        values = values.to(device=self.tensor.device, dtype=self.tensor.dtype)
        positions = self._positions(region)
        if positions is not None:
            self.tensor.view(-1).index_copy_(0, positions.reshape(-1), values.reshape(-1))
        elif region is None:
            self.tensor.copy_(values)
        else:
            self.tensor.index_copy_(axis_dim(region[0]), region[1], values)

    def _positions(self, region: tuple[str, torch.Tensor] | None) -> torch.Tensor | None:
        """Flat positions in ``tensor`` of the region's elements; None where the tensor is indexed itself (stored
        as held, on a plain axis: any device, no position tensor)."""
        if self.placement is not None:
            positions = (self.placement.positions if region is None
                         else self.placement.slice_positions(region[0], region[1].cpu()))
            return None if positions is None else positions.long().to(self.tensor.device)
        if region is not None and region[0] in EXPERT_AXES:  # an expert axis of a 3-D tensor stored as held
            return expert_positions(self.shape, region[0], region[1].long())
        return None


def expert_positions(shape: tuple[int, ...], axis: str, indices: torch.Tensor) -> torch.Tensor:
    """Flat positions in a stored ``[experts, rows, columns]`` tensor of the slice an expert axis selects
    (FORMAT §4.5: index ``i`` is row or column ``i % n`` of expert ``i // n``), in ``take``'s slice layout:
    ``[count, columns]`` for expert rows, ``[rows, count]`` for expert columns."""
    _, rows, columns = shape
    expert, within = torch.div(indices, shape[1 + axis_dim(axis)], rounding_mode="floor"), indices % shape[1 + axis_dim(axis)]
    if axis == "expert_rows":
        return ((expert * rows + within) * columns)[:, None] + torch.arange(columns, device=indices.device)[None, :]
    return (expert * rows * columns + within)[None, :] + (torch.arange(rows, device=indices.device) * columns)[:, None]


def _resolve(model: nn.Module, adapter: Adapter) -> dict[str, _Home]:
    """Each target's home, by the checkpoint's name; the model's own layout (``layout.placements``: another
    prefix, fused experts) only for names the model does not hold as they are."""
    tensors = _tensors(model)
    elsewhere = [name for name in adapter.targets if name not in tensors]
    homes = placements(model) if elsewhere else {}
    resolved = {}
    for name, target in adapter.targets.items():
        if name in tensors:
            home = _Home(tensors[name], tuple(tensors[name].shape))
        elif (placement := homes.get(stored_name(name, model, homes))) is not None:
            parameter = model.get_parameter(placement.parameter)
            home = _Home(parameter, placement.shape, placement if placement.converted else None)
        else:
            raise BaseMismatch(f"the model has no parameter {name!r} (adapter made for {adapter.base.name!r})")
        if home.shape != tuple(target.shape) or dtypes.name_of(home.tensor.dtype) != dtypes.name_of(target.dtype):
            raise BaseMismatch(
                f"{name}: model parameter is {list(home.shape)} {dtypes.name_of(home.tensor.dtype)}, adapter "
                f"expects {list(target.shape)} {dtypes.name_of(target.dtype)}"
            )
        resolved[name] = home
    return resolved


def _update(name: str, home: _Home, target, *, subtract: bool, stacked: bool) -> None:
    """The format's one merge rule of the target's kind (``Kind.merged_region``) on the model's values."""
    with torch.no_grad():
        kind = kind_of(target)
        region = kind.region(target)  # the slice a merge rewrites, or None for the whole tensor
        if region is None:
            home.write(to_torch(kind.merged_region(target, as_array(home.read()), subtract=subtract, name=name)))
            return
        where = region[0], to_torch(region[1]).to(device=home.tensor.device)
        values = kind.merged_region(target, as_array(home.read(where)), name=name, subtract=subtract,
                                    check_reversible=stacked)
        home.write(to_torch(values), where)


def apply(model: nn.Module, adapter: Adapter) -> None:
    """Add ``adapter``'s delta to the matching parameters of ``model`` in place.

    Parameters are matched by the checkpoint's names (``model.layers.0.mlp.down_proj.weight``), through
    the model's own layout where transformers holds them otherwise (a model prefix the checkpoint lacks,
    MoE experts fused on load); shapes and dtypes are checked before anything changes, and applying the
    same adapter object twice is refused.
    """
    stacked = bool(applied_adapters(model))
    if _is_applied(model, adapter):
        raise S2RegError(f"this adapter is already applied to the model ({adapter.base.name!r}); remove it first")
    done = []
    try:
        for name, home in _resolve(model, adapter).items():
            _update(name, home, adapter.targets[name], subtract=False, stacked=stacked)
            done.append((name, home))
    except S2RegError:
        for name, home in reversed(done):
            _update(name, home, adapter.targets[name], subtract=True, stacked=False)
        raise
    setattr(model, APPLIED_ATTRIBUTE, [*applied_adapters(model), adapter])


def remove(model: nn.Module, adapter: Adapter) -> None:
    """Take ``adapter`` out of ``model`` again: bit-exact for S2FT (FORMAT §4.3)."""
    if not _is_applied(model, adapter):
        raise S2RegError("this adapter is not applied to the model")
    for name, home in _resolve(model, adapter).items():
        _update(name, home, adapter.targets[name], subtract=True, stacked=False)
    setattr(model, APPLIED_ATTRIBUTE, [a for a in applied_adapters(model) if a is not adapter])


@contextmanager
def applied(model: nn.Module, *adapters: Adapter) -> Iterator[nn.Module]:
    """``with applied(model, a, b): ...`` runs the block with the adapters in, and takes them out after."""
    done: list[Adapter] = []
    try:
        for adapter in adapters:
            apply(model, adapter)
            done.append(adapter)
        yield model
    finally:
        for adapter in reversed(done):
            remove(model, adapter)
