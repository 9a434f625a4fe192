"""Partial back-propagation for one linear layer whose trainable part is a row or column slice.

The trainable slice is an ordinary small ``nn.Parameter`` (a master copy, at least float32), so any optimizer,
gradient accumulation, clipping, AMP and DDP work unchanged. The forward writes the slice's
current values into the frozen full weight and runs one ordinary matmul (no extra matmul, no
extra weight copy). The backward computes the input gradient as usual and the weight gradient
only for the slice, from the only activations it needs: the input columns the slice reads
(column slices) or the input itself (row slices, whose gradient is ``grad_y[:, rows]^T x``).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class _SliceLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, trainable, indices, rows: bool):
        ctx.rows = rows
        saved = x if rows else x.index_select(-1, indices)  # column slices need only their inputs
        ctx.save_for_backward(saved, weight, indices)
        ctx.trainable_dtype = trainable.dtype
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        saved, weight, indices = ctx.saved_tensors
        grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
        flat_g = grad_y.reshape(-1, grad_y.shape[-1])
        flat_x = saved.reshape(-1, saved.shape[-1])
        if ctx.rows:  # d loss / d W[rows, :] = grad_y[:, rows]^T x
            grad_slice = flat_g.index_select(1, indices).transpose(0, 1) @ flat_x
        else:  # d loss / d W[:, cols] = grad_y^T x[:, cols]
            grad_slice = flat_g.transpose(0, 1) @ flat_x
        grad_bias = flat_g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_slice.to(ctx.trainable_dtype), None, None


def attach(linear: nn.Linear, axis: str, indices: torch.Tensor) -> nn.Parameter:
    """Make ``linear`` train only its ``axis`` slice ``indices``; return the new trainable parameter.

    The module keeps its class and its ``weight`` name (checkpoints, ``s2reg.apply`` and DDP see the
    same model); it gains the parameter ``s2ft_slice`` (master values, at least float32) and a forward that
    uses partial back-propagation. ``weight`` itself is frozen and only ever changes on the slice.
    """
    if axis not in ("rows", "columns"):
        raise ValueError(f"axis must be 'rows' or 'columns', got {axis!r}")
    weight = linear.weight
    weight.requires_grad_(False)
    index = indices.to(device=weight.device, dtype=torch.long)
    dim = 0 if axis == "rows" else 1
    original = weight.detach().index_select(dim, index).clone()
    linear.s2ft_axis = axis
    linear.register_buffer("s2ft_indices", index, persistent=False)
    linear.register_buffer("s2ft_original", original, persistent=False)
    # A master copy at least float32 wide, so small updates of a bf16 model are not rounded away.
    # (a copy: ``.to`` of the same dtype would alias the original values the export diffs against)
    linear.s2ft_slice = nn.Parameter(original.to(torch.promote_types(original.dtype, torch.float32), copy=True))
    linear._s2ft_written = -1
    linear.forward = types.MethodType(_forward, linear)
    return linear.s2ft_slice


def is_attached(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and hasattr(module, "s2ft_slice")


def tuned_slice(linear: nn.Linear) -> torch.Tensor:
    """The slice as the model uses it: the trainable values rounded to the weight's dtype."""
    return linear.s2ft_slice.detach().to(linear.weight.dtype)


def _sync(linear: nn.Linear) -> None:
    # Only when the optimizer changed the slice: rewriting the weight while an earlier forward's
    # graph still holds it would trip autograd's in-place check for nothing.
    version = linear.s2ft_slice._version
    if version != linear._s2ft_written:
        with torch.no_grad():
            linear.weight.index_copy_(0 if linear.s2ft_axis == "rows" else 1, linear.s2ft_indices, tuned_slice(linear))
        linear._s2ft_written = version


def _forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    _sync(linear)
    weight = linear.weight
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    return _SliceLinear.apply(x, weight, linear.bias, linear.s2ft_slice, linear.s2ft_indices, linear.s2ft_axis == "rows")
