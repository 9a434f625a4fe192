"""JSON from untrusted places, parsed within stated bounds (FORMAT §8).

``json.loads`` recurses once per nesting level (a deep enough document raises RecursionError),
turns a 5,000-digit literal into a ValueError and a 400-digit one into an int that later
arithmetic overflows on. Here the nesting depth is measured before parsing, and integer literals
longer than :data:`MAX_INT_DIGITS`, NaN/Infinity, non-finite floats and an object naming one key
twice (FORMAT §3: JSON leaves its meaning to the reader) are refused while parsing, so every failure is a :class:`~s2reg.errors.FormatError` (or the caller's subclass of S2RegError).
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from ..errors import FormatError, S2RegError

MAX_DEPTH = 64
MAX_INT_DIGITS = 20  # 2**64 has 20 digits: every size or offset fits, nothing longer is meaningful

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class _Refused(ValueError):
    """Raised from inside the parser's hooks; turned into the caller's error type."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"integer literal of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS} allowed)")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} is out of the float range")
    return value


def _parse_constant(text: str) -> float:
    raise _Refused(f"{text} is not JSON")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise _Refused(f"an object names the key {twice[:100]!r} twice (FORMAT §3)")
    return obj


def depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data`` (brackets inside strings do not count)."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(_STEP[b] for b in brackets), default=0)


def loads(data: bytes, *, what: str, error: type[S2RegError] = FormatError, max_depth: int = MAX_DEPTH) -> Any:
    """Parse UTF-8 JSON ``data`` describing ``what``, or raise ``error`` with a one-line reason."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    nesting = depth(data)
    if nesting > max_depth:
        raise error(f"{what} nests {nesting} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(text, object_pairs_hook=_object, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant)
    except _Refused as exc:
        raise error(f"{what} is refused: {exc}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc}") from None
