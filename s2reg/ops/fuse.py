"""``fuse``: combine task adapters into one (spec/FUSE.md).

The merge methods are small pure functions over a stack of task deltas ``[tasks, ...]`` in a
registry, following PEFT's ``merge_utils`` and the TIES (Yadav et al., 2023) and DARE (Yu et al.,
2024) papers. For S2FT, each tensor's fused support is the union of the inputs' index sets: where
only one adapter covers an index its weighted delta is kept as it is (with weight 1, an exact
concatenation: the paper's best fusion), and where several overlap the method decides. For PISA
the union is per block of frequency positions, and the method applies per coefficient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import BaseMismatch, FormatError, S2RegError, listing
from ..format import dtypes
from ..format.arrays import as_array, to_torch
from ..format.s2ft import Restore
from ..kinds import kind_of
from .fuse_results import FusedTensor, FuseResult
from ..format import (
    Adapter,
    BaseModel,
    PISAAdapter,
    PISATarget,
    S2FTAdapter,
    S2FTTarget,
)


def magnitude_mask(tasks: torch.Tensor, density: float) -> torch.Tensor:
    """Per task, keep the ``density`` share of entries with the largest magnitude (TIES trim)."""
    flat = tasks.reshape(tasks.shape[0], -1)
    k = int(density * flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        mask.scatter_(1, flat.abs().topk(k, dim=1).indices, True)
    return mask.reshape(tasks.shape)


def random_mask(tasks: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE drop: keep each entry with probability ``density``."""
    return torch.rand(tasks.shape, generator=generator, dtype=torch.float64) < density


SIGN_RULES = ("total", "frequency")  # spec/FUSE.md §1, TIES' sign election


def elect_sign(tasks: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES sign election: per entry, the sign of the summed mass (``total``) or of the vote count (``frequency``)."""
    signs = tasks.sign()
    votes = {"total": tasks, "frequency": signs}[method].sum(0)
    majority = torch.where(votes >= 0, 1.0, -1.0).to(tasks.dtype)
    return signs == majority


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: the mean over the tasks that agree with the elected sign."""
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


@dataclass(frozen=True)
class FuseOptions:
    weights: torch.Tensor  # [tasks], float64
    density: float = 1.0
    seed: int = 0
    majority_sign: str = "total"


def _linear(tasks, o: FuseOptions, g):
    return (tasks * o.weights).sum(0)


def _magnitude_prune(tasks, o: FuseOptions, g):
    return (tasks * magnitude_mask(tasks, o.density) * o.weights).sum(0)


def _ties(tasks, o: FuseOptions, g):
    trimmed = tasks * magnitude_mask(tasks, o.density)
    return disjoint_mean(trimmed * o.weights, elect_sign(trimmed, o.majority_sign))


def _dare_linear(tasks, o: FuseOptions, g):
    dropped = tasks * random_mask(tasks, o.density, g) / o.density
    return (dropped * o.weights).sum(0)


def _dare_ties(tasks, o: FuseOptions, g):
    dropped = tasks * random_mask(tasks, o.density, g) / o.density
    return disjoint_mean(dropped * o.weights, elect_sign(dropped, o.majority_sign))


METHODS: dict[str, Callable[[torch.Tensor, FuseOptions, torch.Generator], torch.Tensor]] = {
    "linear": _linear,
    "ties": _ties,
    "dare_linear": _dare_linear,
    "dare_ties": _dare_ties,
    "magnitude_prune": _magnitude_prune,
}


def _weights_like(weights: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    return weights.reshape(-1, *([1] * (tasks.dim() - 1)))


def combine(tasks: torch.Tensor, method: str, options: FuseOptions, generator: torch.Generator) -> torch.Tensor:
    """Fuse a ``[tasks, ...]`` stack of float64 deltas with ``method``."""
    o = FuseOptions(_weights_like(options.weights, tasks), options.density, options.seed, options.majority_sign)
    return METHODS[method](tasks, o, generator)


def _fuse_on_union(stack: torch.Tensor, cover: torch.Tensor, dim: int, method: str, options: FuseOptions,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse task deltas laid out on a union of units (along ``dim`` of each delta).

    ``cover[i, u]`` says whether task ``i`` has unit ``u``. A unit one task covers keeps its weighted
    delta (an exact copy at weight 1); units several tasks cover go through ``method``. Returns the
    fused deltas and the overlap mask.
    """
    overlap = cover.sum(0) > 1
    fused = (stack * _weights_like(options.weights, stack)).sum(0)
    if bool(overlap.any()):
        region = overlap.nonzero().reshape(-1)
        fused.index_copy_(dim, region, combine(stack.index_select(dim + 1, region), method, options, generator))
    return fused, overlap


def _connected(adapters: Sequence[Adapter]) -> bool:
    """Whether every input shares a base tensor with another one, transitively (one chain of evidence)."""
    names, left = set(adapters[0].base.fingerprints), list(adapters[1:])
    while joined := [a for a in left if names & a.base.fingerprints.keys()]:
        for a in joined:
            names |= a.base.fingerprints.keys()
        left = [a for a in left if all(a is not j for j in joined)]
    return not left


def _check_one_base(adapters: Sequence[Adapter], base) -> None:
    """Refuse inputs made for different base models (spec/FUSE.md): their fingerprints must agree on
    every shared tensor, and inputs that share none with the others must be verified against ``base``."""
    seen: dict[str, Any] = {}
    for a in adapters:
        for name, fp in a.base.fingerprints.items():
            if seen.setdefault(name, fp) != fp:
                raise BaseMismatch(f"{name}: the adapters were made for different base models; refused")
    if base is not None:
        for a in adapters:
            a.verify_base(base)
        return
    if not _connected(adapters):
        named = sorted({a.base.name for a in adapters})
        raise BaseMismatch(f"nothing shows these adapters share a base model (they touch no common tensor; made for "
                           f"{listing(map(repr, named))}); refused (--base CKPT checks them all against one checkpoint)")


def _check_inputs(adapters: Sequence[Adapter], weights: Sequence[float] | None, method: str, density: float,
                  majority_sign: str, base) -> torch.Tensor:
    if len(adapters) < 2:
        raise S2RegError("fuse needs at least two adapters")
    if method not in METHODS:
        raise S2RegError(f"unknown fuse method {method!r} (choose from {', '.join(METHODS)})")
    if majority_sign not in SIGN_RULES:
        raise S2RegError(f"unknown sign rule {str(majority_sign)[:40]!r} (choose from {', '.join(SIGN_RULES)}; spec/FUSE.md)")
    kinds = {a.kind for a in adapters}
    if len(kinds) > 1:
        raise FormatError(f"cannot fuse adapters of different kinds ({', '.join(sorted(kinds))}); fuse each kind separately")
    _check_one_base(adapters, base)
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise S2RegError(f"{len(weights)} weights for {len(adapters)} adapters")
    if not 0 < density <= 1:
        raise S2RegError(f"density must be in (0, 1], got {density}")
    return torch.tensor([float(w) for w in weights], dtype=torch.float64)


def fuse(adapters: Sequence[Adapter], *, method: str = "linear", weights: Sequence[float] | None = None,
         density: float = 1.0, seed: int = 0, majority_sign: str = "total", base=None) -> FuseResult:
    """Fuse ``adapters`` (same kind, same base): the fused adapter and a per-tensor overlap report.

    S2FT outputs must be exact differences (FORMAT §4.3): when fused values are not simply copied
    from one input (overlaps, or weights other than 1), ``base`` (a checkpoint reader) is required.
    """
    w = _check_inputs(adapters, weights, method, density, majority_sign, base)
    options = FuseOptions(w, density, seed, majority_sign)
    generator = torch.Generator().manual_seed(seed)
    params = {"method": "fuse", "fuse_method": method, "weights": w.tolist(), "density": density, "seed": seed,
              "majority_sign": majority_sign, "inputs": [a.stored.digest if a.stored else None for a in adapters]}
    names = sorted({n for a in adapters for n in a.targets})
    fingerprints = {n: next(a.base.fingerprints[n] for a in adapters if n in a.base.fingerprints) for n in names}
    return kind_of(adapters[0]).fuse(adapters, names, method, options, generator, params, fingerprints, base)


def fuse_s2ft(adapters, names, method, options, generator, params, fingerprints, base):
    slices, report, group_sizes, exact = {}, [], {}, True
    for name in names:
        present = [(i, a.targets[name]) for i, a in enumerate(adapters) if name in a.targets]
        axes = {t.axis for _, t in present}
        if len(axes) > 1:
            raise S2RegError(f"{name}: the adapters select different axes (rows and columns); cannot fuse as S2FT")
        axis = axes.pop()
        dim = 0 if axis == "rows" else 1
        union = torch.unique(torch.cat([to_torch(t.indices).long() for _, t in present]))
        position = {int(v): p for p, v in enumerate(union.tolist())}
        shape = list(present[0][1].shape)
        shape[dim] = union.numel()
        stack = torch.zeros((len(adapters), *shape), dtype=torch.float64)
        cover = torch.zeros((len(adapters), union.numel()), dtype=torch.bool)
        for i, t in present:
            where = torch.tensor([position[int(v)] for v in t.indices], dtype=torch.long)
            stack[i].index_copy_(dim, where, to_torch(t.delta).double())
            cover[i, where] = True
        fused, overlap = _fuse_on_union(stack, cover, dim, method, options, generator)
        copied = not bool(overlap.any()) and all(float(options.weights[i]) == 1.0 for i, _ in present)
        exact = exact and copied
        slices[name] = (axis, union, fused)
        sizes = {t.group_size for _, t in present}
        if len(sizes) == 1 and None not in sizes:
            group_sizes[name] = sizes.pop()
        report.append(FusedTensor(tensor=name, inputs=len(present), indices=union.numel(),
                                  overlapping=int(overlap.sum()), overlap_fraction=float(overlap.double().mean())))
    if exact:
        targets = {}
        for name, (axis, union, fused) in slices.items():
            dtype = torch.float32  # the widest input delta dtype keeps every copied value exact
            for a in adapters:
                if name in a.targets:
                    dtype = torch.promote_types(dtype, dtypes.to_torch(dtypes.name_of(a.targets[name].delta.dtype)))
            shape = next(a.targets[name].shape for a in adapters if name in a.targets)
            tdtype = next(a.targets[name].dtype for a in adapters if name in a.targets)
            targets[name] = _copied_target(adapters, name, S2FTTarget(shape, tdtype, axis, union, fused.to(dtype),
                                                                      group_sizes.get(name)))
        adapter = S2FTAdapter(targets, BaseModel(adapters[0].base.name, adapters[0].base.revision, fingerprints),
                              params=params, provenance={"source": "fuse"})
        return FuseResult(adapter, tuple(report))
    if base is None:
        raise S2RegError("the fused S2FT deltas overlap or are weighted, so they must be snapped to exact differences "
                         "against the base checkpoint: pass --base CKPT")
    adapter = S2FTAdapter.from_slices(base, slices, base_name=adapters[0].base.name,
                                      base_revision=adapters[0].base.revision, group_sizes=group_sizes, params=params,
                                      provenance={"source": "fuse"})
    return FuseResult(adapter, tuple(report))


def _copied_target(adapters, name: str, fused: S2FTTarget) -> S2FTTarget:
    """``fused`` with the restore lists (FORMAT §4.3) of the inputs it copies, moved onto its union of indices."""
    position = {int(v): p for p, v in enumerate(fused.indices.tolist())}
    lists = []
    for a in adapters:
        t = a.targets.get(name)
        if t is not None and t.restore is not None:
            positions = np.array([position[int(v)] for v in t.indices], dtype=np.int64)
            lists.append(t.reordered(fused.indices, positions, fused.delta).restore)
    if not lists:
        return fused
    index = np.concatenate([r.index for r in lists])
    order = np.argsort(index, kind="stable")
    fused.restore = Restore(index[order], np.concatenate([r.base for r in lists])[order],
                            np.concatenate([r.tuned for r in lists])[order])
    return fused


def fuse_pisa(adapters, names, method, options, generator, params, fingerprints):
    coefficients, report = {}, []
    for name in names:
        present = [(i, a.targets[name]) for i, a in enumerate(adapters) if name in a.targets]
        blocks = {t.block for _, t in present}
        if len(blocks) > 1:
            raise S2RegError(f"{name}: the adapters use different block shapes {sorted(blocks)}; cannot fuse")
        block = blocks.pop()
        scale = present[0][1].scale
        grid_blocks = present[0][1].indices.shape[0]
        stored = {i: (to_torch(t.indices).long(), to_torch(t.coefficients.astype(np.float64))) for i, t in present}
        positions = block[0] * (block[1] // 2 + 1)
        rows_idx, rows_val, overlapping, kmax = [], [], 0, 0
        per_block = []
        for b in range(grid_blocks):
            union = torch.unique(torch.cat([stored[i][0][b] for i, _ in present]))
            where = {int(v): p for p, v in enumerate(union.tolist())}
            stack = torch.zeros((len(adapters), union.numel(), 2), dtype=torch.float64)
            cover = torch.zeros((len(adapters), union.numel()), dtype=torch.bool)
            for i, t in present:
                p = torch.tensor([where[int(v)] for v in t.indices[b]], dtype=torch.long)
                stack[i, p] = stored[i][1][b] * (t.scale / scale)  # one common scale
                cover[i, p] = True
            fused, overlap = _fuse_on_union(stack, cover, 0, method, options, generator)
            overlapping += int(overlap.sum())
            per_block.append((union, fused))
            kmax = max(kmax, union.numel())
        for union, fused in per_block:  # equal k per block (FORMAT §5.2): pad with zero coefficients
            free = [v for v in range(positions) if v not in set(union.tolist())][: kmax - union.numel()]
            rows_idx.append(torch.cat([union, torch.tensor(free, dtype=torch.long)]))
            rows_val.append(torch.cat([fused, torch.zeros(len(free), 2, dtype=torch.float64)]))
        idx, val = torch.stack(rows_idx), torch.stack(rows_val)
        order = idx.argsort(dim=1)
        first = present[0][1]
        coefficients[name] = PISATarget(first.shape, first.dtype, block, idx.gather(1, order),
                                        as_array(val.gather(1, order[..., None].expand(-1, -1, 2))).astype(first.coefficients.dtype),
                                        scale)
        report.append(FusedTensor(tensor=name, inputs=len(present), coefficients_per_block=kmax,
                                  overlapping=overlapping, overlap_fraction=overlapping / max(1, grid_blocks * kmax)))
    adapter = PISAAdapter(coefficients, BaseModel(adapters[0].base.name, adapters[0].base.revision, fingerprints),
                          params=params, provenance={"source": "fuse"})
    return FuseResult(adapter, tuple(report))
