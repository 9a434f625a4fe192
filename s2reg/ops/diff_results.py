"""What ``diff`` reports: per tensor, how two adapters' deltas, or two checkpoints' values, differ."""

from __future__ import annotations

from dataclasses import dataclass

from ..results import Result


@dataclass(frozen=True)
class OnlyIn(Result):
    """A tensor only one adapter (``only_in``: ``"a"`` or ``"b"``) changes."""

    tensor: str
    only_in: str


@dataclass(frozen=True)
class DeltaComparison(Result):
    """Two adapters' deltas on one tensor: Jaccard overlap of what they touch (``common`` elements shared),
    and on the common support their cosine and relative L2 distance (None where nothing is shared)."""

    tensor: str
    jaccard: float
    common: int
    cosine: float | None
    relative_l2: float | None
    equal: bool


@dataclass(frozen=True)
class AdapterDiff(Result):
    """``identical`` when both adapters are of one kind and every tensor's delta matches exactly."""

    identical: bool
    kinds: tuple[str, str]
    tensors: tuple[OnlyIn | DeltaComparison, ...]


@dataclass(frozen=True)
class ShapeOrDtypeDiffers(Result):
    """A tensor both checkpoints hold with different shapes or dtypes (so not compared further)."""

    tensor: str
    shape_or_dtype_differs: bool = True


@dataclass(frozen=True)
class ValueChange(Result):
    """One tensor whose bits differ: ``changed`` of ``of`` elements, in how many rows and columns (None for a
    tensor that is not 2-D), the largest absolute change, and the change's L2 norm relative to A's."""

    tensor: str
    changed: int
    of: int
    rows: int
    columns: int | None
    max_abs: float
    relative_l2: float


@dataclass(frozen=True)
class CheckpointDiff(Result):
    """``identical`` when both hold the same tensor names with the same bits."""

    identical: bool
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    tensors: tuple[ShapeOrDtypeDiffers | ValueChange, ...]
