"""The merge ledger: which adapters a checkpoint holds, and what its touched tensors were before.

A sidecar ``s2reg-merged.json`` beside the shards (spec/SURGERY.md §2). Safetensors headers are
not rewritten for this, so an in-place merge patches tensor bytes only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..format import Adapter
from ..format.digest import sha256_bytes
from ..fsatomic import write_file
from ..kinds import kind_of
from ..format.s2ft import AXES as S2FT_AXES
from ..records import RECORD_VERSION, checked, int_list, read_record, require, to_bytes

LEDGER_NAME = "s2reg-merged.json"


def adapter_identity(adapter: Adapter) -> str:
    """The content digest that names an adapter in a ledger: sha256 of its raw payload (FORMAT §3.4)."""
    return sha256_bytes(adapter.payload_bytes())


@dataclass(frozen=True)
class Support:
    """What an adapter changes in one tensor: a row or column slice, or (``axis`` None) all of it."""

    axis: str | None
    indices: tuple[int, ...] = ()

    def overlaps(self, other: Support) -> bool:
        """Whether the two share any element of the tensor."""
        if self.axis is None or other.axis is None or self.axis != other.axis:
            return True  # whole tensors meet everything; a row and a column always cross
        return bool(set(self.indices) & set(other.indices))

    def to_json(self) -> Any:
        return "dense" if self.axis is None else {"axis": self.axis, "indices": list(self.indices)}

    @classmethod
    def from_json(cls, data: Any) -> Support:
        if data == "dense":
            return cls(None)
        require(isinstance(data, dict) and data.get("axis") in S2FT_AXES, "a support is \"dense\" or {axis, indices}")
        return cls(data["axis"], int_list(data.get("indices"), "support indices"))

    @classmethod
    def of(cls, target: Any) -> Support:
        region = kind_of(target).region(target)  # None: the merge rewrites the whole tensor
        return cls(None) if region is None else cls(region[0], tuple(region[1].tolist()))


@dataclass(frozen=True)
class LedgerEntry:
    """One merged adapter: its identity (:func:`adapter_identity`), kind, base name and support per tensor."""

    digest: str
    kind: str
    base: str
    support: Mapping[str, Support]

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "kind": self.kind, "base": self.base,
                "support": {name: s.to_json() for name, s in self.support.items()}}

    @classmethod
    def from_json(cls, data: Any) -> LedgerEntry:
        require(isinstance(data, dict), "a merged entry must be an object")
        digest, kind, base, support = (data.get(k) for k in ("digest", "kind", "base", "support"))
        require(isinstance(digest, str) and len(digest) == 64, "merged digest must be a sha256 hex digest")
        require(isinstance(kind, str) and isinstance(base, str), "merged kind and base must be strings")
        require(isinstance(support, dict), "merged support must be an object")
        return cls(digest, kind, base, {name: Support.from_json(s) for name, s in support.items()})


@dataclass(frozen=True)
class Ledger:
    """Merged adapters, oldest first, the sha256 of every touched tensor before the first merge, and the
    tensors a merge without the base check changed in a way unmerge cannot undo bit for bit."""

    FORMAT = "s2reg.merged"

    merged: tuple[LedgerEntry, ...] = ()
    original: Mapping[str, str] = field(default_factory=dict)
    inexact: frozenset[str] = frozenset()

    @classmethod
    def read(cls, directory: Path) -> Ledger:
        file = Path(directory) / LEDGER_NAME
        return read_record(file, cls.from_json) if file.is_file() else cls()

    def to_json(self) -> dict[str, Any]:
        inexact = {"inexact": sorted(self.inexact)} if self.inexact else {}
        return {"format": self.FORMAT, "version": RECORD_VERSION, "merged": [e.to_json() for e in self.merged],
                "original": dict(sorted(self.original.items())), **inexact}

    @classmethod
    def from_json(cls, data: Any) -> Ledger:
        data = checked(data, cls.FORMAT)
        merged, original, inexact = data.get("merged"), data.get("original"), data.get("inexact", [])
        require(isinstance(merged, list), "merged must be a list")
        require(isinstance(original, dict) and all(isinstance(v, str) for v in original.values()),
                "original must map tensor names to sha256 digests")
        require(isinstance(inexact, list) and all(isinstance(n, str) for n in inexact), "inexact must list tensor names")
        return cls(tuple(LedgerEntry.from_json(e) for e in merged), dict(original), frozenset(inexact))

    def to_bytes(self) -> bytes:
        return to_bytes(self)

    def write(self, directory: Path) -> None:
        file = Path(directory) / LEDGER_NAME
        if self.merged:
            write_file(file, self.to_bytes())
        elif file.exists():
            file.unlink()

    def touched(self) -> set[str]:
        """Every tensor a merged adapter changes."""
        return {name for entry in self.merged for name in entry.support}

    def find(self, identity: str) -> int | None:
        for i, entry in enumerate(self.merged):
            if entry.digest == identity:
                return i
        return None

    def with_merged(self, adapter: Adapter, identity: str, originals: dict[str, str]) -> Ledger:
        entry = LedgerEntry(identity, adapter.kind, adapter.base.name,
                            {name: Support.of(t) for name, t in adapter.targets.items()})
        original = dict(self.original)
        for name, sha in originals.items():
            original.setdefault(name, sha)
        return Ledger((*self.merged, entry), original, self.inexact)

    def with_inexact(self, names: Iterable[str]) -> Ledger:
        """The ledger noting that unmerging cannot restore ``names`` bit for bit (merged without the base check, spec/SURGERY.md §2)."""
        return Ledger(self.merged, self.original, self.inexact | frozenset(names))

    def without(self, identity: str) -> Ledger:
        """The ledger after unmerging ``identity``.

        A tensor a dense (PISA) delta was taken out of is only within an ulp of what it was, so the
        ledger stops vouching for its original bytes.
        """
        removed = [e for e in self.merged if e.digest == identity]
        kept = Ledger(tuple(e for e in self.merged if e.digest != identity))
        inexact = {name for e in removed for name, support in e.support.items() if support.axis is None}
        touched = kept.touched()
        return Ledger(kept.merged, {n: s for n, s in self.original.items() if n in touched and n not in inexact},
                      frozenset(n for n in self.inexact if n in touched))

    def later_overlap(self, identity: str) -> str | None:
        """A tensor where an adapter merged after ``identity`` overlaps it (so unmerging it first is inexact)."""
        i = self.find(identity)
        if i is None:
            return None
        mine = self.merged[i].support
        for later in self.merged[i + 1:]:
            for name, support in later.support.items():
                if name in mine and mine[name].overlaps(support):
                    return name
        return None
