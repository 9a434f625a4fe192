"""A model's head and channel sizes, read from its config by a description's rules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .schema import DIM_NAMES, FORMAT_HELP, ArchError, Family


@dataclass(frozen=True)
class Dims:
    """Head and channel sizes. ``intermediate`` is the dense FFN width; expert widths come from shapes."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    experts: int = 0

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.heads // self.kv_heads


def _expression(text: str, known: Mapping[str, int], where: str) -> int:
    tokens = re.split(r"([*/])", text.replace(" ", ""))
    def value(token: str) -> int:
        if token.isdigit():
            return int(token)
        if token in known:
            return known[token]
        raise ArchError(f"{where}: {token!r} is neither a number nor a dimension read before it ({FORMAT_HELP})")
    result = value(tokens[0])
    for op, token in zip(tokens[1::2], tokens[2::2], strict=True):  # split on a group: odd length
        operand = value(token)
        if op == "*":
            result *= operand
        elif operand == 0 or result % operand:
            raise ArchError(f"{where}: {result}/{operand} is not a whole number")
        else:
            result //= operand
    return result


def config_section(family: Family, config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The part of config.json holding the dimensions (a multimodal model's ``text_config``)."""
    for key in family.config_path:
        inner = config.get(key)
        if isinstance(inner, Mapping):
            config = inner
    return config


def read_dims(family: Family, config: Mapping[str, Any]) -> Dims:
    """Each dimension: the first alternative that is a present config key, an integer, or an expression."""
    section = config_section(family, config)
    rules = dict(family.dims)
    known: dict[str, int] = {}
    for dim in DIM_NAMES:
        where = f"{family.name} ({family.source}): dims[{dim!r}]"
        for alt in rules[dim]:
            if isinstance(alt, int):
                known[dim] = alt
            elif alt.startswith("="):
                known[dim] = _expression(alt[1:], known, where)
            elif section.get(alt) is not None:
                value = section[alt]
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ArchError(f"{where}: config key {alt!r} is {value!r}, not an integer")
                known[dim] = value
            else:
                continue
            break
        else:
            raise ArchError(f"config.json has none of {list(rules[dim])} for {family.name}'s {dim} ({FORMAT_HELP})")
    dims = Dims(**known)
    if dims.heads <= 0 or dims.kv_heads <= 0 or dims.heads % dims.kv_heads:
        raise ArchError(f"{family.name}: {dims.heads} heads cannot be shared by {dims.kv_heads} key/value heads")
    return dims
