"""``extract``: recover a compact adapter from a base checkpoint and a fine-tuned one.

Both checkpoints are read one tensor at a time (never two whole models in memory). S2FT
extraction is exact: the adapter merged into BASE reproduces TUNED bit for bit. PISA extraction
keeps the largest rfft2 coefficients per block and reports the relative error it leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..arch import ROLES, detect, find_role
from ..errors import BaseMismatch, S2RegError, ShapeError
from ..format import PISAAdapter, S2FTAdapter
from ..format.pisa import grid_of, half_width, reconstruct
from ..format.s2ft import take
from .permute import LayerPermutation, Permutation, permute_tensor

Progress = Callable[[str], None]
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


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

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.numel


@dataclass
class ExtractReport:
    kind: str
    changes: list[TensorChange] = field(default_factory=list)
    unchanged: int = 0

    @property
    def unstructured(self) -> list[TensorChange]:
        return [c for c in self.changes if not c.structured]

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "unchanged": self.unchanged,
            "changes": [{**asdict(c), "changed_fraction": c.changed_fraction} for c in self.changes],
        }


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
        if tuple(base.shape(name)) != tuple(tuned.shape(name)) or base.dtype(name) != tuned.dtype(name):
            raise ShapeError(
                f"{name}: base is {list(base.shape(name))} {base.dtype(name)}, tuned is "
                f"{list(tuned.shape(name))} {tuned.dtype(name)}; extract needs checkpoints of the same shapes"
            )
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


def _head_dim(base) -> int | None:
    config = base.config() if hasattr(base, "config") else None
    try:
        return detect(config).dims.head_dim
    except (S2RegError, KeyError):
        return None


def _slice_of(mask: torch.Tensor, natural_axis: str | None) -> tuple[str, torch.Tensor]:
    """The axis and indices of the smallest row or column slice that covers every change."""
    if mask.dim() != 2:
        flat = mask.reshape(mask.shape[0], -1).any(1) if mask.dim() > 1 else mask
        return "rows", flat.nonzero().reshape(-1)
    rows, cols = mask.any(1).nonzero().reshape(-1), mask.any(0).nonzero().reshape(-1)
    row_cost, col_cost = rows.numel() * mask.shape[1], cols.numel() * mask.shape[0]
    if row_cost < col_cost or (row_cost == col_cost and natural_axis != "columns"):
        return "rows", rows
    return "columns", cols


def _whole_groups(indices: torch.Tensor, size: int) -> torch.Tensor:
    groups = torch.unique(indices // size)
    return (groups[:, None] * size + torch.arange(size)).reshape(-1)


def extract_s2ft(
    base,
    tuned,
    *,
    base_name: str,
    allow_dense: bool = False,
    max_fraction: float = 0.5,
    progress: Progress | None = None,
) -> tuple[S2FTAdapter, ExtractReport]:
    """An S2FT adapter that turns ``base`` into ``tuned`` exactly, and a report of what changed.

    A change is *structured* when it lies in a coupled projection (attention q/k/v/o, FFN
    up/gate/down) and its covering slice holds at most ``max_fraction`` of the tensor. Anything
    else raises :class:`ExtractRefused` unless ``allow_dense``, in which case it is stored as a
    (large) slice too. Attention slices are widened to whole heads so they read as heads.
    """
    report = ExtractReport("s2ft")
    head_dim = _head_dim(base)
    slices, group_sizes = {}, {}
    for name, b, t, mask in _changes(base, tuned, report, progress):
        changed = int(mask.sum())
        if not b.is_floating_point():
            raise S2RegError(f"{name}: a {b.dtype} tensor changed; only float tensors can hold deltas")
        found = find_role(name)
        natural = ROLES[found[1]] if found else None
        axis, indices = _slice_of(mask, natural[0] if natural else None)
        if natural and natural[1] != "channel" and axis == natural[0] and head_dim and b.shape[0 if axis == "rows" else 1] % head_dim == 0:
            indices = _whole_groups(indices, head_dim)
            group_sizes[name] = head_dim
        stored = indices.numel() * (b.numel() // b.shape[0 if axis == "rows" else 1])
        structured = found is not None and stored <= max_fraction * b.numel()
        report.changes.append(TensorChange(name, list(b.shape), changed, b.numel(), structured, axis, indices.numel(), stored))
        slices[name] = (axis, indices, take(t, axis, indices))
    _refuse_unstructured(report, allow_dense, "--allow-dense")
    if not slices:
        raise S2RegError("the checkpoints are identical: there is nothing to extract")
    adapter = S2FTAdapter.from_tuned(
        base, slices, base_name=base_name, group_sizes=group_sizes,
        params={"method": "extract", "max_fraction": max_fraction}, provenance={"source": "extract"},
    )
    return adapter, report


def _refuse_unstructured(report: ExtractReport, allowed: bool, flag: str) -> None:
    bad = report.unstructured
    if bad and not allowed:
        listed = ", ".join(f"{c.name} ({100 * c.changed_fraction:.1f}% changed)" for c in bad[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise ExtractRefused(
            f"{len(bad)} tensor(s) changed outside a few slices of coupled projections: {listed}{more}; "
            f"pass {flag} to store them anyway",
            report,
        )


def _keep_masks(block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per half-plane position: energy weight of one stored coefficient, and its value multiplier.

    Interior positions stand for a conjugate pair (weight 2). In the self-conjugate columns
    (v = 0 and the Nyquist column) positions u and -u are one pair: the canonical one
    (u <= bh/2) is stored with twice the value so that FORMAT §5.3's Hermitian part restores
    both; its mirror gets weight 0; the self-paired points (u = -u) have weight 1.
    """
    bh, bw = block
    hw = half_width(block)
    weight = torch.full((bh, hw), 2.0)
    multiplier = torch.ones(bh, hw)
    for v in [0] + ([bw // 2] if bw % 2 == 0 and bw > 1 else []):
        for u in range(bh):
            mirror = (-u) % bh
            if u == mirror:
                weight[u, v] = 1.0
            elif u < mirror:
                multiplier[u, v] = 2.0
            else:
                weight[u, v] = 0.0
    return weight.reshape(-1), multiplier.reshape(-1)


def pisa_top_k(delta: torch.Tensor, block: tuple[int, int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` coefficients per block (in Frobenius norm): ``(indices, complex values)``."""
    bh, bw = block
    gr, gc = grid_of(tuple(delta.shape), block)
    padded = torch.zeros(gr * bh, gc * bw, dtype=torch.float64)
    padded[: delta.shape[0], : delta.shape[1]] = delta.to(torch.float64)
    blocks = padded.reshape(gr, bh, gc, bw).permute(0, 2, 1, 3).reshape(gr * gc, bh, bw)
    spectrum = torch.fft.rfft2(blocks).reshape(gr * gc, -1)
    weight, multiplier = _keep_masks(block)
    available = int((weight > 0).sum())
    if not 1 <= k <= available:
        raise S2RegError(f"budget {k} is out of range: a {bh}x{bw} block has {available} independent coefficients")
    indices = (spectrum.abs() ** 2 * weight).topk(k, dim=1).indices
    values = spectrum.gather(1, indices) * multiplier[indices]
    return indices, values.to(torch.complex64)


def extract_pisa(
    base,
    tuned,
    *,
    base_name: str,
    budget: int,
    block: tuple[int, int] = (16, 16),
    allow_partial: bool = False,
    progress: Progress | None = None,
) -> tuple[PISAAdapter, ExtractReport]:
    """A PISA adapter keeping ``budget`` coefficients per block of every changed matrix.

    ``rel_error`` in the report is ``|delta - reconstruction| / |delta|`` per tensor (Frobenius).
    Changed tensors that are not matrices cannot be held and raise :class:`ExtractRefused`
    unless ``allow_partial``, which leaves them out.
    """
    report = ExtractReport("pisa")
    coefficients = {}
    for name, b, t, mask in _changes(base, tuned, report, progress):
        changed = int(mask.sum())
        change = TensorChange(name, list(b.shape), changed, b.numel(), structured=b.dim() == 2)
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
    _refuse_unstructured(report, allow_partial, "--allow-partial")
    if not coefficients:
        raise S2RegError("no matrix changed between the checkpoints: there is nothing to extract")
    adapter = PISAAdapter.from_coefficients(
        base, coefficients, base_name=base_name,
        params={"method": "extract", "budget": budget, "block": list(block)}, provenance={"source": "extract"},
    )
    return adapter, report



class _Unpermuted:
    """A checkpoint reader that hands out tensors with a co-permutation undone (for extraction)."""

    def __init__(self, source, permutation, info):
        self.source, self.permutation, self.info = source, permutation, info

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def dtype(self, name):
        return self.source.dtype(name)

    def config(self):
        return self.source.config()

    def get(self, name):
        return permute_tensor(name, self.source.get(name), self.permutation, self.info.arch, self.info.dims)


def _row_keys(tensor: torch.Tensor, block: int) -> list[bytes]:
    """The bytes of each group of ``block`` rows (a head's rows, or one channel's row)."""
    grouped = tensor.reshape(tensor.shape[0] // block, -1).contiguous()
    return [bytes(row.view(torch.uint8).numpy()) for row in grouped]


def _match(base: torch.Tensor, tuned: torch.Tensor, block: int) -> dict[int, int]:
    """Tuned position -> original unit, for units whose rows are byte-identical and unique in base."""
    index: dict[bytes, list[int]] = {}
    for unit, key in enumerate(_row_keys(base, block)):
        index.setdefault(key, []).append(unit)
    return {pos: index[key][0] for pos, key in enumerate(_row_keys(tuned, block)) if len(index.get(key, [])) == 1}


def _order(name: str, sources: list[dict[int, int]], total: int, layer: int) -> list[int]:
    """Combine matches from untouched coupled tensors into a full order (new position -> original)."""
    order: dict[int, int] = {}
    for found in sources:
        for pos, unit in found.items():
            order.setdefault(pos, unit)
    missing_pos = [p for p in range(total) if p not in order]
    missing_units = sorted(set(range(total)) - set(order.values()))
    if len(set(order.values())) != len(order) or len(missing_pos) > 1 or len(missing_pos) != len(missing_units):
        raise S2RegError(f"layer {layer}: cannot identify the {name} order from untouched rows (too many were trained)")
    order.update(zip(missing_pos, missing_units))
    return [order[p] for p in range(total)]


def detect_permutation(base, tuned) -> Permutation:
    """The co-permutation the official S2FT code applied when it saved ``tuned`` (identity layers omitted).

    Untouched coupled rows identify the order: query/key/value row blocks for heads (GQA-aware),
    gate/up rows for FFN channels, matched by their exact bytes.
    """
    info = detect(base.config())
    dims, arch = info.dims, info.arch
    layers = {}
    names = set(base.names())

    def matches(role: str, layer: int, block: int) -> dict[int, int]:
        name = arch.tensor(role, layer)
        return _match(base.get(name), tuned.get(name), block) if name in names else {}

    for layer in range(dims.layers):
        heads = _order("head", [matches("q", layer, dims.head_dim)], dims.heads, layer)
        kv = _order("key/value head", [matches("k", layer, dims.head_dim), matches("v", layer, dims.head_dim)],
                    dims.kv_heads, layer)
        channel_roles = [r for r in ("gate", "up") if arch.templates.get(r)]
        channels = _order("channel", [matches(r, layer, 1) for r in channel_roles], dims.intermediate, layer)
        perm = LayerPermutation(heads, kv, channels)
        perm.check(dims, layer)
        if not perm.is_identity():
            layers[layer] = perm
    return Permutation(layers)


def extract_s2ft_permuted(base, tuned, *, base_name: str, progress: Progress | None = None,
                          **kwargs) -> tuple[S2FTAdapter, ExtractReport, Permutation]:
    """Like :func:`extract_s2ft` for a TUNED checkpoint saved in a co-permuted layout (official S2FT).

    The permutation is detected, undone, and the adapter holds original coordinates: merged into
    BASE it gives a model with the same outputs as TUNED.
    """
    permutation = detect_permutation(base, tuned)
    info = detect(base.config())
    adapter, report = extract_s2ft(base, _Unpermuted(tuned, permutation.inverse(), info), base_name=base_name,
                                   progress=progress, **kwargs)
    adapter.params["detected_permutation"] = permutation.as_json()
    return adapter, report, permutation
