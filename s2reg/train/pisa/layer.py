"""A linear layer plus a trainable PISA delta: a few rfft2 coefficients per block.

Frequency positions are drawn once (seeded) and kept as a buffer, then stored explicitly in the
exported adapter (FORMAT §5). The coefficients start at zero, so training starts from the base
model. The delta is rebuilt once per forward for all blocks at once, with the format's own
reconstruction (``s2reg.format.pisa.reconstruct``), so training and merging agree exactly.
The layer is wrapped (``PISALinear``, ``wrapper.py``); ``state_dict()`` (and so ``save_pretrained``)
holds that effective weight under the weight's own name and no coefficients (``ways_out.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import S2RegError
from ...format.pisa import grid_of, half_width, reconstruct, self_conjugate_columns
from ..fsdp import whole
from ...arch.matmul import matmul, matmul_kind
from ..wrapper import Delta, TrainingWrapper, wrap


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


class PISALinear(TrainingWrapper):
    """A matmul layer (``base_layer``) plus a trainable PISA delta of ``k`` coefficients per block
    (``pisa_coefficients``, starting at zero), drawn at ``generator``'s frequency positions.

    The delta lives on the STORED weight (``[in, out]`` for GPT-2's Conv1D), as the adapter does.
    """

    def __init__(self, base_layer: nn.Module, block: tuple[int, int], k: int, scale: float,
                 generator: torch.Generator):
        kind = matmul_kind(base_layer)
        if kind is None:
            raise ValueError(f"{type(base_layer).__name__} is not a matmul layer (nn.Linear or Conv1D)")
        super().__init__(base_layer)
        weight = base_layer.get_parameter("weight")
        self.pisa_transposed = kind == "conv1d"
        weight.requires_grad_(False)
        shape = tuple(weight.shape)
        blocks = grid_of(shape, block)[0] * grid_of(shape, block)[1]
        offered = canonical_positions(block)
        if not 1 <= k <= offered.numel():
            raise ValueError(f"coefficients per block must be 1..{offered.numel()} for a {block[0]}x{block[1]} block")
        picks = torch.stack([offered[torch.randperm(offered.numel(), generator=generator)[:k]].sort().values
                             for _ in range(blocks)])
        self.pisa_block = block
        self.pisa_scale = float(scale)
        self.register_buffer("pisa_indices", picks.to(weight.device), persistent=False)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.pisa_coefficients = nn.Parameter(torch.zeros(blocks, k, 2, device=weight.device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pisa_linear(x, self.base_layer.weight, self.base_layer.bias, self.pisa_coefficients, self.pisa_indices,
                           self.pisa_block, self.pisa_scale, self.pisa_transposed)

    def trained_weights(self) -> dict[str, str]:
        return {"weight": "pisa_coefficients"}

    def trained(self, weight: str, frozen: torch.Tensor) -> torch.Tensor:
        return effective_weight(frozen, whole(self.pisa_coefficients.detach()), self.pisa_indices, self.pisa_block,
                                self.pisa_scale)

    def split(self, weight: str, trained: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise S2RegError("a PISA layer's coefficients cannot be read back from its trained weight: resume from the "
                         "trainer's checkpoint (its trainable state) or load the s2reg adapter")

    def moves(self, trainable: str) -> tuple[str, Delta]:
        shape = tuple(self.base_layer.weight.shape)
        return "weight", lambda c: block_delta(shape, self.pisa_block, self.pisa_indices, c, self.pisa_scale)


def attach(model: nn.Module, name: str, block: tuple[int, int], k: int, scale: float,
           generator: torch.Generator) -> nn.Parameter:
    """Wrap the matmul layer ``name`` of ``model`` in a ``PISALinear``; return its coefficients."""
    return wrap(model, name, lambda layer: PISALinear(layer, block, k, scale, generator)).pisa_coefficients


def is_attached(module: nn.Module) -> bool:
    return isinstance(module, PISALinear)


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
    rows, cols = weight.shape
    d = block_delta((rows, cols), block, indices, coefficients, scale, precision)
    return weight + d.to(weight.dtype)


def pisa_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, coefficients: torch.Tensor,
                indices: torch.Tensor, block: tuple[int, int], scale: float, transposed: bool = False) -> torch.Tensor:
    """``x @ (W + delta)^T + b`` (``x @ (W + delta) + b`` for a transposed ``W``) in one matmul (a
    weight-sized temporary, instead of a second matmul)."""
    return matmul(x, effective_weight(weight, coefficients, indices, block, scale), bias, transposed)


def delta(linear: PISALinear) -> torch.Tensor:
    """The current dense delta of a PISA layer."""
    return block_delta(tuple(linear.weight.shape), linear.pisa_block, linear.pisa_indices, linear.pisa_coefficients,
                       linear.pisa_scale)
