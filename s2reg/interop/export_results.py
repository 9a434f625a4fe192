"""What an export to PEFT LoRA or to a llama.cpp GGUF LoRA reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..results import Result, omitted_if_none


@dataclass(frozen=True)
class LoRAExport(Result):
    """A PEFT LoRA directory written to ``output``: ``modules`` adapted, their largest rank, the PEFT task type
    and Conv1D setting, and each target's relative error (of ``max_error`` allowed) and rank."""

    output: str
    max_rank: int
    modules: int
    task_type: str | None  # None: a base whose model class PEFT has no task type for
    fan_in_fan_out: bool
    max_relative_error: float
    relative_error: Mapping[str, float]
    rank: Mapping[str, int]
    max_error: float


@dataclass(frozen=True)
class GGUFExport(Result):
    """A llama.cpp LoRA GGUF: the base's ``family`` as llama.cpp's ``architecture``, the one rank (and alpha)
    every tensor is padded to, and the PEFT export's relative errors; ``output`` once written."""

    architecture: str
    family: str
    rank: int
    alpha: float
    tensors: int
    max_relative_error: float
    relative_error: Mapping[str, float]
    output: str | None = omitted_if_none()
