"""What a merge or unmerge will do, decided and checked before any byte is written.

Both ways of writing (a new checkpoint, or patching in place) share this: the compatibility checks
(names, shapes and dtypes always; base fingerprints unless ``verify_base=False``), the ledger bookkeeping, and the
per-tensor math, which is exact for S2FT (FORMAT §4.3) and permutation-aware.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import (
    BaseMismatch,
    IntegrityError,
    NonFiniteError,
    S2RegError,
    ShapeError,
)
from ..format import Adapter, dtypes
from ..format.arrays import bits, unique
from ..format.digest import tensor_sha256
from ..format.s2ft import EXPERT_AXES, put, take
from ..kinds import kind_of
from ..parallel import on_every_core
from ..tensors import CheckpointSource, PermutedView, TensorSource
from ..tensors.reader import PERMUTATION_NAME
from .ledger import Ledger, adapter_identity
from .results import PlanSummary

if TYPE_CHECKING:
    from ..arch import ModelInfo
    from ..ops.permute import Permutation


def read_permutation(source: Any) -> tuple[Permutation, ModelInfo] | None:
    """The co-permutation ``source`` was written with, if any. Only a permuted checkpoint needs the model
    family's description (ops.permute), so no other merge loads it."""
    if not (source.directory / PERMUTATION_NAME).is_file():
        return None
    from ..ops.permute import read_permutation as read

    return read(source)


def to_original(name: str, tensor: np.ndarray, permutation: tuple[Permutation, ModelInfo] | None) -> np.ndarray:
    """A tensor of a co-permuted checkpoint in original coordinates (itself when not permuted)."""
    if permutation is None:
        return tensor
    from ..ops.permute import to_original as back

    return back(name, tensor, permutation)


def original_sha256(source: CheckpointSource, permutation: tuple[Permutation, ModelInfo] | None, name: str) -> str:
    """sha256 of a tensor in original coordinates, as it is now (streamed when unpermuted)."""
    if permutation is None:
        return source.sha256_of(name)
    return tensor_sha256(to_original(name, source.array(name), permutation))


def original_coordinates(source: CheckpointSource) -> TensorSource:
    """A checkpoint read in original coordinates, the ones adapter fingerprints are taken in.

    A checkpoint written by ``s2reg permute`` (spec/SURGERY.md §4) is permuted back tensor by
    tensor, so :meth:`Adapter.verify_base` accepts it for the adapters of its original.
    """
    found = read_permutation(source)
    if found is None:
        return source
    perm, info = found
    return PermutedView(source, perm.inverse().index_of(info))


class Run:
    """One execution of a :class:`Plan`, owned by the code writing it: the one thing learnt while computing,
    the tensors a merge without the base check changed in a way unmerge cannot undo (spec/SURGERY.md §2).
    Tensors are computed on several threads at once, so noting one is locked."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._inexact: set[str] = set()
        self._lock = threading.Lock()

    def note_inexact(self, name: str) -> None:
        with self._lock:
            self._inexact.add(name)

    @property
    def ledger_after(self) -> Ledger:
        """The plan's ledger after the operation, noting the tensors found inexact so far."""
        with self._lock:
            inexact = frozenset(self._inexact)
        return self.plan.ledger_after.with_inexact(inexact) if inexact else self.plan.ledger_after


@dataclass(frozen=True)
class Plan:
    """A checked merge (``subtract=False``) or unmerge of ``adapters`` into ``source``: decided before any
    byte is written, and never changed afterwards (what a run learns lives in its :class:`Run`)."""

    source: CheckpointSource
    adapters: tuple[Adapter, ...]
    identities: tuple[str, ...]  # adapter_identity of each adapter, computed once
    subtract: bool
    ledger_before: Ledger
    ledger_after: Ledger
    touched: Mapping[str, tuple[Any, ...]]  # tensor -> targets, in application order
    expect_sha: Mapping[str, str]  # tensor -> sha256 the result must have
    permutation: tuple[Permutation, ModelInfo] | None
    stacked: frozenset[str]  # tensors an earlier merge already changed
    unverified: frozenset[str]  # tensors merged without checking their fingerprint (--skip-base-check)

    def __post_init__(self) -> None:
        for name in ("touched", "expect_sha"):  # read-only views: a frozen plan whose mappings change is not one
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def _step(self, name: str, i: int, target: Any, current: np.ndarray, run: Run) -> np.ndarray:
        """One delta on the slice values ``current`` (its kind's region), with the checks of spec/SURGERY.md §2 rule 3.

        Stacked on another merged adapter, a step unmerge could not undo is refused. Forced onto values
        whose fingerprint nobody checked, it is done, and ``run`` notes that unmerge cannot restore the tensor.
        """
        stacked = not self.subtract and bool(i or name in self.stacked)
        kind = kind_of(target)
        shifted = kind.merged_region(target, current, name=name, subtract=self.subtract, check_reversible=stacked)
        if not self.subtract and not stacked and name in self.unverified and not kind.undoes(target, current, shifted):
            run.note_inexact(name)
        return shifted

    def transform(self, name: str, tensor: np.ndarray, run: Run) -> np.ndarray:
        """The tensor after the operation: exact, finite-checked, in the checkpoint's coordinates."""
        before = work = self._to_original(name, tensor)
        regions = [kind_of(t).region(t) for t in self.touched[name]]  # None: the merge rewrites the whole tensor
        for i, (target, region) in enumerate(zip(self.touched[name], regions, strict=True)):
            if region is None:
                work = kind_of(target).merged_region(target, work, subtract=self.subtract, name=name)
            else:
                work = work.copy()
                put(work, *region, self._step(name, i, target, take(work, *region), run))
        for region in regions:  # only where something changed: a slice's kind leaves the rest alone
            if region is None:
                _check_finite(name, work, before)
            else:
                _check_finite(name, take(work, *region), take(before, *region))
        expected = self.expect_sha.get(name)
        if expected is not None and tensor_sha256(work) != expected:
            raise IntegrityError(f"{name}: unmerge did not restore the recorded original bytes; refused, nothing was written")
        return self._from_original(name, work)

    def transform_slice(self, name: str, before: np.ndarray, support: tuple[str, np.ndarray], run: Run) -> np.ndarray:
        """Like :meth:`transform` on just the ``support`` slice (unpermuted S2FT only): reads only its bytes."""
        axis, union = support
        work = before
        for i, target in enumerate(self.touched[name]):
            region = kind_of(target).region(target)
            assert region is not None  # support() found a slice for every target
            where = np.searchsorted(union, region[1])  # union is sorted and holds every index
            work = work.copy()
            put(work, axis, where, self._step(name, i, target, take(work, axis, where), run))
        _check_finite(name, work, before)
        return work

    def support(self, name: str) -> tuple[str, np.ndarray] | None:
        """The slice the operation changes in the checkpoint's coordinates, or None for the whole tensor."""
        targets = self.touched[name]
        regions = [kind_of(t).region(t) for t in targets]
        slices = [r for r in regions if r is not None]
        if len(slices) != len(regions) or len({axis for axis, _ in slices}) != 1:
            return None
        axis = slices[0][0]
        if axis in EXPERT_AXES:  # byte patches are rows or columns: a stacked tensor is rewritten whole
            return None
        if self.permutation:
            perm, info = self.permutation
            slices = [r for t in targets if (r := kind_of(t).region(kind_of(t).permuted(name, t, perm, info))) is not None]
        return axis, unique(np.concatenate([indices.astype(np.int64) for _, indices in slices]))

    def _to_original(self, name: str, tensor: np.ndarray) -> np.ndarray:
        return to_original(name, tensor, self.permutation)

    def _from_original(self, name: str, tensor: np.ndarray) -> np.ndarray:
        if not self.permutation:
            return tensor
        from ..ops.permute import permute_tensor

        perm, info = self.permutation
        return permute_tensor(name, tensor, perm, info)



def _original_shas(source: CheckpointSource, permutation: tuple[Permutation, ModelInfo] | None,
                   names: Sequence[str]) -> dict[str, str]:
    """sha256 of each tensor in original coordinates, as it is now (streamed when unpermuted), hashed
    on every core at once: hashlib lets go of the GIL, and the base check is most of a merge's work."""
    return dict(zip(names, on_every_core(lambda n: original_sha256(source, permutation, n), names), strict=True))


# the exponent field of each float dtype: all ones is Inf or NaN, so finiteness is an integer test on the bits
# (ml_dtypes' bfloat16 has no fast isfinite or abs: numpy goes through float32 element by element there)
_EXPONENT_BITS = {"F16": 0x7C00, "BF16": 0x7F80, "F32": 0x7F80_0000, "F64": 0x7FF0_0000_0000_0000}


def _check_finite(name: str, after: np.ndarray, before: np.ndarray) -> None:
    """Refuse NaN/Inf in ``after`` where ``before`` was finite."""
    if after.size == 0:
        return
    exponent = _EXPONENT_BITS.get(dtypes.name_of(after.dtype))
    if exponent is not None:
        field = np.bitwise_and(bits(after), exponent)
        if not bool((field == exponent).any()):  # all finite: the one pass almost every tensor takes
            return
    if bool((~np.isfinite(after) & np.isfinite(before)).any()):
        raise NonFiniteError(f"{name}: the result would hold NaN/Inf; refused, nothing was written")


def _named(adapter: Adapter, identity: str) -> str:
    """An adapter as messages name it: by the manifest digest that inspect, ls and push show (the payload's,
    its ``identity``, for one never saved), then the base it was made for, so neither reads as the other."""
    digest = adapter.stored.digest if adapter.stored is not None else identity
    return f"adapter {digest[:16]} (made for base {adapter.base.name!r})"


def _check_shapes(source: CheckpointSource, adapter: Adapter) -> None:
    for name, target in adapter.targets.items():
        if name not in source:
            raise BaseMismatch(f"the checkpoint has no tensor {name!r} (adapter made for {adapter.base.name!r})")
        if tuple(source.shape(name)) != tuple(target.shape) or dtypes.name_of(source.dtype(name)) != dtypes.name_of(target.dtype):
            raise ShapeError(
                f"{name}: checkpoint has {list(source.shape(name))} {dtypes.name_of(source.dtype(name))}, adapter expects "
                f"{list(target.shape)} {dtypes.name_of(target.dtype)} (made for {adapter.base.name!r})"
            )


def plan_merge(source: CheckpointSource, adapters: Sequence[Adapter], *, verify_base: bool = True) -> Plan:
    """Check that ``adapters`` can be merged, in order, into ``source``; raise before any write."""
    if not adapters:
        raise S2RegError("name at least one adapter to merge")
    ledger = after = Ledger.read(source.directory)
    permutation = read_permutation(source)
    identities = [adapter_identity(a) for a in adapters]  # once each: it hashes the whole payload
    touched: dict[str, list[Any]] = {}
    unverified: set[str] = set()
    seen: set[str] = set()
    for adapter, identity in zip(adapters, identities, strict=True):
        if identity in seen or ledger.find(identity) is not None:
            raise S2RegError(f"{_named(adapter, identity)} is already merged into checkpoint {source.directory}; refused")
        seen.add(identity)
        _check_shapes(source, adapter)
        originals = {}
        for name in adapter.targets:
            known = ledger.original.get(name) or after.original.get(name)
            if known is not None:
                originals[name] = known
            elif not verify_base:
                unverified.add(name)  # no hashing at all; the merge checks whether it can be undone
        originals.update(_original_shas(source, permutation,
                                        [n for n in adapter.targets if n not in originals and n not in unverified]))
        for name in adapter.targets:
            if verify_base and originals[name] != adapter.base.fingerprints[name].sha256:
                raise BaseMismatch(
                    f"{name}: the checkpoint's tensor differs from the base this adapter was made for "
                    f"({adapter.base.name!r}); refused (--skip-base-check merges anyway)"
                )
        for name in adapter.targets:
            touched.setdefault(name, []).append(adapter.targets[name])
        after = after.with_merged(adapter, identity, originals)
    return Plan(source, tuple(adapters), tuple(identities), False, ledger, after,
                {n: tuple(t) for n, t in touched.items()}, {}, permutation, frozenset(ledger.touched()),
                frozenset(unverified))


def plan_unmerge(source: CheckpointSource, adapters: Sequence[Adapter], *, verify_base: bool = True) -> Plan:
    """Check that ``adapters`` can be taken out of ``source`` exactly; raise before any write.

    Adapters are taken out newest first. One that a later, still merged adapter overlaps is refused:
    taking it out first would not restore the original bits. ``verify_base=False`` also subtracts
    adapters the ledger does not record as merged.
    """
    if not adapters:
        raise S2RegError("name at least one adapter to unmerge")
    ledger = after = Ledger.read(source.directory)
    identities = [adapter_identity(a) for a in adapters]  # once each: it hashes the whole payload
    if len(set(identities)) != len(identities):
        raise S2RegError("the same adapter is named twice")
    missing = [(a, i) for a, i in zip(adapters, identities, strict=True) if ledger.find(i) is None]
    if missing and verify_base:
        raise BaseMismatch(
            f"{_named(*missing[0])} is not recorded as merged into checkpoint {source.directory}; refused "
            "(--skip-base-check subtracts it anyway)"
        )
    position = {i: -1 if (at := ledger.find(i)) is None else at for i in identities}
    order = sorted(zip(adapters, identities, strict=True), key=lambda pair: position[pair[1]], reverse=True)
    touched: dict[str, list[Any]] = {}
    for adapter, identity in order:
        _check_shapes(source, adapter)
        clash = after.later_overlap(identity)
        if clash is not None:
            raise S2RegError(
                f"{clash}: an adapter merged later overlaps this one; unmerge that one first (or both in one call)"
            )
        inexact = sorted(set(adapter.targets) & ledger.inexact)
        if inexact and verify_base:
            raise S2RegError(
                f"{inexact[0]}: an adapter was merged here without the base check onto values it was not made for, so "
                "unmerging cannot restore them bit for bit (spec/SURGERY.md §2); refused (--skip-base-check subtracts "
                "it anyway)"
            )
        after = after.without(identity)
        for name, target in adapter.targets.items():
            touched.setdefault(name, []).append(target)
    expect_sha = {}
    for name, targets in touched.items():
        untouched_after = name not in after.original
        exact = all(kind_of(t).exact for t in targets)
        if untouched_after and exact and name in ledger.original:
            expect_sha[name] = ledger.original[name]
    return Plan(source, tuple(a for a, _ in order), tuple(i for _, i in order), True, ledger, after,
                {n: tuple(t) for n, t in touched.items()}, expect_sha, read_permutation(source), frozenset(), frozenset())


def describe_plan(plan: Plan) -> PlanSummary:
    return PlanSummary(
        operation="unmerge" if plan.subtract else "merge",
        adapters=plan.identities,
        tensors=len(plan.touched),
        merged_now=tuple(e.digest for e in plan.ledger_after.merged),
        permuted=plan.permutation is not None,
    )
