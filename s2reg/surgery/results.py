"""What each surgery verb reports: merge and unmerge (into a new checkpoint or in place), recover,
permute and unpermute. Frozen results with one JSON form (:class:`s2reg.results.Result`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..results import Result, omitted_if_none

if TYPE_CHECKING:
    from ..ops.permute import Permutation


@dataclass(frozen=True)
class PlanSummary(Result):
    """A checked merge or unmerge: the adapters' identities (in application order), the tensors it touches,
    and the identities the checkpoint's ledger holds afterwards."""

    operation: str
    adapters: tuple[str, ...]
    tensors: int
    merged_now: tuple[str, ...]
    permuted: bool


@dataclass(frozen=True)
class RewriteResult(PlanSummary):
    """A merge or unmerge written to a new checkpoint at ``output``."""

    output: str
    tensors_patched: int
    bytes_patched: int
    seconds: float

    @property
    def written_to(self) -> str:
        return self.output


@dataclass(frozen=True)
class InPlaceResult(PlanSummary):
    """A merge or unmerge that patched the checkpoint ``in_place``; ``links_broken``: the shards copied in first."""

    in_place: str
    bytes_patched: int
    links_broken: tuple[str, ...]
    seconds: float

    @property
    def written_to(self) -> str:
        return self.in_place


@dataclass(frozen=True)
class RecoverResult(Result):
    """What ``recover`` did: ``nothing to recover``, ``cleaned`` (leftover files ``removed``), or ``rolled
    back``/``rolled forward`` the interrupted ``operation`` over its journal's ``tensors``."""

    checkpoint: str
    action: str
    removed: tuple[str, ...] | None = omitted_if_none()
    operation: str | None = omitted_if_none()
    tensors: int | None = omitted_if_none()


@dataclass(frozen=True)
class PermuteResult(Result):
    """A co-permuted checkpoint written to ``output`` (the model family's layout, the permutation recorded there)."""

    output: str
    family: str
    note: str | None
    layers_permuted: int
    tensors_changed: int
    permutation: Permutation


@dataclass(frozen=True)
class UnpermuteResult(Result):
    """A permuted checkpoint written back in original order to ``output``."""

    output: str
    layers_restored: int
    tensors_changed: int
