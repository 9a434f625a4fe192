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
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Placement:
    """A checkpoint tensor's home: in-memory parameter ``parameter`` and, when a conversion moved its
    elements, ``positions`` (the checkpoint tensor's shape): each element's flat position in it."""

    parameter: str
    shape: tuple[int, ...]
    positions: torch.Tensor | None = None

    def slice_positions(self, axis: str, indices: torch.Tensor) -> torch.Tensor:
        """Flat positions in the parameter of the checkpoint slice ``axis`` / ``indices``."""
        if self.positions is None:
            whole = torch.arange(int(torch.Size(self.shape).numel())).reshape(self.shape)
        else:
            whole = self.positions
        return whole.index_select(0 if axis == "rows" else 1, indices.long())

    def stored_value(self, model: nn.Module) -> torch.Tensor:
        """The checkpoint tensor's current values, read from the model in memory."""
        param = model.get_parameter(self.parameter).detach()
        if self.positions is None:
            return param
        return param.reshape(-1)[self.positions.reshape(-1).to(param.device)].reshape(self.shape)


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
    """``{checkpoint tensor name: Placement}`` for the model's parameters (all, or those named)."""
    found: dict[str, Placement] = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        if parameters is not None and name not in parameters:
            continue
        shapes = _revert(model, {name: torch.empty(param.shape, device="meta")})
        if len(shapes) == 1 and tuple(next(iter(shapes.values())).shape) == tuple(param.shape):
            stored = next(iter(shapes))
            found[stored] = Placement(name, tuple(param.shape))
            continue
        markers = torch.arange(param.numel(), dtype=torch.int64).reshape(param.shape)
        for stored, positions in _revert(model, {name: markers}).items():
            found[stored] = Placement(name, tuple(positions.shape), positions.contiguous())
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
