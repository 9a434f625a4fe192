"""Caps on what a file may make s2reg allocate (FORMAT §8), each raisable by the user.

A declared size (a payload's decompressed bytes, a target's dense shape) is checked against its
cap *before* anything is allocated. The cap's value comes, in order of precedence, from
:func:`raised` (what the CLI's flag sets for one command), the environment variable, the default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from ..errors import LimitExceeded, S2RegError


@dataclass(frozen=True)
class Limit:
    what: str
    env: str
    flag: str
    default: int
    _scoped: ContextVar[int | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_scoped", ContextVar(self.env, default=None))

    def value(self) -> int:
        scoped = self._scoped.get()
        if scoped is not None:
            return scoped
        text = os.environ.get(self.env)
        if text is None:
            return self.default
        if not text.strip().isdigit():
            raise S2RegError(f"{self.env}={text[:40]!r} is not a non-negative whole number")
        return int(text)

    def check(self, amount: int, subject: str) -> None:
        """Raise :class:`LimitExceeded` when ``amount`` is over the cap."""
        cap = self.value()
        if amount > cap:
            raise LimitExceeded(
                f"{subject} {amount:,} {self.what}, over the limit of {cap:,} "
                f"(raise it with {self.flag} or {self.env} if you trust the file)"
            )

    @contextmanager
    def raised(self, cap: int) -> Iterator[None]:
        """Within the block, the cap is ``cap``."""
        if cap < 0:
            raise S2RegError(f"{self.flag} must be >= 0, got {cap}")
        token = self._scoped.set(cap)
        try:
            yield
        finally:
            self._scoped.reset(token)


MAX_DECOMPRESSED = Limit("bytes decompressed", "S2REG_MAX_DECOMPRESSED", "--max-decompressed", 4 * 1024**3)
MAX_DENSE = Limit("elements", "S2REG_MAX_DENSE", "--max-dense", 1 << 28)


def check_dense(shape: tuple[int, ...], subject: str) -> None:
    """Refuse to densify a target whose declared shape is over :data:`MAX_DENSE` (no base to vouch for it)."""
    MAX_DENSE.check(math.prod(shape), f"{subject}: a dense delta of")
