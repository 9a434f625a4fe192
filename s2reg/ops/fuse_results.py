"""What ``fuse`` reports: the fused adapter and, per tensor, how much of the inputs overlapped.

Frozen results with one JSON form (:class:`s2reg.results.Result`); importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..results import Result, not_in_json, omitted_if_none

if TYPE_CHECKING:
    from ..format import Adapter


@dataclass(frozen=True, kw_only=True)
class FusedTensor(Result):
    """One fused tensor: how many ``inputs`` held it, its support (S2FT: the union's ``indices``; PISA: the
    ``coefficients_per_block`` of the fused blocks), and the ``overlapping`` positions several inputs held,
    also as a fraction of that support. Each kind reports its own support, so the other one is left out."""

    tensor: str
    inputs: int
    indices: int | None = omitted_if_none()
    coefficients_per_block: int | None = omitted_if_none()
    overlapping: int
    overlap_fraction: float


@dataclass(frozen=True)
class FuseResult(Result):
    """The fused ``adapter`` (in memory, not yet saved: ``s2reg fuse`` saves it) and its ``tensors`` report."""

    adapter: Adapter = not_in_json()
    tensors: tuple[FusedTensor, ...] = ()
