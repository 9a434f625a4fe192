"""``extract``: recover a compact adapter from a base checkpoint and a fine-tuned one.

Both checkpoints are read one tensor at a time (never two whole models in memory). S2FT
extraction is exact: the adapter merged into BASE reproduces TUNED bit for bit (after undoing a
detected co-permutation, the model's function). Which rows or columns make a head or channel is the
family description's business (``s2reg.arch``). PISA extraction keeps the largest rfft2 coefficients
per block (``format.pisa.pisa_top_k``) and reports the relative error it leaves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..arch import ArchError, ModelInfo, resolve_source
from ..errors import BaseMismatch, S2RegError, ShapeError, listing
from ..format import Adapter, PISAAdapter, S2FTAdapter, dtypes
from ..format.arrays import as_array
from ..format.pisa_fft import pisa_top_k, reconstruct
from ..format.s2ft import EXPERT_AXES, axis_dim, slice_shape, take, whole_groups
from ..tensors import PermutedView
from .detect_permutation import detect_permutation, relocated_units
from .permute import Permutation

Progress = Callable[[str], None]
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
NOISE_ULPS = 2          # a change of at most this many units in the last place is rounding noise
NOISE_REFUSE_RATIO = 10  # refuse an adapter this many times larger than its real (non-noise) changes


@dataclass
class TensorChange:
    """How one tensor differs between the checkpoints, and how the adapter stores it."""

    name: str
    shape: list[int]
    changed: int
    numel: int
    structured: bool
    axis: str | None = None
    count: int = 0
    stored: int = 0
    rel_error: float | None = None
    noise: int = 0            # stored rows/columns whose change is only rounding noise (<= NOISE_ULPS)
    needs_fraction: float | None = None  # the --max-fraction that would admit this coupled slice
    relocated: int = 0        # changed units whose tuned bytes equal another unit of the base

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.numel


@dataclass
class ExtractReport:
    kind: str
    changes: list[TensorChange] = field(default_factory=list)
    unchanged: int = 0
    family: str | None = None
    note: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def unstructured(self) -> list[TensorChange]:
        return [c for c in self.changes if not c.structured]

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "family": self.family,
            "note": self.note,
            "unchanged": self.unchanged,
            "warnings": self.warnings,
            "changes": [{**asdict(c), "changed_fraction": c.changed_fraction} for c in self.changes],
        }


@dataclass
class ExtractResult:
    """What an extraction made: the adapter, the per-tensor report, and the co-permutation undone (if any)."""

    adapter: Adapter
    report: ExtractReport
    permutation: Permutation | None = None


class ExtractRefused(S2RegError):
    """Changes that the requested adapter kind cannot hold compactly; ``report`` says where."""

    def __init__(self, message: str, report: ExtractReport):
        super().__init__(message)
        self.report = report


def _pairs(base, tuned, progress: Progress | None):
    names = set(base.names())
    other = set(tuned.names())
    if names != other:
        only_base, only_tuned = sorted(names - other)[:5], sorted(other - names)[:5]
        raise BaseMismatch(f"the checkpoints hold different tensors (only in base: {only_base}, only in tuned: {only_tuned})")
    for name in sorted(names):
        if tuple(base.shape(name)) != tuple(tuned.shape(name)):
            raise ShapeError(f"{name}: base is {list(base.shape(name))}, tuned is {list(tuned.shape(name))}; "
                             "extract needs checkpoints of the same shapes")
        if dtypes.name_of(base.dtype(name)) != dtypes.name_of(tuned.dtype(name)):
            raise ShapeError(f"the tuned checkpoint has a different dtype than the base ({name}: "
                             f"{dtypes.name_of(tuned.dtype(name))} vs {dtypes.name_of(base.dtype(name))}); save it in "
                             f"{dtypes.name_of(base.dtype(name))} before extracting")
        if progress:
            progress(name)
        yield name, base.get(name), tuned.get(name)


def _changed_mask(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    bits = _BITS.get(a.dtype)
    return a.view(bits) != b.view(bits) if bits else a != b


def _changes(base, tuned, report: ExtractReport, progress: Progress | None):
    """``(name, base tensor, tuned tensor, changed-bits mask)`` of the tensors that differ; counts the rest."""
    for name, b, t in _pairs(base, tuned, progress):
        mask = _changed_mask(b, t)
        if bool(mask.any()):
            yield name, b, t, mask
        else:
            report.unchanged += 1


def _noise_mask(b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Elements whose change is at most NOISE_ULPS units in the last place, sign kept (a rounding round trip)."""
    bits = _BITS[b.dtype]
    ib, it = b.view(bits).to(torch.int64), t.view(bits).to(torch.int64)
    return ((ib < 0) == (it < 0)) & ((ib - it).abs() <= NOISE_ULPS)


def _slices_along(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices along ``dim`` where ``mask`` has any True."""
    if mask.dim() == 1:
        return mask.nonzero().reshape(-1)
    return mask.movedim(dim, 0).reshape(mask.shape[dim], -1).any(1).nonzero().reshape(-1)


def _cheapest_slice(mask: torch.Tensor, prefer: str | None) -> tuple[str, torch.Tensor]:
    """The axis and indices of the smallest row or column slice that covers every change."""
    if mask.dim() != 2:
        return "rows", _slices_along(mask, 0)
    rows, cols = _slices_along(mask, 0), _slices_along(mask, 1)
    row_cost, col_cost = rows.numel() * mask.shape[1], cols.numel() * mask.shape[0]
    if row_cost < col_cost or (row_cost == col_cost and prefer != "columns"):
        return "rows", rows
    return "columns", cols


def _unit_share(info: ModelInfo, name: str, indices: torch.Tensor) -> tuple[int, int]:
    """``(selected, total)`` units of a coupled slice (of its worst expert when stacked); attention is counted
    in key/value groups (GQA)."""
    worst = (0, 1)
    for role, units in ((r, u) for touched in info.expert_units(name, indices).values() for r, u in touched.items()):
        total = info.unit_count(name, role)
        if role in ("q", "o"):
            units, total = sorted({u // info.dims.group for u in units}), info.dims.kv_heads
        if len(units) / total > worst[0] / worst[1]:
            worst = (len(units), total)
    return worst


def _allowed(selected: int, total: int, max_fraction: float) -> bool:
    # Units are whole: a share is admitted when it is within max_fraction rounded up to a whole unit.
    return selected <= max(1, math.ceil(max_fraction * total - 1e-9))


def _resolve(base, arch_file) -> tuple[ModelInfo | None, str | None]:
    try:
        return resolve_source(base, arch_file), None
    except ArchError as e:
        return None, str(e)


def _analyse(name: str, b: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, info: ModelInfo | None,
             max_fraction: float) -> tuple[TensorChange, str, torch.Tensor, int | None]:
    """The slice that stores a change, and whether it is a selection of heads or channels."""
    c = info.coupled(name) if info else None
    group = None
    if info is not None and c is not None and c.stored_dim < mask.dim():
        indices = torch.from_numpy(info.whole_units(name, _changed_along(mask, c.axis)))
        selected, total = _unit_share(info, name, indices)
        axis, fits = c.axis, _allowed(selected, total, max_fraction)
        cheaper_axis, cheaper = _cheapest_slice(mask, c.axis)
        if not fits and cheaper.numel() * _slice_size(b, cheaper_axis) <= max_fraction * b.numel():
            axis, indices, fits = cheaper_axis, cheaper, True  # a few rows across units: a plain slice
        elif set(c.roles) <= {"q", "k", "v", "o"} and not c.follower and _aligned(info, name, indices):
            group = info.dims.head_dim
        change = TensorChange(name, list(b.shape), int(mask.sum()), b.numel(), fits, axis, indices.numel(),
                              indices.numel() * _slice_size(b, axis))
        if not fits:
            change.needs_fraction = math.ceil(100 * selected / total) / 100
    else:
        axis, indices = _cheapest_slice(mask, None)
        change = TensorChange(name, list(b.shape), int(mask.sum()), b.numel(), False, axis, indices.numel(),
                              indices.numel() * _slice_size(b, axis))
    if b.dtype in _BITS:
        real = mask & ~_noise_mask(b, t)
        if b.dim() > axis_dim(axis):  # slices that changed, but only by noise
            change.noise = int(_changed_along(mask, axis).numel() - _changed_along(real, axis).numel())
    return change, axis, indices, group


def _slice_size(tensor: torch.Tensor, axis: str) -> int:
    """Elements in one row (or column; of one expert for an expert axis) of ``tensor``."""
    return math.prod(slice_shape(tuple(tensor.shape), axis, 1))


def _changed_along(mask: torch.Tensor, axis: str) -> torch.Tensor:
    """The indices of ``axis`` (FORMAT §4.1, expert axes included) whose slice holds any True of ``mask``."""
    if axis not in EXPERT_AXES:
        return _slices_along(mask, axis_dim(axis))
    other = tuple(range(2, mask.dim())) if axis == "expert_rows" else (1,)  # what one index's slice spans
    per_expert = mask.any(dim=other) if other else mask  # [experts, n]: index e * n + k
    return per_expert.reshape(-1).nonzero().reshape(-1)


def _aligned(info: ModelInfo, name: str, indices: torch.Tensor) -> bool:
    """Whether whole-head slices are whole groups of head_dim in the stored order (FORMAT §4.1 group_size)."""
    return bool(np.array_equal(whole_groups(indices.numpy(), info.dims.head_dim), indices.numpy()))


def _refusal(report: ExtractReport, flag: str, why: str | None) -> ExtractRefused:
    bad = report.unstructured
    listed = listing((f"{c.name} ({100 * c.changed_fraction:.1f}% changed)" for c in bad), shown=4)
    permuted = [w for w in report.warnings if "--detect-permutation" in w]
    wide = [c.needs_fraction for c in bad if c.needs_fraction is not None]
    fixes = permuted[:1]  # a co-permuted save is the cause: widening the slices would only store it densely
    if not permuted and wide:
        fixes.append(f"--max-fraction {max(wide):.2f} admits the head/channel selections")
    if not permuted and any(c.needs_fraction is None for c in bad):
        fixes.append(f"{flag} stores the rest anyway" + (f" (no family description: {why})" if why else ""))
    return ExtractRefused(f"{len(bad)} tensor(s) changed outside a few slices of coupled projections: {listed}; "
                          f"{' and '.join(fixes)}", report)


def _permutation_hint(base, tuned, info: ModelInfo, report: ExtractReport) -> None:
    """Say so when changed units of TUNED are units of BASE at other positions (a co-permuted save)."""
    moved = 0
    for change in report.changes:
        c = info.coupled(change.name)
        if c is None or c.follower or c.spec.side != "out":
            continue
        change.relocated = relocated_units(base.get(change.name), tuned.get(change.name), info, change.name)
        moved += change.relocated
    if moved:
        report.warnings.append(f"the changes look like a co-permuted checkpoint ({moved} changed units of q/k/v/up/gate "
                               "equal other units of the base); pass --detect-permutation")


def extract_s2ft(base, tuned, *, base_name: str, allow_dense: bool = False, max_fraction: float = 0.5,
                 allow_noise: bool = False, detect: bool = False, arch_file=None,
                 progress: Progress | None = None) -> ExtractResult:
    """An S2FT adapter that turns ``base`` into ``tuned`` exactly, and a report of what changed.

    A change is *structured* when it lies in a tensor that holds heads or channels and its whole-unit
    slice covers at most ``max_fraction`` of the units (attention counted in key/value groups, rounded
    up to a whole unit). Anything else raises :class:`ExtractRefused` unless ``allow_dense``. With
    ``detect``, TUNED was saved co-permuted (official S2FT code): the order is found and undone, and
    the adapter holds original coordinates.
    """
    info, why = _resolve(base, arch_file)
    report = ExtractReport("s2ft", family=info.family.name if info else None, note=info.note if info else None)
    permutation = None
    source = tuned
    if detect:
        if info is None:
            raise S2RegError(f"--detect-permutation needs the model's family: {why}")
        permutation = detect_permutation(base, tuned, info)
        source = PermutedView(tuned, permutation.inverse().index_of(info))
    slices, group_sizes = {}, {}
    for name, b, t, mask in _changes(base, source, report, progress):
        if not b.is_floating_point():
            raise S2RegError(f"{name}: a {b.dtype} tensor changed; only float tensors can hold deltas")
        change, axis, indices, group = _analyse(name, b, t, mask, info, max_fraction)
        report.changes.append(change)
        slices[name] = (axis, indices, take(as_array(t), axis, as_array(indices)))
        if group:
            group_sizes[name] = group
    if not slices:
        raise S2RegError("the checkpoints are identical: there is nothing to extract")
    if info is not None and not detect:
        _permutation_hint(base, tuned, info, report)
    _noise_warnings(report, allow_noise)
    if report.unstructured and not allow_dense:
        raise _refusal(report, "--allow-dense", why)
    params: dict[str, Any] = {"method": "extract", "max_fraction": max_fraction}
    if permutation is not None:
        params["detected_permutation"] = permutation.as_json()
    adapter = S2FTAdapter.from_tuned(base, slices, base_name=base_name, group_sizes=group_sizes, params=params,
                                     provenance={"source": "extract"})
    return ExtractResult(adapter, report, permutation)


def _noise_warnings(report: ExtractReport, allowed: bool) -> None:
    noisy = [c for c in report.changes if c.noise]
    if not noisy:
        return
    slices = sum(c.noise for c in noisy)
    stored = sum(c.stored for c in report.changes)
    real = sum(c.stored * (c.count - c.noise) // max(1, c.count) for c in report.changes)
    ratio = stored / max(1, real)
    message = (f"{slices} rows/columns in {len(noisy)} tensor(s) changed only by rounding noise (<= {NOISE_ULPS} ulp; "
               f"e.g. {noisy[0].name}: {noisy[0].noise}); they make the adapter {ratio:.1f}x the size of the real changes")
    report.warnings.append(message)
    if ratio >= NOISE_REFUSE_RATIO and not allowed:
        raise ExtractRefused(f"{message}: save TUNED in the base's dtype from the training run, or pass --allow-noise "
                             "to store the noise too (exact)", report)


def extract_pisa(base, tuned, *, base_name: str, budget: int, block: tuple[int, int] = (16, 16),
                 allow_partial: bool = False, progress: Progress | None = None) -> ExtractResult:
    """A PISA adapter keeping ``budget`` coefficients per block of every changed matrix.

    ``rel_error`` in the report is ``|delta - reconstruction| / |delta|`` per tensor (Frobenius).
    Changed tensors that are not matrices cannot be held and raise :class:`ExtractRefused`
    unless ``allow_partial``, which leaves them out.
    """
    report = ExtractReport("pisa")
    coefficients = {}
    for name, b, t, mask in _changes(base, tuned, report, progress):
        change = TensorChange(name, list(b.shape), int(mask.sum()), b.numel(), structured=b.dim() == 2)
        report.changes.append(change)
        if b.dim() != 2:
            continue
        delta = t.to(torch.float64) - b.to(torch.float64)
        indices, values = pisa_top_k(delta, block, budget)
        rebuilt = reconstruct(tuple(b.shape), block, indices, values, 1.0).to(torch.float64)
        norm = float(delta.norm())
        change.rel_error = float((delta - rebuilt).norm()) / norm if norm else 0.0
        change.stored = values.numel() * 2
        change.count = budget
        coefficients[name] = (block, indices, values)
    if report.unstructured and not allow_partial:
        bad = report.unstructured
        raise ExtractRefused(f"{len(bad)} changed tensor(s) are not matrices ({bad[0].name}, ...); pass --allow-partial "
                             "to leave them out", report)
    if not coefficients:
        raise S2RegError("no matrix changed between the checkpoints: there is nothing to extract")
    adapter = PISAAdapter.from_coefficients(
        base, coefficients, base_name=base_name,
        params={"method": "extract", "budget": budget, "block": list(block)}, provenance={"source": "extract"},
    )
    return ExtractResult(adapter, report)
