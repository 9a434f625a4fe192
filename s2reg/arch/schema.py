"""The family description format (docs/families.md): frozen records read from JSON, validated on load.

A description says, per tensor of a layer, which roles its stored rows or columns hold and in what
layout, and how a model's dimensions are read from its config. Everything else in ``s2reg.arch`` is
computed from these records; nothing else in s2reg hard-codes a naming scheme.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import S2RegError

HEAD_ROLES = ("q", "k", "v", "o")
CHANNEL_ROLES = ("up", "gate", "down")
ROLES = HEAD_ROLES + CHANNEL_ROLES
OUTPUT_ROLES = ("q", "k", "v", "up", "gate")  # a unit is a set of output rows (inputs for o/down)
INPUT_ROLES = ("o", "down")
LAYOUTS = ("concat", "grouped")
DIM_NAMES = ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "experts")  # read in this order
FORMAT_HELP = "see docs/families.md for the --arch description format"


class ArchError(S2RegError):
    """A family description is invalid, or no description fits a checkpoint."""


def _fail(where: str, message: str) -> ArchError:
    return ArchError(f"{where}: {message} ({FORMAT_HELP})")


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _fail(where, f"{what} must be {getattr(kind, '__name__', 'one of ' + str(kind))}, got {value!r}")
    return value


def _only(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


@dataclass(frozen=True)
class Segment:
    """The roles one stored axis holds: a single role, ``concat`` ([q | k | v]) or ``grouped``.

    ``grouped`` repeats the parts per group of ``groups`` units (``kv_heads``: Falcon's new decoder
    [q q k v | q q k v], GPT-NeoX with kv_heads == heads: [q k v | q k v ...]).
    """

    parts: tuple[str, ...]
    layout: str = "concat"
    groups: str = "kv_heads"

    @classmethod
    def from_json(cls, data: Any, where: str, allowed: tuple[str, ...]) -> Segment:
        if isinstance(data, str):
            data = {"parts": [data]}
        elif isinstance(data, list):
            data = {"parts": data}
        _expect(data, dict, where, "a role entry")
        _only(data, {"parts", "layout", "groups"}, where)
        parts = tuple(_expect(data.get("parts"), list, where, "'parts'"))
        if not parts:
            raise _fail(where, "'parts' must name at least one role")
        for role in parts:
            if role not in allowed:
                raise _fail(where, f"role {role!r} cannot sit here (allowed: {', '.join(allowed)})")
        if len(set(parts)) != len(parts):
            raise _fail(where, f"a role is listed twice in {list(parts)}")
        layout = _expect(data.get("layout", "concat"), str, where, "'layout'")
        if layout not in LAYOUTS:
            raise _fail(where, f"'layout' must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        groups = _expect(data.get("groups", "kv_heads"), str, where, "'groups'")
        if groups not in ("kv_heads", "channels"):
            raise _fail(where, f"'groups' must be 'kv_heads' or 'channels', got {groups!r}")
        return cls(parts, layout, groups)

    def as_json(self) -> dict[str, Any]:
        return {"parts": list(self.parts), "layout": self.layout, "groups": self.groups}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layer, by its module path relative to the layer (``self_attn.q_proj``).

    ``out``: roles of the output units (rows of an nn.Linear, columns when ``transposed``), whose
    bias moves with them. ``inp``: roles on the input side (o, down). ``follows``: a tensor that is
    never trained but moves with heads when heads are permuted (OLMo 2's q_norm of heads*head_dim).
    ``parameter``: the key is a parameter name itself (no ``.weight``/``.bias`` appended).
    ``expert``: a fixed expert id for a tensor outside the numbered experts (``shared``).
    ``stacked``: dimension 0 numbers the experts (gpt-oss ``mlp.experts.gate_up_proj`` ``[experts, in, out]``);
    the roles describe each expert's matrix, and a unit of expert ``e`` is addressed with an expert axis
    (spec/FORMAT.md §4.5).
    """

    key: str
    out: Segment | None = None
    inp: Segment | None = None
    follows: Segment | None = None
    transposed: bool = False
    parameter: bool = False
    expert: str | None = None
    stacked: bool = False

    @property
    def segment(self) -> Segment:
        segment = self.out or self.inp or self.follows
        assert segment is not None, "from_json sets exactly one of out, in and follows"
        return segment

    @property
    def side(self) -> str:
        return "out" if self.out else "in" if self.inp else "follows"

    @property
    def numbered_expert(self) -> bool:
        return "{expert}" in self.key

    @classmethod
    def from_json(cls, key: str, data: Any, where: str) -> TensorSpec:
        where = f"{where}: tensors[{key!r}]"
        _expect(data, dict, where, "a tensor entry")
        _only(data, {"out", "in", "follows", "transposed", "parameter", "expert", "stacked"}, where)
        sides = [s for s in ("out", "in", "follows") if s in data]
        if len(sides) != 1:
            raise _fail(where, "give exactly one of 'out', 'in' or 'follows'")
        if not re.fullmatch(r"[A-Za-z0-9_.{}]+", key) or key.replace("{expert}", "").count("{"):
            raise _fail(where, "a tensor key is a dotted module path; the only placeholder is {expert}")
        segments = {
            "out": lambda d: Segment.from_json(d, f"{where}.out", OUTPUT_ROLES),
            "in": lambda d: Segment.from_json(d, f"{where}.in", INPUT_ROLES),
            "follows": lambda d: Segment.from_json(d, f"{where}.follows", ("q", "k", "up", "gate")),
        }
        side = sides[0]
        segment = segments[side](data[side])
        if side == "in" and len(segment.parts) != 1:
            raise _fail(where, "an input side holds one role")
        expert = data.get("expert")
        if expert is not None:
            _expect(expert, str, where, "'expert'")
            if "{expert}" in key:
                raise _fail(where, "'expert' names a fixed expert; a key with {expert} is numbered already")
        stacked = _expect(data.get("stacked", False), bool, where, "'stacked'")
        if stacked and ("{expert}" in key or expert is not None):
            raise _fail(where, "a 'stacked' tensor holds every expert along dimension 0: no {expert} and no 'expert'")
        return cls(
            key,
            out=segment if side == "out" else None,
            inp=segment if side == "in" else None,
            follows=segment if side == "follows" else None,
            transposed=_expect(data.get("transposed", False), bool, where, "'transposed'"),
            parameter=_expect(data.get("parameter", False), bool, where, "'parameter'"),
            expert=expert,
            stacked=stacked,
        )


DimRule = tuple[Any, ...]  # alternatives: a config key, an int, or "=expression" over dims read before


@dataclass(frozen=True)
class Family:
    """One family's description (docs/families.md)."""

    name: str
    model_types: tuple[str, ...]
    layers: str                                  # a layer's path after the prefix: "layers.{layer}"
    prefix: str                                  # the usual prefix before it ("model."); names decide
    tensors: tuple[TensorSpec, ...]
    dims: tuple[tuple[str, DimRule], ...]
    when: tuple[tuple[str, Any], ...] = ()      # config conditions among families sharing a model_type
    config_path: tuple[str, ...] = ()           # where the dims live in config.json ("text_config")
    no_roles_reason: str | None = None           # why roles this family lacks are missing
    extends: str | None = None
    source: str = "built-in"

    @property
    def roles(self) -> tuple[str, ...]:
        present = {r for t in self.tensors if t.side != "follows" for r in t.segment.parts}
        return tuple(r for r in ROLES if r in present)

    @classmethod
    def from_json(cls, data: Any, *, source: str, base: Family | None = None) -> Family:
        where = source
        _expect(data, dict, where, "a description")
        allowed = {"format", "version", "name", "model_types", "extends", "layers", "prefix", "tensors", "dims",
                   "when", "config", "no_roles_reason", "description"}
        _only(data, allowed, where)
        if data.get("format", "s2reg.arch") != "s2reg.arch" or data.get("version", 1) != 1:
            raise _fail(where, "'format' must be \"s2reg.arch\" and 'version' 1")
        name = _expect(data.get("name"), str, where, "'name'")
        types = _expect(data.get("model_types", []), list, where, "'model_types'")
        for t in types:
            _expect(t, str, where, "each model_type")
        tensors_json = _expect(data.get("tensors", {}), dict, where, "'tensors'")
        tensors = {t.key: t for t in base.tensors} if base else {}
        for key, entry in tensors_json.items():
            if entry is None and base:
                tensors.pop(key, None)  # an extending description may drop an inherited tensor
                continue
            tensors[key] = TensorSpec.from_json(key, entry, where)
        if not tensors:
            raise _fail(where, "'tensors' must describe at least one tensor")
        dims = dict(base.dims) if base else {}
        for dim, rule in _expect(data.get("dims", {}), dict, where, "'dims'").items():
            if dim not in DIM_NAMES:
                raise _fail(where, f"unknown dimension {dim!r} in 'dims' (known: {', '.join(DIM_NAMES)})")
            alternatives = rule if isinstance(rule, list) else [rule]
            for alt in alternatives:
                if not isinstance(alt, (str, int)) or isinstance(alt, bool):
                    raise _fail(where, f"dims[{dim!r}]: an alternative is a config key, an integer or \"=expression\"")
            dims[dim] = tuple(alternatives)
        missing = [d for d in DIM_NAMES if d not in dims]
        if missing:
            raise _fail(where, f"'dims' must say how to read {missing[0]!r}")
        layers = _expect(data.get("layers", base.layers if base else None), str, where, "'layers'")
        if layers.count("{layer}") != 1:
            raise _fail(where, "'layers' must contain {layer} once, e.g. \"layers.{layer}\"")
        config = data.get("config", list(base.config_path) if base else [])
        config = [config] if isinstance(config, str) else _expect(config, list, where, "'config'")
        when = _expect(data.get("when", dict(base.when) if base else {}), dict, where, "'when'")
        reason = data.get("no_roles_reason", base.no_roles_reason if base else None)
        if reason is not None:
            _expect(reason, str, where, "'no_roles_reason'")
        family = cls(
            name=name,
            model_types=tuple(types),
            layers=layers,
            prefix=_expect(data.get("prefix", base.prefix if base else ""), str, where, "'prefix'"),
            tensors=tuple(tensors.values()),
            dims=tuple(dims.items()),
            when=tuple(when.items()),
            config_path=tuple(config),
            no_roles_reason=reason,
            extends=base.name if base else None,
            source=source,
        )
        if not family.roles:
            raise _fail(where, "no tensor holds a role (q, k, v, o, up, gate, down)")
        return family
