"""The two kinds of matmul layer S2FT and PISA train: ``nn.Linear`` (weight ``[out, in]``) and
GPT-2's ``Conv1D`` (weight stored transposed, ``[in, out]``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def matmul_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` or None (not a matmul layer)."""
    if isinstance(module, nn.Linear):
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent: no Conv1D layers can exist
        return None
    return "conv1d" if isinstance(module, Conv1D) else None


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """The layer's output for its stored ``weight`` (``transposed``: stored ``[in, out]``)."""
    if not transposed:
        return F.linear(x, weight, bias)
    y = x @ weight
    return y + bias if bias is not None else y
