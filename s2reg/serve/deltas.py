"""An adapter's targets turned into what a live model adds to its layers, without touching its weights.

Each target becomes the change a merge would make to the parameter as the model holds it (the
merge's own arithmetic, FORMAT §4.3 / §5.3, in the checkpoint's dtype, then cast to the model's),
in one of two shapes:

- :class:`MatmulDelta` for the weight of a matmul layer (``nn.Linear``, GPT-2's transposed
  ``Conv1D``): an S2FT slice of input features is a gather (``y += x[:, idx] @ M``), a slice of
  output features a scatter (``y[:, idx] += x @ M``), a PISA delta a dense ``y += x @ M``;
- :class:`ParameterDelta` for any other parameter (MoE experts that transformers fuses into 3-D
  parameters, biases, norms): the merged values at their flat positions in the parameter; the layer
  is run again for the sequences that use the adapter with them swapped into the parameter, and the
  parameter's own values swapped back right after (bit for bit: values are copied, never recomputed).

Where a checkpoint tensor lives in the model comes from ``arch.layout`` (transformers' own conversions),
and the matmul kind from ``arch.matmul``: no family is named here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BaseMismatch, S2RegError
from ..format import Adapter
from ..format.arrays import read_array, to_torch
from ..format.s2ft import take
from ..kinds import kind_of
from ..tensors import TensorSource
from ..arch.layout import Placement, stored_name
from ..arch.matmul import matmul_kind


@dataclass(frozen=True)
class MatmulDelta:
    """``y += x[:, index] @ matrix`` (``side="input"``; all inputs when ``index`` is None) or
    ``y[:, index] += x @ matrix`` (``side="output"``), for the rows of one adapter's sequences."""

    side: str
    index: torch.Tensor | None
    matrix: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes + (0 if self.index is None else self.index.nbytes)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Add this delta's output for ``x``'s ``rows`` (all when None) into ``y`` (both ``[rows, features]``)."""
        if self.side == "input":
            if rows is None:
                picked = x if self.index is None else x.index_select(1, self.index)
            else:
                picked = x.index_select(0, rows) if self.index is None else x[rows[:, None], self.index[None, :]]
            change = (picked @ self.matrix).to(y.dtype)
            if rows is None:
                y.add_(change)
            else:
                y.index_add_(0, rows, change)
            return
        if self.index is None:  # _matmul_delta gives every output delta its slice's columns
            raise ValueError("an output-side MatmulDelta needs the output columns it adds to")
        change = ((x if rows is None else x.index_select(0, rows)) @ self.matrix).to(y.dtype)
        if rows is None:
            y.index_add_(1, self.index, change)
        else:
            y.index_put_((rows[:, None], self.index[None, :]), change, accumulate=True)


@dataclass(frozen=True)
class ParameterDelta:
    """Parameter ``attr`` of a layer as the merge leaves it: ``values`` at flat ``positions``."""

    attr: str
    positions: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.positions.nbytes + self.values.nbytes

    @contextmanager
    def swapped_into(self, parameter: torch.Tensor) -> Iterator[None]:
        """Within the block, ``parameter`` holds the merged values; its own come back afterwards, bit for bit."""
        flat = parameter.detach().view(-1)
        saved = flat.index_select(0, self.positions)
        flat.index_copy_(0, self.positions, self.values)
        try:
            yield
        finally:
            flat.index_copy_(0, self.positions, saved)

    @staticmethod
    def joined(deltas: list[ParameterDelta]) -> ParameterDelta:
        """Several checkpoint tensors that live in one parameter (a fused expert tensor) as one delta."""
        return ParameterDelta(deltas[0].attr, torch.cat([d.positions for d in deltas]), torch.cat([d.values for d in deltas]))


Delta = MatmulDelta | ParameterDelta


def _merged_region(target, base) -> tuple[torch.Tensor, torch.Tensor]:
    """``(before, after)`` of the region a merge rewrites, in the checkpoint's dtype: an S2FT target's
    slice (exact, restore list included), a PISA target's whole tensor. The merge's own (numpy) code
    computes them, so serving and ``s2reg merge`` cannot disagree."""
    kind = kind_of(target)
    region = kind.region(target)
    before = base if region is None else take(base, *region)
    return to_torch(before), to_torch(kind.merged_region(target, before))


def _matmul_delta(target, before: torch.Tensor, after: torch.Tensor, kind: str, like: torch.Tensor) -> MatmulDelta:
    # the difference of what the model would hold before and after the merge (each cast to its dtype)
    change = (after.to(like.dtype).double() - before.to(like.dtype).double()).to(device=like.device, dtype=like.dtype)
    matrix = (change.T if kind == "linear" else change).contiguous()  # so that the output is x @ matrix
    region = kind_of(target).region(target)
    if region is None:
        return MatmulDelta("input", None, matrix)
    # a Linear weight is [out, in] (columns are inputs); a Conv1D weight is stored [in, out] (rows are inputs)
    axis, indices = region
    gathers = (axis == "columns") == (kind == "linear")
    return MatmulDelta("input" if gathers else "output", to_torch(indices).long().to(like.device), matrix)


def _parameter_delta(target, after: torch.Tensor, placement: Placement, attr: str, like: torch.Tensor) -> ParameterDelta:
    region = kind_of(target).region(target)
    if region is not None:
        positions = placement.slice_positions(region[0], to_torch(region[1]))
    elif (converted := placement.positions) is not None:
        positions = converted
    else:  # held as the checkpoint stores it
        positions = torch.arange(like.numel()).reshape(like.shape)
    return ParameterDelta(attr, positions.reshape(-1).long().to(like.device),
                          after.reshape(-1).to(device=like.device, dtype=like.dtype))


def live_deltas(adapter: Adapter, model: nn.Module, placements: dict[str, Placement],
                source: TensorSource) -> dict[str, list[Delta]]:
    """``{module name: deltas}``: what ``adapter`` adds to each layer of ``model`` (loaded from ``source``)."""
    found: dict[str, list[Delta]] = {}
    parameters: dict[tuple[str, str], list[ParameterDelta]] = {}
    holders: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        holders[id(p)] = holders.get(id(p), 0) + 1
    for name, target in adapter.targets.items():
        placement = placements.get(stored_name(name, model, placements))
        if placement is None:
            raise BaseMismatch(f"the model holds no tensor {name!r} (adapter made for {adapter.base.name!r})")
        module_name, _, attr = placement.parameter.rpartition(".")
        module = model.get_submodule(module_name)
        parameter = module.get_parameter(attr)
        if holders[id(parameter)] > 1:  # a hook on one holder would leave the others (a tied lm_head) unchanged
            raise S2RegError(f"{name}: {placement.parameter} is shared with other modules (tied weights); "
                             "merge this adapter instead of serving it")
        if not parameter.is_contiguous():
            raise S2RegError(f"{name}: {placement.parameter} is not contiguous in memory, so its values cannot be "
                             "swapped per sequence; merge this adapter instead of serving it")
        before, after = _merged_region(target, read_array(source, name))
        kind = matmul_kind(module)
        if kind is not None and attr == "weight" and not placement.converted:
            found.setdefault(module_name, []).append(_matmul_delta(target, before, after, kind, parameter))
        else:
            parameters.setdefault((module_name, attr), []).append(_parameter_delta(target, after, placement, attr, parameter))
    for (module_name, _), deltas in parameters.items():
        found.setdefault(module_name, []).append(ParameterDelta.joined(deltas))
    return found
