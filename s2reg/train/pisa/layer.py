"""A linear layer plus a trainable PISA delta: a few rfft2 coefficients per block.

Frequency positions are drawn once (seeded) and kept as a buffer, then stored explicitly in the
exported adapter (FORMAT §5). The coefficients start at zero, so training starts from the base
model. The delta is rebuilt once per forward for all blocks at once, with the format's own
reconstruction (``s2reg.format.pisa.reconstruct``), so training and merging agree exactly.
``state_dict()`` (and so ``save_pretrained``) holds that effective weight under the weight's own name
and no coefficients (``ways_out.py``).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ...format.pisa import grid_of, half_width, reconstruct, self_conjugate_columns
from ..fsdp import whole
from ...arch.matmul import matmul, matmul_kind
from ..ways_out import report_trained_weight


def canonical_positions(block: tuple[int, int]) -> torch.Tensor:
    """Half-plane positions ``u * hw + v`` that are independent coefficients (FORMAT §5.3).

    In the self-conjugate columns (v = 0 and, for even widths, the Nyquist column) position u and
    its mirror -u hold one conjugate pair; only the first of each pair is offered.
    """
    bh, bw = block
    hw = half_width(block)
    self_conjugate = set(self_conjugate_columns(bw))
    keep = []
    for u in range(bh):
        for v in range(hw):
            if v not in self_conjugate or u <= (-u) % bh:
                keep.append(u * hw + v)
    return torch.tensor(keep, dtype=torch.long)


def attach(linear: nn.Module, block: tuple[int, int], k: int, scale: float, generator: torch.Generator) -> nn.Parameter:
    """Give the matmul layer ``linear`` a trainable PISA delta of ``k`` coefficients per block; return the parameter.

    The delta lives on the STORED weight (``[in, out]`` for GPT-2's Conv1D), as the adapter does.
    """
    kind = matmul_kind(linear)
    if kind is None:
        raise ValueError(f"{type(linear).__name__} is not a matmul layer (nn.Linear or Conv1D)")
    linear.pisa_transposed = kind == "conv1d"
    linear.weight.requires_grad_(False)
    shape = tuple(linear.weight.shape)
    blocks = grid_of(shape, block)[0] * grid_of(shape, block)[1]
    offered = canonical_positions(block)
    if not 1 <= k <= offered.numel():
        raise ValueError(f"coefficients per block must be 1..{offered.numel()} for a {block[0]}x{block[1]} block")
    picks = torch.stack([offered[torch.randperm(offered.numel(), generator=generator)[:k]].sort().values
                         for _ in range(blocks)])
    linear.pisa_block = block
    linear.pisa_scale = float(scale)
    linear.register_buffer("pisa_indices", picks.to(linear.weight.device), persistent=False)
    dtype = torch.promote_types(linear.weight.dtype, torch.float32)
    linear.pisa_coefficients = nn.Parameter(torch.zeros(blocks, k, 2, device=linear.weight.device, dtype=dtype))
    linear.forward = types.MethodType(_forward, linear)
    report_trained_weight(linear, "weight", "pisa_coefficients", _trained_weight, None)
    return linear.pisa_coefficients


def is_attached(module: nn.Module) -> bool:
    return hasattr(module, "pisa_coefficients")


def block_delta(shape: tuple[int, int], block: tuple[int, int], indices: torch.Tensor, coefficients: torch.Tensor,
                scale: float, precision: torch.dtype = torch.complex64) -> torch.Tensor:
    """The dense delta (FORMAT §5.3) of real ``[blocks, k, 2]`` coefficients, differentiable."""
    if precision == torch.complex128:
        coefficients = coefficients.double()
    elif coefficients.dtype != torch.float32:  # bf16 under FSDP's mixed precision: no complex bf16
        coefficients = coefficients.float()
    return reconstruct(shape, block, indices, torch.complex(coefficients[..., 0], coefficients[..., 1]), scale,
                       precision=precision)


def effective_weight(weight: torch.Tensor, coefficients: torch.Tensor, indices: torch.Tensor, block: tuple[int, int],
                     scale: float) -> torch.Tensor:
    """``W + delta`` in the weight's dtype: what the forward computes with, and what ``state_dict`` reports."""
    precision = torch.complex128 if weight.dtype == torch.float64 else torch.complex64
    d = block_delta(tuple(weight.shape), block, indices, coefficients, scale, precision)
    return weight + d.to(weight.dtype)


def pisa_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, coefficients: torch.Tensor,
                indices: torch.Tensor, block: tuple[int, int], scale: float, transposed: bool = False) -> torch.Tensor:
    """``x @ (W + delta)^T + b`` (``x @ (W + delta) + b`` for a transposed ``W``) in one matmul (a
    weight-sized temporary, instead of a second matmul)."""
    return matmul(x, effective_weight(weight, coefficients, indices, block, scale), bias, transposed)


def _trained_weight(linear: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    return effective_weight(weight, whole(linear.pisa_coefficients.detach()), linear.pisa_indices, linear.pisa_block,
                            linear.pisa_scale)


def delta(linear: nn.Linear) -> torch.Tensor:
    """The current dense delta of a PISA-attached linear layer."""
    return block_delta(tuple(linear.weight.shape), linear.pisa_block, linear.pisa_indices, linear.pisa_coefficients,
                       linear.pisa_scale)


def _forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return pisa_linear(x, linear.weight, linear.bias, linear.pisa_coefficients, linear.pisa_indices, linear.pisa_block,
                       linear.pisa_scale, linear.pisa_transposed)
