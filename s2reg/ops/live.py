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

import torch
from torch import nn

from ..errors import BaseMismatch, S2RegError
from ..format import Adapter, S2FTTarget, dtypes
from ..format.arrays import as_array, to_torch
from ..format.s2ft import axis_dim

APPLIED_ATTRIBUTE = "s2reg_applied"


def applied_adapters(model: nn.Module) -> list[Adapter]:
    """The adapters applied to ``model`` and not removed yet, oldest first."""
    return list(getattr(model, APPLIED_ATTRIBUTE, ()))


def _is_applied(model: nn.Module, adapter: Adapter) -> bool:
    return any(a is adapter for a in applied_adapters(model))


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    found = dict(model.named_parameters(remove_duplicate=False))
    found.update(dict(model.named_buffers(remove_duplicate=False)))
    return found


def _resolve(model: nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    tensors = _tensors(model)
    resolved = {}
    for name, target in adapter.targets.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise BaseMismatch(f"the model has no parameter {name!r} (adapter made for {adapter.base.name!r})")
        if tuple(tensor.shape) != tuple(target.shape) or dtypes.name_of(tensor.dtype) != dtypes.name_of(target.dtype):
            raise BaseMismatch(
                f"{name}: model parameter is {list(tensor.shape)} {dtypes.name_of(tensor.dtype)}, adapter expects "
                f"{list(target.shape)} {dtypes.name_of(target.dtype)}"
            )
        resolved[name] = tensor
    return resolved


def _update(name: str, tensor: torch.Tensor, target, *, subtract: bool, stacked: bool) -> None:
    """The format's one merge rule per kind (``S2FTTarget.shifted``, ``PISATarget.merged``) on the parameter's values."""
    with torch.no_grad():
        if isinstance(target, S2FTTarget):
            dim = axis_dim(target.axis)
            index = to_torch(target.indices).to(device=tensor.device)
            values = target.shifted(as_array(tensor.index_select(dim, index)), name=name, subtract=subtract,
                                    check_reversible=stacked)
            tensor.index_copy_(dim, index, to_torch(values).to(tensor.device))
        else:
            tensor.copy_(to_torch(target.merged(as_array(tensor), subtract=subtract)))


def apply(model: nn.Module, adapter: Adapter) -> None:
    """Add ``adapter``'s delta to the matching parameters of ``model`` in place.

    Parameters are matched by name (``model.layers.0.mlp.down_proj.weight``, as in the checkpoint),
    shapes and dtypes are checked before anything changes, and applying the same adapter object
    twice is refused.
    """
    stacked = bool(applied_adapters(model))
    if _is_applied(model, adapter):
        raise S2RegError(f"this adapter is already applied to the model ({adapter.base.name!r}); remove it first")
    done = []
    try:
        for name, tensor in _resolve(model, adapter).items():
            _update(name, tensor, adapter.targets[name], subtract=False, stacked=stacked)
            done.append((name, tensor))
    except S2RegError:
        for name, tensor in reversed(done):
            _update(name, tensor, adapter.targets[name], subtract=True, stacked=False)
        raise
    setattr(model, APPLIED_ATTRIBUTE, [*applied_adapters(model), adapter])


def remove(model: nn.Module, adapter: Adapter) -> None:
    """Take ``adapter`` out of ``model`` again: bit-exact for S2FT (FORMAT §4.3)."""
    if not _is_applied(model, adapter):
        raise S2RegError("this adapter is not applied to the model")
    for name, tensor in _resolve(model, adapter).items():
        _update(name, tensor, adapter.targets[name], subtract=True, stacked=False)
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
