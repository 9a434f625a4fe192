"""Where each checkpoint tensor lives in a model held in memory.

Adapters hold the checkpoint's tensor names and coordinates (FORMAT §4); training works on the live
parameters, which transformers 5 does not always keep in the checkpoint's layout: MoE experts stored
per expert (``block_sparse_moe.experts.{e}.w1``, ``mlp.experts.{e}.gate_proj`` ...) are fused on load
into 3-D parameters (``mlp.experts.gate_up_proj``), and ``save_pretrained`` splits them again. This
module asks transformers' own reverse conversion (the one ``save_pretrained`` runs) where every
checkpoint tensor comes from, so no layout is written down twice: names and shapes from meta tensors,
and, only for tensors a conversion reshapes, element coordinates from integer position markers.

Names keep the prefix of the model in memory (``bert.encoder...`` in a ``BertForMaskedLM``); the
checkpoint on disk may lack it (``BertModel``): ``stored_name`` reconciles the two.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field

import torch
from torch import nn

from ..format.arrays import as_array, to_torch
from ..format.s2ft import take


@dataclass(frozen=True)
class Placement:
    """A checkpoint tensor's home: in-memory parameter ``parameter``; when a conversion moved its elements
    (``converted``), ``positions`` (the checkpoint tensor's shape) holds each element's flat position in it."""

    parameter: str
    shape: tuple[int, ...]
    converted: bool = False
    _markers: _Markers | None = field(default=None, repr=False, compare=False)
    _name: str = field(default="", repr=False, compare=False)

    @property
    def positions(self) -> torch.Tensor | None:
        return self._markers()[self._name] if self.converted and self._markers is not None else None

    def slice_positions(self, axis: str, indices: torch.Tensor) -> torch.Tensor:
        """Flat positions in the parameter of the checkpoint slice ``axis`` / ``indices`` (any FORMAT §4.1 axis)."""
        everywhere = self.positions
        if everywhere is None:
            everywhere = torch.arange(torch.Size(self.shape).numel()).reshape(self.shape)
        return to_torch(take(as_array(everywhere), axis, as_array(indices))).long()

    def stored_value(self, model: nn.Module) -> torch.Tensor:
        """The checkpoint tensor's current values, read from the model in memory."""
        param = model.get_parameter(self.parameter).detach()
        positions = self.positions
        if positions is None:
            return param
        return param.reshape(-1)[positions.reshape(-1).long().to(param.device)].reshape(self.shape)


class _Markers:
    """One parameter's elements followed through transformers' reverse conversion: integer position
    markers, computed when first asked for and kept for the last parameter asked for only (a fused MoE
    parameter's markers are as large as the parameter itself)."""

    _last: tuple[_Markers, dict[str, torch.Tensor]] | None = None

    def __init__(self, model: nn.Module, parameter: str, shape: tuple[int, ...]):
        self.model, self.parameter, self.shape = model, parameter, shape

    def __call__(self) -> dict[str, torch.Tensor]:
        if _Markers._last is None or _Markers._last[0] is not self:
            count = int(torch.Size(self.shape).numel())
            dtype = torch.int32 if count < 2**31 else torch.int64
            markers = torch.arange(count, dtype=dtype).reshape(self.shape)
            _Markers._last = (self, {k: v.contiguous() for k, v in _revert(self.model, {self.parameter: markers}).items()})
        return _Markers._last[1]


def _revert(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # not a transformers model: it is stored as it is held
        return tensors
    if not isinstance(model, PreTrainedModel):
        return tensors
    return revert_weight_conversion(model, tensors)


def placements(model: nn.Module, parameters: Container[str] | None = None) -> dict[str, Placement]:
    """``{checkpoint tensor name: Placement}`` for the model's parameters (all, or those named).

    Names and shapes come from meta tensors; element positions, for converted parameters only, when asked for.
    """
    found: dict[str, Placement] = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        if parameters is not None and name not in parameters:
            continue
        shape = tuple(param.shape)
        stored = _revert(model, {name: torch.empty(shape, device="meta")})
        if len(stored) == 1 and tuple(next(iter(stored.values())).shape) == shape:
            found[next(iter(stored))] = Placement(name, shape)
            continue
        markers = _Markers(model, name, shape)
        for key, tensor in stored.items():
            found[key] = Placement(name, tuple(tensor.shape), True, markers, key)
    return found


def stored_name(name: str, model: nn.Module, stored: Container[str]) -> str:
    """``name`` as the checkpoint ``stored`` spells it: with or without the model's base prefix."""
    if name in stored:
        return name
    prefix = f"{getattr(model, 'base_model_prefix', '') or ''}."
    if prefix != "." and name.startswith(prefix) and name[len(prefix):] in stored:
        return name[len(prefix):]
    if prefix != "." and f"{prefix}{name}" in stored:
        return f"{prefix}{name}"
    return name
