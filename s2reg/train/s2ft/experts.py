"""Partial back-propagation for the fused MoE experts of transformers 5.

transformers keeps an MoE layer's experts as 3-D parameters of one module (``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``; gpt-oss stores them transposed, ``[E, H, 2I]`` and
``[E, I, H]``, with biases) and runs them through the kernel ``config._experts_implementation`` names
(``eager``, ``grouped_mm``, ``batched_mm``...). S2FT trains a few channels of some experts: rows or
columns of the per-expert matrices ``W[e]``.

The experts module is wrapped (``S2FTExperts``, ``wrapper.py``) and keeps its class, its parameters
(frozen: ``requires_grad=False``, never a ``.grad``) and its kernel; the wrapper's forward is one
autograd node whose output is transformers' own experts forward, computed without a graph, so logits
and routing are exactly the untouched model's. The trainable values are one small vector per 3-D
parameter, the wrapper's ``s2ft_<parameter>``, in checkpoint order
(``arch/layout.py``). The frozen parameter is never written (as in ``layer.py``, so that FSDP's
gathered shards stay the truth): the forward runs the kernel on the effective weight, the frozen one
with the trained values put in, and the backward rebuilds each reached expert's effective matrices.

The forward saves only the layer's input and routing. The backward walks the experts the batch
reached, one at a time as transformers' eager kernel does, recomputes that expert's activations and
computes only what is asked for: the gradients of the trained slices (from the activations they read,
as ``layer._SliceMatmul`` does), the input's gradient when something below trains, the routing
weights' gradient when the router's input needs one; an expert with none of these is skipped. No
weight-sized gradient is ever formed: the largest temporaries are one expert's activations. The price
is one more forward matmul per reached expert (the recomputation), which full fine-tuning saves by
keeping every expert's activations.

As on matmul layers, ``state_dict()`` holds the effective 3-D parameter under its own name and no
``s2ft_<parameter>`` (``ways_out.py``), and the backward replays the forward's autocast.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import S2RegError
from ..fsdp import whole
from ...arch.matmul import matmul
from ..wrapper import Delta, TrainingWrapper, unchanged, wrap
from .layer import autocast_state, input_gradient, master, replay_autocast, slice_gradient

# The weight names of transformers' ``use_experts_implementation`` modules: the first projection
# (gate and up fused, or up alone for experts without a gate) and the second.
_FIRST = ("gate_up_proj", "up_proj")
_SECOND = "down_proj"


@dataclass(frozen=True)
class _Block:
    """One expert's trained slice of one 3-D parameter: rows (``dim`` 1) or columns (``dim`` 2) of
    ``W[expert]``; ``order`` holds the trainable vector's positions laid out as that slice."""

    expert: int
    dim: int
    indices: torch.Tensor
    order: torch.Tensor


def is_experts(module: nn.Module, name: str) -> bool:
    """Is ``name`` a 3-D expert weight of a transformers fused-experts module?"""
    param = module._parameters.get(name)
    return (name in (*_FIRST, _SECOND) and param is not None and param.dim() == 3
            and hasattr(module, "num_experts") and hasattr(module, "is_transposed"))


def _blocks(shape: torch.Size, positions: torch.Tensor, where: str) -> list[_Block]:
    """Split flat ``positions`` of a ``[E, A, B]`` parameter into whole rows or columns per expert."""
    _, rows, cols = shape
    if positions.unique().numel() != positions.numel():
        raise S2RegError(f"{where}: trained positions repeat")
    expert, row, col = positions // (rows * cols), positions // cols % rows, positions % cols
    blocks = []
    for e in expert.unique().tolist():
        mine = (expert == e).nonzero().reshape(-1)
        r, c = row[mine], col[mine]
        chosen_rows, chosen_cols = r.unique(), c.unique()
        if mine.numel() == chosen_rows.numel() * cols:  # whole rows of W[e]
            dim, indices, layout = 1, chosen_rows, torch.searchsorted(chosen_rows, r) * cols + c
        elif mine.numel() == chosen_cols.numel() * rows:  # whole columns of W[e]
            dim, indices, layout = 2, chosen_cols, r * chosen_cols.numel() + torch.searchsorted(chosen_cols, c)
        else:
            raise S2RegError(f"{where}: the trained slice of expert {e} is neither whole rows nor whole columns of it")
        order = torch.empty_like(mine)
        order[layout] = mine
        shape_2d = (indices.numel(), cols) if dim == 1 else (rows, indices.numel())
        blocks.append(_Block(e, dim, indices, order.reshape(shape_2d)))
    return blocks


class S2FTExperts(TrainingWrapper):
    """A transformers fused-experts module (``base_layer``) that trains only some elements of its 3-D
    parameters (whole rows or columns of some experts' matrices), added one parameter at a time
    (``train``). Its forward is the base layer's own, on the effective weights, as one autograd node."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.s2ft_positions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (flat positions, original)
        self.s2ft_blocks: dict[str, list[_Block]] = {}
        self._signature = inspect.signature(base_layer.forward)

    def trained_weights(self) -> dict[str, str]:
        return {name: f"s2ft_{name}" for name in self.s2ft_positions}

    def trained(self, weight: str, frozen: torch.Tensor) -> torch.Tensor:
        return _effective(frozen, self.s2ft_positions[weight][0], whole(getattr(self, f"s2ft_{weight}").detach()))

    def split(self, weight: str, trained: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A trained 3-D parameter (a state dict's) split into the frozen one (original values put back) and the values."""
        index, original = self.s2ft_positions[weight]
        index = index.to(trained.device)
        flat = trained.reshape(-1)
        return flat.index_copy(0, index, original.to(trained)).view(trained.shape), flat.index_select(0, index)

    def moves(self, trainable: str) -> tuple[str, Delta]:
        return trainable.removeprefix("s2ft_"), unchanged  # the values are elements of the parameter

    def forward(self, *args, **kwargs) -> torch.Tensor:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        hidden, top_k_index, top_k_weights = list(bound.arguments.values())[:3]
        trained = [n for n, p in self.base_layer._parameters.items() if p is not None and p.requires_grad]
        if trained:  # the backward below gives gradients to the S2FT slices only
            raise S2RegError(f"{type(self.base_layer).__name__}.{trained[0]} requires grad beside its S2FT slices; "
                             "freeze it")
        names = list(self.s2ft_positions)
        return _PartialExperts.apply(self, names, hidden, top_k_index, top_k_weights,
                                     *(getattr(self, f"s2ft_{n}") for n in names))


def attach_experts(model: nn.Module, module_name: str, name: str, positions: torch.Tensor) -> nn.Parameter:
    """Make the fused-experts module ``module_name`` of ``model`` train only the elements at flat
    ``positions`` of its 3-D parameter ``name`` (whole rows or columns of some experts' matrices).

    The module is wrapped in an ``S2FTExperts`` (once: its other parameters join the same wrapper). The
    trainable values are the wrapper's ``s2ft_<name>`` (1-D, in the order of ``positions``); the
    parameter keeps its name and class and changes only at those positions.
    """
    current = model.get_submodule(module_name)
    wrapper = current if isinstance(current, S2FTExperts) else None
    module = wrapper.base_layer if wrapper is not None else current
    where = f"{type(module).__name__}.{name}"
    if not is_experts(module, name):
        raise S2RegError(f"{where}: S2FT trains slices of matmul weights and of transformers' fused MoE experts only")
    if name in getattr(wrapper, "s2ft_positions", {}):
        raise S2RegError(f"{where} is already trained")
    param = module.get_parameter(name)
    index = positions.to(device=param.device, dtype=torch.long).reshape(-1)
    blocks = _blocks(param.shape, index, where)
    if wrapper is None:
        wrapper = wrap(model, module_name, S2FTExperts)
    param.requires_grad_(False)
    original = param.detach().reshape(-1).index_select(0, index).clone()
    wrapper.s2ft_positions[name] = (index, original)
    wrapper.s2ft_blocks[name] = blocks
    values = master(original)
    wrapper.register_parameter(f"s2ft_{name}", values)
    return values


def carried_slices(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{parameter name: (flat positions, original values, tuned values in the parameter's dtype)}``."""
    return {name: (index, original, whole(getattr(module, f"s2ft_{name}").detach()).to(original.dtype))
            for name, (index, original) in getattr(module, "s2ft_positions", {}).items()}


def _effective(param: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``param`` with the trained ``values`` at flat positions ``index`` (a copy in the parameter's dtype)."""
    return param.reshape(-1).index_copy(0, index, values.detach().to(param.dtype)).view(param.shape)


def _effective_expert(weight: torch.Tensor, expert: int, block: _Block | None, values: torch.Tensor) -> torch.Tensor:
    """One expert's effective matrix: ``weight[expert]`` with its trained slice (if any) put in."""
    if block is None:
        return weight[expert]
    return weight[expert].index_copy(block.dim - 1, block.indices, values[block.order].to(weight.dtype))


@contextmanager
def _effective_parameters(wrapper: S2FTExperts, trainables: dict[str, torch.Tensor]):
    """transformers' kernel reads ``base_layer.<name>``: the effective weights stand in for the block."""
    base = wrapper.base_layer
    frozen = {name: base._parameters[name] for name in trainables}
    try:
        for name, values in trainables.items():
            base._parameters[name] = _effective(frozen[name], wrapper.s2ft_positions[name][0], values)
        yield
    finally:
        base._parameters.update(frozen)


def _gate(module: Any, first: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(first) if module.has_gate else module.act_fn(first)


def _routed_output(module: Any, second: torch.Tensor, routed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An expert's contribution to its tokens' outputs, as transformers' kernels form it."""
    out = module.post_expert_norm(second) if module.has_post_expert_norm else second
    return (out * routed[:, None]).to(dtype)


class _PartialExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wrapper, names, hidden, top_k_index, top_k_weights, *trainables):
        ctx.wrapper, ctx.names = wrapper, names
        module = wrapper.base_layer
        ctx.trainable_dtypes = [t.dtype for t in trainables]
        ctx.first = "gate_up_proj" if module.has_gate else "up_proj"
        ctx.autocast = autocast_state(hidden.device.type)
        # the frozen weights are saved so that autograd catches an in-place change before the backward
        ctx.save_for_backward(hidden, top_k_index, top_k_weights, module._parameters[ctx.first],
                              module._parameters[_SECOND], *trainables)
        with _effective_parameters(wrapper, dict(zip(names, trainables, strict=True))):
            return module(hidden, top_k_index, top_k_weights)

    @staticmethod
    def backward(ctx, grad_out):
        with replay_autocast(ctx.autocast):
            return _PartialExperts._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        wrapper = ctx.wrapper
        module = wrapper.base_layer
        transposed = bool(module.is_transposed)
        hidden, top_k_index, top_k_weights, w_first, w_second, *trainables = ctx.saved_tensors
        values = dict(zip(ctx.names, trainables, strict=True))
        need_x, need_w = ctx.needs_input_grad[2], ctx.needs_input_grad[4]
        grad_x = torch.zeros_like(hidden) if need_x else None
        grad_w = torch.zeros_like(top_k_weights) if need_w else None
        grads = {n: torch.zeros(wrapper.s2ft_positions[n][0].numel(), dtype=d, device=hidden.device)
                 for n, d in zip(ctx.names, ctx.trainable_dtypes, strict=True)}
        blocks = {n: {b.expert: b for b in wrapper.s2ft_blocks[n]} for n in ctx.names}
        for expert in top_k_index.unique().tolist():
            first_block = blocks.get(ctx.first, {}).get(expert)
            second_block = blocks.get(_SECOND, {}).get(expert)
            if expert >= module.num_experts or not (need_x or need_w or first_block or second_block):
                continue  # an expert-parallel sentinel, or nothing of this expert is asked for
            token, slot = torch.where(top_k_index == expert)
            x = hidden[token].to(w_first.dtype)
            first_weight = _effective_expert(w_first, expert, first_block, values.get(ctx.first))
            second_weight = _effective_expert(w_second, expert, second_block, values.get(_SECOND))
            through_gate = need_x or first_block is not None
            with torch.enable_grad():
                first = matmul(x, first_weight, _bias(module, ctx.first, expert), transposed)
                mid = _gate(module, first.requires_grad_(through_gate))
            # the down projection's output matters only to a post-expert norm and to the routing
            # gradient; otherwise the gradient at it does not depend on it, and a stand-in serves
            if need_w or module.has_post_expert_norm:
                second = matmul(mid.detach(), second_weight, _bias(module, _SECOND, expert), transposed)
            else:
                second = mid.new_zeros(len(token), hidden.shape[-1])
            with torch.enable_grad():
                leaves = [second.requires_grad_(), top_k_weights[token, slot].detach().requires_grad_(need_w)]
                routed = _routed_output(module, *leaves, grad_out.dtype)
                g_second, *g_routed = torch.autograd.grad(routed, leaves[:1 + need_w], grad_out[token])
            if need_w:
                grad_w[token, slot] = g_routed[0].to(grad_w.dtype)
            if second_block is not None:
                _put(grads[_SECOND], second_block, _block_gradient(second_block, mid.detach(), g_second, transposed))
            if not through_gate:
                continue
            (g_first,) = torch.autograd.grad(mid, first, input_gradient(g_second, second_weight, transposed))
            if first_block is not None:
                _put(grads[ctx.first], first_block, _block_gradient(first_block, x, g_first, transposed))
            if need_x:
                # (index_put_ accumulates several times faster than index_add_ on CPU)
                grad_x.index_put_((token,), input_gradient(g_first, first_weight, transposed).to(grad_x.dtype),
                                  accumulate=True)
        return (None, None, grad_x, None, grad_w, *grads.values())


def _bias(module: Any, name: str, expert: int) -> torch.Tensor | None:
    return module._parameters[f"{name}_bias"][expert] if module.has_bias else None


def _block_gradient(block: _Block, x: torch.Tensor, grad_y: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The gradient of ``block`` in an expert matmul with input ``x`` and output gradient ``grad_y``."""
    outputs = (block.dim == 1) != transposed  # rows of [out, in], columns of [in, out]
    read = x if outputs else x.index_select(-1, block.indices)
    return slice_gradient(grad_y, read, block.indices, outputs, transposed)


def _put(grad: torch.Tensor, block: _Block, gradient: torch.Tensor) -> None:
    grad.index_copy_(0, block.order.reshape(-1), gradient.reshape(-1).to(grad.dtype))
