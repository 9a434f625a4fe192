"""Training only a slice of a frozen matmul weight: partial back-propagation.

The trainable slice is an ordinary small ``nn.Parameter`` (a master copy, at least float32), so any
optimizer, gradient accumulation, clipping, AMP, DDP and FSDP work unchanged. The frozen weight is
never written: each forward computes with the effective weight, the frozen one with the slice (rounded
to the weight's dtype) put in its place, which is bit for bit the weight ``s2reg merge`` writes. Under
FSDP both are all-gathered shards, so a write into the weight would be lost at the next gather; a
functional forward is correct whoever owns the storage. The price is one weight-sized temporary per
layer while it computes (FSDP holds the gathered layer anyway).

Matmul layers (``nn.Linear`` ``[out, in]`` and GPT-2's ``Conv1D``, stored transposed ``[in, out]``):
the slice is rows or columns of the STORED tensor (FORMAT §4). The backward computes the input
gradient as usual and the weight gradient only for the slice, from the only activations it needs: the
input itself for a slice of output features (``grad_y[:, outs]^T x``), the input features the slice
reads for a slice of input features (``grad_y^T x[:, ins]``). The fused 3-D experts of an MoE layer
use the same two rules per expert (``experts.py``). Under autocast (transformers' ``bf16=True``) the
backward runs under the forward's autocast state, so its matmuls take the dtypes an ``nn.Linear``'s
would.

The layer is wrapped, not patched: ``S2FTLinear`` holds it as ``base_layer`` (``wrapper.py``). Every
way out of the model sees the trained weights: ``state_dict()`` (and so ``save_pretrained``) holds
the effective weight under the weight's own name and no ``s2ft_slice`` (``ways_out.py``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..fsdp import whole
from ...arch.matmul import matmul, matmul_kind
from ..wrapper import Delta, TrainingWrapper, unchanged, wrap


def input_gradient(grad_y: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``d loss / d x`` of ``y = matmul(x, weight)`` (``transposed``: stored ``[in, out]``)."""
    return grad_y @ (weight.t() if transposed else weight)


def slice_gradient(grad_y: torch.Tensor, read: torch.Tensor, indices: torch.Tensor, outputs: bool,
                   transposed: bool) -> torch.Tensor:
    """The weight gradient of a slice of ``outputs`` (else input) features ``indices``, in stored orientation.

    ``read`` is what the slice reads: the whole input for output features, the input features
    ``indices`` for input features.
    """
    flat_g = grad_y.reshape(-1, grad_y.shape[-1])
    flat_x = read.reshape(-1, read.shape[-1])
    if outputs:  # d loss / d W[outs, :] = grad_y[:, outs]^T x   ([n, in])
        grad = flat_g.index_select(1, indices).transpose(0, 1) @ flat_x
    else:  # d loss / d W[:, ins] = grad_y^T x[:, ins]   ([out, n])
        grad = flat_g.transpose(0, 1) @ flat_x
    return grad.transpose(0, 1) if transposed else grad  # back to the stored orientation


def effective_weight(weight: torch.Tensor, trainable: torch.Tensor, indices: torch.Tensor, dim: int) -> torch.Tensor:
    """``weight`` with its ``dim`` slice ``indices`` replaced by ``trainable`` in the weight's dtype (a copy)."""
    return weight.index_copy(dim, indices, trainable.detach().to(weight.dtype))


def autocast_state(device_type: str) -> tuple[str, torch.dtype] | None:
    """The autocast a forward ran under, for its backward to replay (autograd runs backwards without it)."""
    return (device_type, torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else None


@contextmanager
def replay_autocast(state: tuple[str, torch.dtype] | None):
    with torch.autocast(state[0], dtype=state[1]) if state else nullcontext():
        yield


class _SliceMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, trainable, indices, dim: int, outputs: bool, transposed: bool):
        ctx.dim, ctx.outputs, ctx.transposed = dim, outputs, transposed
        saved = x if outputs else x.index_select(-1, indices)  # a slice of inputs needs only those inputs
        # the frozen weight and the slice, not the effective weight: FSDP frees and re-gathers the former
        ctx.save_for_backward(saved, weight, trainable, indices)
        ctx.trainable_dtype = trainable.dtype
        ctx.has_bias = bias is not None
        ctx.autocast = autocast_state(x.device.type)
        return matmul(x, effective_weight(weight, trainable, indices, dim), bias, transposed)

    @staticmethod
    def backward(ctx, grad_y):
        with replay_autocast(ctx.autocast):
            return _SliceMatmul._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y):
        saved, weight, trainable, indices = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = input_gradient(grad_y, effective_weight(weight, trainable, indices, ctx.dim), ctx.transposed)
        grad_slice = slice_gradient(grad_y, saved, indices, ctx.outputs, ctx.transposed)
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_slice.to(ctx.trainable_dtype), None, None, None, None


def master(values: torch.Tensor) -> nn.Parameter:
    # At least float32, so small updates of a bf16 model are not rounded away; always a copy (``.to``
    # of the same dtype would alias the original values the export diffs against).
    return nn.Parameter(values.to(torch.promote_types(values.dtype, torch.float32), copy=True))


class S2FTLinear(TrainingWrapper):
    """A matmul layer (``base_layer``) that trains only the ``axis`` slice ``indices`` of its stored weight.

    The slice is the parameter ``s2ft_slice``; the base layer's ``weight`` is frozen and never changes.
    """

    def __init__(self, base_layer: nn.Module, axis: str, indices: torch.Tensor):
        if axis not in ("rows", "columns"):
            raise ValueError(f"axis must be 'rows' or 'columns', got {axis!r}")
        kind = matmul_kind(base_layer)
        if kind is None:
            raise ValueError(f"{type(base_layer).__name__} is not a matmul layer (nn.Linear or Conv1D)")
        super().__init__(base_layer)
        weight = base_layer.get_parameter("weight")
        weight.requires_grad_(False)
        index = indices.to(device=weight.device, dtype=torch.long)
        original = weight.detach().index_select(_DIM[axis], index).clone()
        self.s2ft_axis = axis
        self.s2ft_transposed = kind == "conv1d"
        self.register_buffer("s2ft_indices", index, persistent=False)
        self.register_buffer("s2ft_original", original, persistent=False)
        self.s2ft_slice = master(original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight
        if x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        outputs = (self.s2ft_axis == "rows") != self.s2ft_transposed  # a slice of output features?
        return _SliceMatmul.apply(x, weight, self.base_layer.bias, self.s2ft_slice, self.s2ft_indices,
                                  _DIM[self.s2ft_axis], outputs, self.s2ft_transposed)

    def trained_weights(self) -> dict[str, str]:
        return {"weight": "s2ft_slice"}

    def trained(self, weight: str, frozen: torch.Tensor) -> torch.Tensor:
        return effective_weight(frozen, whole(self.s2ft_slice.detach()), self.s2ft_indices, _DIM[self.s2ft_axis])

    def split(self, weight: str, trained: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A trained weight (a state dict's) split into the frozen weight (the original slice put back) and the slice."""
        dim = _DIM[self.s2ft_axis]
        index = self.s2ft_indices.to(trained.device)
        return trained.index_copy(dim, index, self.s2ft_original.to(trained)), trained.index_select(dim, index)

    def moves(self, trainable: str) -> tuple[str, Delta]:
        return "weight", unchanged  # the slice is a part of the weight: its change is the weight's


_DIM = {"rows": 0, "columns": 1}


def attach(model: nn.Module, name: str, axis: str, indices: torch.Tensor) -> nn.Parameter:
    """Make the matmul layer ``name`` of ``model`` train only the ``axis`` slice ``indices`` of its stored
    weight (it is wrapped in an ``S2FTLinear``); return the slice parameter."""
    wrapper = wrap(model, name, lambda layer: S2FTLinear(layer, axis, indices))
    return wrapper.s2ft_slice


def is_attached(module: nn.Module) -> bool:
    return isinstance(module, S2FTLinear)


def tuned_slice(module: S2FTLinear) -> torch.Tensor:
    """The slice as the model uses it: the trainable values rounded to the weight's dtype."""
    return whole(module.s2ft_slice.detach()).to(module.weight.dtype)
