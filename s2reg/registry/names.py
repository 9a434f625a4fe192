"""Adapter references ``NAME[:TAG]`` and the rules that keep them inside the store (spec/REGISTRY.md §2)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RegistryError

DEFAULT_TAG = "latest"
MAX_NAME = 128
_COMPONENT = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62})")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Ref:
    """A name (``/``-separated lowercase components) and a tag."""

    name: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def parts(self) -> tuple[str, ...]:
        return (*self.name.split("/"), self.tag)


def parse_ref(text: str) -> Ref:
    """``NAME[:TAG]`` checked against spec/REGISTRY.md §2; RegistryError says what is wrong."""
    if not isinstance(text, str) or not text:
        raise RegistryError("empty adapter name (expected NAME[:TAG], e.g. math-s2ft:v1)")
    name, _, tag = text.partition(":")
    tag = tag if _ else DEFAULT_TAG
    if len(name) > MAX_NAME:
        raise RegistryError(f"adapter name is {len(name)} characters, the limit is {MAX_NAME}")
    components = name.split("/")
    for component in components:
        if component in ("", ".", "..") or not _COMPONENT.fullmatch(component) or ".." in component:
            raise RegistryError(
                f"invalid adapter name {name!r}: use lowercase letters, digits, '.', '_', '-' in '/'-separated "
                "parts, each starting with a letter or digit (no '..', no empty parts)"
            )
    if not _TAG.fullmatch(tag):
        raise RegistryError(f"invalid tag {tag!r}: letters, digits, '.', '_', '-', up to 128, not starting with '.' or '-'")
    return Ref(name, tag)
