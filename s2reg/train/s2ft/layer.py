"""Training only a slice of a frozen matmul weight: partial back-propagation.

The trainable slice is an ordinary small ``nn.Parameter`` (a master copy, at least float32), so any
optimizer, gradient accumulation, clipping, AMP and DDP work unchanged; its values are written into
the frozen weight whenever the optimizer changed them, so the model always computes with one weight.

Matmul layers (``nn.Linear`` ``[out, in]`` and GPT-2's ``Conv1D``, stored transposed ``[in, out]``):
the slice is rows or columns of the STORED tensor (FORMAT §4). The backward computes the input
gradient as usual and the weight gradient only for the slice, from the only activations it needs: the
input itself for a slice of output features (``grad_y[:, outs]^T x``), the input features the slice
reads for a slice of input features (``grad_y^T x[:, ins]``). The fused 3-D experts of an MoE layer
use the same two rules per expert (``experts.py``).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..matmul import matmul, matmul_kind


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


class _SliceMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, trainable, indices, outputs: bool, transposed: bool):
        ctx.outputs, ctx.transposed = outputs, transposed
        saved = x if outputs else x.index_select(-1, indices)  # a slice of inputs needs only those inputs
        ctx.save_for_backward(saved, weight, indices)
        ctx.trainable_dtype = trainable.dtype
        ctx.has_bias = bias is not None
        return matmul(x, weight, bias, transposed)

    @staticmethod
    def backward(ctx, grad_y):
        saved, weight, indices = ctx.saved_tensors
        grad_x = input_gradient(grad_y, weight, ctx.transposed) if ctx.needs_input_grad[0] else None
        grad_slice = slice_gradient(grad_y, saved, indices, ctx.outputs, ctx.transposed)
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_slice.to(ctx.trainable_dtype), None, None, None


def master(values: torch.Tensor) -> nn.Parameter:
    # At least float32, so small updates of a bf16 model are not rounded away; always a copy (``.to``
    # of the same dtype would alias the original values the export diffs against).
    return nn.Parameter(values.to(torch.promote_types(values.dtype, torch.float32), copy=True))


def attach(module: nn.Module, axis: str, indices: torch.Tensor) -> nn.Parameter:
    """Make the matmul layer ``module`` train only the ``axis`` slice ``indices`` of its stored weight.

    The module keeps its class and its ``weight`` name (checkpoints, ``s2reg.apply`` and DDP see the
    same model); it gains the parameter ``s2ft_slice`` and a forward with partial back-propagation.
    ``weight`` itself is frozen and only ever changes on the slice.
    """
    if axis not in ("rows", "columns"):
        raise ValueError(f"axis must be 'rows' or 'columns', got {axis!r}")
    kind = matmul_kind(module)
    if kind is None:
        raise ValueError(f"{type(module).__name__} is not a matmul layer (nn.Linear or Conv1D)")
    weight = module.weight
    weight.requires_grad_(False)
    index = indices.to(device=weight.device, dtype=torch.long)
    dim = 0 if axis == "rows" else 1
    original = weight.detach().index_select(dim, index).clone()
    module.s2ft_axis = axis
    module.s2ft_transposed = kind == "conv1d"
    module.register_buffer("s2ft_indices", index, persistent=False)
    module.register_buffer("s2ft_original", original, persistent=False)
    module.s2ft_slice = master(original)
    module._s2ft_written = -1
    module.forward = types.MethodType(_forward, module)
    return module.s2ft_slice


def is_attached(module: nn.Module) -> bool:
    return hasattr(module, "s2ft_slice")


def tuned_slice(module: nn.Module) -> torch.Tensor:
    """The slice as the model uses it: the trainable values rounded to the weight's dtype."""
    return module.s2ft_slice.detach().to(module.weight.dtype)


def _sync(module: nn.Module) -> None:
    # Only when the optimizer changed the slice: rewriting the weight while an earlier forward's
    # graph still holds it would trip autograd's in-place check for nothing.
    version = module.s2ft_slice._version
    if version != module._s2ft_written:
        with torch.no_grad():
            module.weight.index_copy_(0 if module.s2ft_axis == "rows" else 1, module.s2ft_indices, tuned_slice(module))
        module._s2ft_written = version


def _forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _sync(module)
    weight = module.weight
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    outputs = (module.s2ft_axis == "rows") != module.s2ft_transposed  # a slice of output features?
    return _SliceMatmul.apply(x, weight, module.bias, module.s2ft_slice, module.s2ft_indices, outputs,
                              module.s2ft_transposed)
