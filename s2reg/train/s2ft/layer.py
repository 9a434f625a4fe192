"""Training only a slice of a frozen weight: partial back-propagation for matmul layers, and
slice-only gradients for any other parameter (the 3-D fused MoE experts of transformers 5).

The trainable slice is an ordinary small ``nn.Parameter`` (a master copy, at least float32), so any
optimizer, gradient accumulation, clipping, AMP and DDP work unchanged; its values are written into
the frozen weight whenever the optimizer changed them, so the model always computes with one weight.

Matmul layers (``nn.Linear`` ``[out, in]`` and GPT-2's ``Conv1D``, stored transposed ``[in, out]``):
the slice is rows or columns of the STORED tensor (FORMAT §4). The backward computes the input
gradient as usual and the weight gradient only for the slice, from the only activations it needs: the
input itself for a slice of output features (``grad_y[:, outs]^T x``), the input features the slice
reads for a slice of input features (``grad_y^T x[:, ins]``).

Other parameters: the slice is a set of flat positions of the parameter (in checkpoint order, see
``train/layout.py``). The parameter is swapped for a tensor that carries the slice in autograd for the
duration of the owning module's forward; its gradient is the full parameter's gradient gathered at
those positions (the owning module computes the dense gradient; only the slice is kept).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..matmul import matmul, matmul_kind


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
        as_linear = weight.t() if ctx.transposed else weight  # [out, in] whatever the storage
        grad_x = grad_y @ as_linear if ctx.needs_input_grad[0] else None
        flat_g = grad_y.reshape(-1, grad_y.shape[-1])
        flat_x = saved.reshape(-1, saved.shape[-1])
        if ctx.outputs:  # d loss / d W[outs, :] = grad_y[:, outs]^T x   ([n, in])
            grad_slice = flat_g.index_select(1, indices).transpose(0, 1) @ flat_x
        else:  # d loss / d W[:, ins] = grad_y^T x[:, ins]   ([out, n])
            grad_slice = flat_g.transpose(0, 1) @ flat_x
        if ctx.transposed:  # back to the stored orientation
            grad_slice = grad_slice.transpose(0, 1)
        grad_bias = flat_g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_slice.to(ctx.trainable_dtype), None, None, None


def _master(values: torch.Tensor) -> nn.Parameter:
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
    module.s2ft_slice = _master(original)
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


# --- any other parameter: a slice at flat positions, gradient gathered from the dense one ---------

class _Carry(torch.autograd.Function):
    """The frozen parameter (already holding the slice's values) as a function of the slice."""

    @staticmethod
    def forward(ctx, values, holder, positions):
        ctx.save_for_backward(positions)
        ctx.values_dtype = values.dtype
        return holder.detach()

    @staticmethod
    def backward(ctx, grad):
        (positions,) = ctx.saved_tensors
        return grad.reshape(-1).index_select(0, positions).to(ctx.values_dtype), None, None


def attach_positions(module: nn.Module, name: str, positions: torch.Tensor) -> nn.Parameter:
    """Make ``module``'s parameter ``name`` train only the elements at flat ``positions``.

    The trainable values are ``module.s2ft_<name>`` (1-D, in the order of ``positions``); the
    parameter keeps its name and class and changes only at those positions.
    """
    param = module._parameters[name]
    param.requires_grad_(False)
    index = positions.to(device=param.device, dtype=torch.long).reshape(-1)
    original = param.detach().reshape(-1).index_select(0, index).clone()
    if not hasattr(module, "s2ft_positions"):
        module.s2ft_positions = {}
        module._s2ft_written = {}
        module._s2ft_inner_forward = module.forward
        module.forward = types.MethodType(_carrying_forward, module)
    module.s2ft_positions[name] = (index, original)
    module._s2ft_written[name] = -1
    values = _master(original)
    module.register_parameter(f"s2ft_{name}", values)
    return values


def carried_slices(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{parameter name: (flat positions, original values, tuned values in the parameter's dtype)}``."""
    return {name: (index, original, getattr(module, f"s2ft_{name}").detach().to(original.dtype))
            for name, (index, original) in getattr(module, "s2ft_positions", {}).items()}


def is_carrying(module: nn.Module) -> bool:
    return hasattr(module, "s2ft_positions")


def _carrying_forward(module: nn.Module, *args, **kwargs):
    frozen = {}
    for name, (index, _) in module.s2ft_positions.items():
        param = module._parameters[name]
        values = getattr(module, f"s2ft_{name}")
        if values._version != module._s2ft_written[name]:
            with torch.no_grad():
                param.view(-1).index_copy_(0, index, values.detach().to(param.dtype))
            module._s2ft_written[name] = values._version
        frozen[name] = param
        # the owning module reads ``self.<name>``: for this forward it is the parameter as a function of the slice
        module._parameters[name] = _Carry.apply(values, param, index)
    try:
        return module._s2ft_inner_forward(*args, **kwargs)
    finally:
        module._parameters.update(frozen)
