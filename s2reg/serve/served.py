"""One layer's resident adapters, applied to the rows of their sequences by a forward hook.

The record lives on the module (``module.s2reg_served``) and holds each adapter's deltas; the batch
being run (a :class:`Routing`) comes from the :class:`Batch` the server shares with every layer. A
matmul layer's weights are never written: its output gets each adapter's small matmul added for that
adapter's rows (one per adapter per layer). A layer whose other parameters an adapter changes is run
again with the merged values swapped into the parameter for that call only (its own values go back bit
for bit right after), its output kept for that adapter's rows
(on just those rows when every input holds one row per output row, as an MoE experts block's do).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import S2RegError
from .deltas import Delta, MatmulDelta, ParameterDelta
from .routing import Routing

ATTRIBUTE = "s2reg_served"


@dataclass
class Batch:
    """The routing of the batch being run (None outside a run: every layer then computes the base)."""

    routing: Routing | None = None


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _row_aligned(args: tuple, kwargs: dict, count: int) -> bool:
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    return bool(tensors) and all(t.dim() >= 1 and t.shape[0] == count for t in tensors)


def _pick(values: tuple, rows: torch.Tensor) -> tuple:
    return tuple(v.index_select(0, rows) if isinstance(v, torch.Tensor) else v for v in values)


class ServedModule:
    """The deltas of the adapters resident on one module, and the hook that applies them."""

    def __init__(self, module: nn.Module, name: str, batch: Batch):
        self.name, self.batch = name, batch
        self.deltas: dict[str, list[Delta]] = {}
        self._rerunning = False
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    @classmethod
    def of(cls, module: nn.Module, name: str, batch: Batch) -> ServedModule:
        served = getattr(module, ATTRIBUTE, None)
        if served is None:
            served = cls(module, name, batch)
            setattr(module, ATTRIBUTE, served)
        return served

    def drop(self, module: nn.Module, adapter: str) -> None:
        """Forget ``adapter``'s deltas; the hook goes when the last adapter does."""
        self.deltas.pop(adapter, None)
        if not self.deltas:
            self._handle.remove()
            delattr(module, ATTRIBUTE)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        routing = self.batch.routing
        if routing is None or self._rerunning:
            return None
        names = [n for n in routing.names if n in self.deltas]
        if not names:
            return None
        if not isinstance(output, torch.Tensor):
            raise S2RegError(f"{self.name} returns {type(output).__name__}, not a tensor: its adapters cannot be applied per sequence")
        out = output if output.is_contiguous() else output.contiguous()
        y = out.view(-1, out.shape[-1])
        for name in names:
            rows = None if routing.covers_all(name) else routing.rows(name, y.shape[0])
            rerun = [d for d in self.deltas[name] if isinstance(d, ParameterDelta)]
            if rerun and rows is not None and _row_aligned(args, kwargs, y.shape[0]):
                # every input holds one row per output row (an MoE experts block): rerun just these rows
                picked_args, picked_kwargs = _pick(args, rows), dict(zip(kwargs, _pick(tuple(kwargs.values()), rows), strict=True))
                y.index_copy_(0, rows, _flat(self._rerun(module, picked_args, picked_kwargs, rerun)))
            elif rerun:
                merged = _flat(self._rerun(module, args, kwargs, rerun))
                if rows is None:
                    y.copy_(merged)
                else:
                    y.index_copy_(0, rows, merged.index_select(0, rows))
            matmuls = [d for d in self.deltas[name] if isinstance(d, MatmulDelta)]
            if matmuls:
                x = _flat(args[0] if args else next(iter(kwargs.values())))
                for delta in matmuls:
                    delta.add_to(y, x, rows)
        return out

    def _rerun(self, module: nn.Module, args: tuple, kwargs: dict, deltas: list[ParameterDelta]) -> torch.Tensor:
        """The module's output with ``deltas`` swapped into its parameters (and swapped out again)."""
        with ExitStack() as stack, torch.no_grad():
            for delta in deltas:
                stack.enter_context(delta.swapped_into(module.get_parameter(delta.attr)))
            self._rerunning = True  # the rerun passes through this hook again: leave it alone there
            try:
                out = module(*args, **kwargs)
            finally:
                self._rerunning = False
        if not isinstance(out, torch.Tensor):
            raise S2RegError(f"{self.name} returns {type(out).__name__}, not a tensor: its adapters cannot be applied per sequence")
        return out
