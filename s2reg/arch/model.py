"""A checkpoint seen through its family description: the ONE head/channel -> stored-index expansion.

Every verb that understands heads and channels (train, export, permute, extract, merge into permuted
checkpoints, inspect, demo) asks :class:`ModelInfo` which stored rows or columns a unit owns; nothing
else in s2reg computes ``head * head_dim + ...``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from ..format.arrays import unique
from .dims import Dims
from .schema import CHANNEL_ROLES, FORMAT_HELP, HEAD_ROLES, ArchError, Family, Segment, TensorSpec


class LayerOrder(Protocol):
    """What :meth:`ModelInfo.permute_index` needs of a layer's permutation (``ops.permute.LayerPermutation``)."""

    def order_for(self, role: str, expert: str | None) -> Sequence[int] | None: ...


@dataclass(frozen=True)
class Coupling:
    """How one checkpoint tensor holds heads or channels.

    ``axis`` is the FORMAT §4 axis ("rows"/"columns") of the STORED tensor on which a unit is a slice
    (a transposed GPT-2 ``c_attn`` holds heads in its columns); ``dim`` is the same as 0/1.
    ``part`` is "weight", "bias" or "parameter" (a bare parameter such as gpt-oss ``sinks``);
    ``follower`` tensors move with heads under a permutation but are never trained. A ``stacked`` tensor
    holds every expert along dimension 0 (``expert`` is None): ``dim`` is then the dimension inside one
    expert, and ``axis`` an expert axis (FORMAT §4.5).
    """

    name: str
    layer: int
    expert: str | None
    roles: tuple[str, ...]
    part: str
    dim: int
    transposed: bool
    follower: bool
    spec: TensorSpec

    @property
    def stacked(self) -> bool:
        return self.spec.stacked

    @property
    def axis(self) -> str:
        return (("expert_rows", "expert_columns") if self.stacked else ("rows", "columns"))[self.dim]

    @property
    def stored_dim(self) -> int:
        """The dimension of the stored tensor along which units lie (inside each expert when stacked)."""
        return self.dim + self.stacked

    @property
    def role(self) -> str:
        return self.roles[0]


def _pattern(family: Family, spec: TensorSpec) -> re.Pattern[str]:
    layer = re.escape(family.layers).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
    key = re.escape(spec.key).replace(re.escape("{expert}"), r"(?P<expert>\d+)")
    part = "" if spec.parameter else r"\.(?P<part>weight|bias)"
    return re.compile(rf"(?P<prefix>(?:[^.]+\.)*?){layer}\.{key}{part}")


@lru_cache(maxsize=None)
def _patterns(family: Family) -> tuple[tuple[TensorSpec, re.Pattern[str]], ...]:
    return tuple((spec, _pattern(family, spec)) for spec in family.tensors)


def match_name(family: Family, name: str) -> tuple[TensorSpec, re.Match[str]] | None:
    """The tensor entry of ``family`` that ``name`` is an instance of (any prefix), with the match."""
    for spec, pattern in _patterns(family):
        m = pattern.fullmatch(name)
        if m:
            return spec, m
    return None


@dataclass(frozen=True)
class _Layout:
    """Per role of a stored axis: a [units, width] table of stored indices."""

    tables: dict[str, np.ndarray]
    length: int


def _layout(segment: Segment, length: int, dims: Dims, follower: bool, where: str) -> _Layout:
    heads = {"q": dims.heads, "o": dims.heads, "k": dims.kv_heads, "v": dims.kv_heads}
    head_parts = [r for r in segment.parts if r in HEAD_ROLES]
    channel_parts = [r for r in segment.parts if r in CHANNEL_ROLES]
    counts, widths = {}, {}
    for role in head_parts:
        counts[role] = heads[role]
        widths[role] = dims.head_dim
    if len(segment.parts) == 1 and head_parts and follower and length == heads[head_parts[0]]:
        widths[head_parts[0]] = 1  # one value per head (gpt-oss sinks, a [heads, head_dim] norm)
    rest = length - sum(counts[r] * widths[r] for r in head_parts)
    if channel_parts:
        if rest <= 0 or rest % len(channel_parts):
            raise ArchError(f"{where}: length {length} does not split into {'|'.join(segment.parts)} ({FORMAT_HELP})")
        for role in channel_parts:
            counts[role], widths[role] = rest // len(channel_parts), 1
    elif rest:
        expected = sum(counts[r] * widths[r] for r in head_parts)
        raise ArchError(f"{where}: length {length}, but {'|'.join(segment.parts)} of {dims.heads} heads / "
                        f"{dims.kv_heads} kv heads x {dims.head_dim} needs {expected} ({FORMAT_HELP})")
    tables = {}
    if segment.layout == "concat":
        offset = 0
        for role in segment.parts:
            n, w = counts[role], widths[role]
            tables[role] = offset + np.arange(n * w, dtype=np.int64).reshape(n, w)
            offset += n * w
    else:
        groups = dims.kv_heads if segment.groups == "kv_heads" else counts[channel_parts[0]] if channel_parts else 0
        if not groups or any(counts[r] % groups for r in segment.parts):
            raise ArchError(f"{where}: {'|'.join(segment.parts)} does not split into {groups} groups ({FORMAT_HELP})")
        per = {r: counts[r] // groups for r in segment.parts}
        block = sum(per[r] * widths[r] for r in segment.parts)
        offset = 0
        for role in segment.parts:
            n, w = counts[role], widths[role]
            unit = np.arange(n, dtype=np.int64)
            start = (unit // per[role]) * block + offset + (unit % per[role]) * w
            tables[role] = start[:, None] + np.arange(w, dtype=np.int64)
            offset += per[role] * w
    return _Layout(tables, length)


def _int64(values: Iterable[int] | np.ndarray) -> np.ndarray:
    """Indices (a sequence, a range, an array, a torch tensor) as a flat int64 array."""
    if not hasattr(values, "__array__") and not isinstance(values, (list, tuple)):
        values = list(values)
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _expected_length(spec: TensorSpec, dims: Dims) -> int:
    """The axis length a description implies when the checkpoint's shapes are not at hand."""
    sizes = {"q": dims.heads * dims.head_dim, "o": dims.heads * dims.head_dim, "k": dims.kv_heads * dims.head_dim,
             "v": dims.kv_heads * dims.head_dim, "up": dims.intermediate, "gate": dims.intermediate,
             "down": dims.intermediate}
    return sum(sizes[r] for r in spec.segment.parts)


def _expert_order(expert: str | None) -> tuple[int, int, str]:
    """The dense FFN first, then numbered experts by number, then named ones (``shared``)."""
    if expert is None:
        return (0, 0, "")
    return (1, int(expert), "") if expert.isdigit() else (2, 0, expert)


@dataclass
class ModelInfo:
    """A family description applied to one checkpoint (names, prefix, dims, shapes)."""

    family: Family
    dims: Dims
    prefix: str
    note: str | None = None
    shapes: Mapping[str, tuple[int, ...]] | None = None
    config: Mapping[str, Any] | None = None
    _layouts: dict[str, _Layout] = field(default_factory=dict, repr=False)
    _coupled: dict[str, Coupling | None] = field(default_factory=dict, repr=False)

    # -- what a name is ---------------------------------------------------------------------------
    @property
    def roles(self) -> tuple[str, ...]:
        return self.family.roles

    def require_roles(self, roles: Iterable[str]) -> None:
        """Refuse roles this family does not have (``gate`` on BERT, heads on DeepSeek MLA)."""
        for role in roles:
            if role not in self.roles:
                why = f": {self.family.no_roles_reason}" if self.family.no_roles_reason else ""
                raise ArchError(f"{self.family.name} has no {role!r} projection (its roles: {', '.join(self.roles)}){why}")

    def coupled(self, name: str) -> Coupling | None:
        """How ``name`` holds heads or channels; None for a tensor that no unit owns (norms, embeddings, o biases)."""
        if name not in self._coupled:
            self._coupled[name] = self._match(name)
        return self._coupled[name]

    def coupling_of(self, name: str) -> Coupling:
        """``coupled(name)`` for a tensor that must hold units: an ArchError names one that holds none."""
        c = self.coupled(name)
        if c is None:
            raise ArchError(f"{name} holds no heads or channels in the {self.family.name} layout")
        return c

    def _match(self, name: str) -> Coupling | None:
        found = match_name(self.family, name)
        if found is not None and found[1]["prefix"] in (self.prefix, self.family.prefix, ""):
            spec, m = found
            part = "parameter" if spec.parameter else m["part"]
            if part == "bias" and spec.side == "in":
                return None  # an output-side bias lives in the residual stream: no unit owns it
            follower = spec.side == "follows" or part == "bias"
            dim = 0 if follower or (spec.side == "out") != spec.transposed else 1
            expert = m.groupdict().get("expert") or spec.expert
            return Coupling(name, int(m["layer"]), expert, spec.segment.parts, part, dim, spec.transposed,
                            follower, spec)
        return None

    def _layout_of(self, name: str) -> tuple[Coupling, _Layout]:
        c = self.coupling_of(name)
        if name not in self._layouts:
            if self.shapes is not None and name in self.shapes:
                shape = tuple(self.shapes[name])
                if c.stored_dim >= len(shape):
                    raise ArchError(f"{name}: shape {list(shape)} has no {c.axis} ({FORMAT_HELP})")
                length = shape[c.stored_dim]
            else:
                length = _expected_length(c.spec, self.dims)
            self._layouts[name] = _layout(c.spec.segment, length, self.dims, c.follower, name)
        return c, self._layouts[name]

    # -- units <-> stored indices ----------------------------------------------------------------
    def unit_count(self, name: str, role: str) -> int:
        """How many units (heads, kv heads, channels) of ``role`` tensor ``name`` holds."""
        return int(self._table(name, role).shape[0])

    def _table(self, name: str, role: str) -> np.ndarray:
        c, layout = self._layout_of(name)
        if role not in layout.tables:
            raise ArchError(f"{name} holds {', '.join(c.roles)}, not {role!r}")
        return layout.tables[role]

    def unit_indices(self, name: str, role: str, units: Iterable[int], expert: str | None = None) -> np.ndarray:
        """Stored indices (on ``coupled(name).axis``) of ``units`` of ``role``, unit by unit in the given order.

        In a stacked tensor the units are ``expert``'s: index ``e * n + k`` (FORMAT §4.5)."""
        table = self._table(name, role) + self._expert_offset(name, expert)
        chosen = _int64(units)
        if chosen.size and not (0 <= int(chosen.min()) and int(chosen.max()) < table.shape[0]):
            raise ArchError(f"{name}: {role} unit {int(chosen.max()) if int(chosen.max()) >= table.shape[0] else int(chosen.min())} "
                            f"out of range 0..{table.shape[0] - 1}")
        return table[chosen].reshape(-1)

    def _expert_offset(self, name: str, expert: str | None) -> int:
        c, layout = self._layout_of(name)
        if not c.stacked:
            return 0
        if expert not in self.stacked_experts(name):
            raise ArchError(f"{name} stacks experts 0..{len(self.stacked_experts(name)) - 1}; got expert {expert!r}")
        return int(expert) * layout.length

    def stacked_experts(self, name: str) -> list[str]:
        """The experts a stacked tensor holds ("0", "1", ...); [] for any other tensor."""
        c = self.coupled(name)
        if c is None or not c.stacked:
            return []
        count = self.shapes[name][0] if self.shapes is not None and name in self.shapes else self.dims.experts
        return [str(e) for e in range(count)]

    def by_expert(self, name: str, indices: Iterable[int] | np.ndarray) -> dict[str | None, np.ndarray]:
        """Stored indices of ``name`` per expert, local to that expert's matrix (one entry unless stacked)."""
        c, layout = self._layout_of(name)
        wanted = _int64(indices)
        if not c.stacked:
            return {c.expert: wanted}
        return {str(e): wanted[wanted // layout.length == e] % layout.length
                for e in unique(wanted // layout.length).tolist()}

    def expert_units(self, name: str, indices: Iterable[int] | np.ndarray) -> dict[str | None, dict[str, list[int]]]:
        """``units_of`` per expert: ``{coupled(name).expert: ...}``, or per expert of a stacked tensor."""
        c = self.coupling_of(name)
        return {(expert if c.stacked else c.expert): self.units_of(name, local)
                for expert, local in self.by_expert(name, indices).items()}

    def units_of(self, name: str, indices: Iterable[int] | np.ndarray) -> dict[str, list[int]]:
        """The inverse: per role, the sorted units that own any of ``indices`` (of any expert, when stacked)."""
        c, layout = self._layout_of(name)
        wanted = _int64(indices)
        if c.stacked:
            wanted = wanted % layout.length
        found = {}
        for role, table in layout.tables.items():
            hit = np.flatnonzero(np.isin(table, wanted).any(1)).tolist()
            if hit:
                found[role] = hit
        return found

    def whole_units(self, name: str, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """``indices`` widened to every stored index of the units they touch, sorted."""
        parts = [self.unit_indices(name, role, units, expert)
                 for expert, touched in self.expert_units(name, indices).items() for role, units in touched.items()]
        return unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)

    def permute_index(self, name: str, layer_order: LayerOrder | None) -> tuple[str, np.ndarray] | None:
        """``(FORMAT axis, gather index)`` that applies a layer's permutation to ``name``; None if it does not move.

        A stacked tensor gets one index over all its experts, each expert reordered by its own order."""
        if layer_order is None:
            return None
        c = self.coupled(name)
        if c is None:
            return None
        _, layout = self._layout_of(name)
        experts = self.stacked_experts(name) if c.stacked else [c.expert]
        index = np.arange(layout.length * len(experts), dtype=np.int64)
        moved = False
        for e, expert in enumerate(experts):
            for role, table in layout.tables.items():
                order = layer_order.order_for(role, expert)
                if order is None or list(order) == list(range(table.shape[0])):
                    continue
                if len(order) != table.shape[0]:
                    raise ArchError(f"{name}: the permutation orders {len(order)} {role} units, the tensor has {table.shape[0]}")
                offset = e * layout.length
                index[offset + table.reshape(-1)] = offset + table[_int64(order)].reshape(-1)
                moved = True
        return (c.axis, index) if moved else None

    # -- names by role -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every coupled checkpoint tensor (from the shapes given to ``resolve``, else from the description)."""
        if self.shapes is not None:
            return [n for n in self.shapes if self.coupled(n) is not None]
        names = []
        for layer in range(self.dims.layers):
            for spec in self.family.tensors:
                experts = range(self.dims.experts) if spec.numbered_expert else [None]  # a stacked tensor: one name
                for e in experts:
                    base = self.family.prefix + self.family.layers.format(layer=layer) + "." + spec.key.replace(
                        "{expert}", str(e))
                    names.append(base if spec.parameter else base + ".weight")
        return names

    def tensors(self, role: str, layer: int, expert: str | None = None) -> list[str]:
        """Trainable checkpoint tensors (weights) of ``role`` in ``layer`` (and ``expert``)."""
        return [n for n in self.names()
                if (c := self.coupled(n)) and not c.follower and c.layer == layer and role in c.roles
                and (expert in self.stacked_experts(n) if c.stacked else c.expert == expert)]

    def experts(self, layer: int) -> list[str | None]:
        """The FFN experts of a layer: ``[None]`` for a dense FFN; numbered ids, then fixed ones (``shared``)."""
        found = {e for n in self.names() if (c := self.coupled(n)) and c.layer == layer
                 and not c.follower and set(c.roles) & set(CHANNEL_ROLES)
                 for e in (self.stacked_experts(n) if c.stacked else [c.expert])}
        return sorted(found, key=_expert_order)

    def channel_count(self, layer: int, expert: str | None = None) -> int:
        """FFN channels of a layer (of one expert)."""
        for role in ("down", "up", "gate"):
            names = self.tensors(role, layer, expert)
            if names:
                return self.unit_count(names[0], role)
        raise ArchError(f"layer {layer} has no FFN channels" + (f" in expert {expert}" if expert is not None else ""))
