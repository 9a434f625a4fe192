"""The merge ledger: which adapters a checkpoint holds, and what its touched tensors were before.

A sidecar ``s2reg-merged.json`` beside the shards (spec/SURGERY.md §2). Safetensors headers are
not rewritten for this, so an in-place merge patches tensor bytes only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..format import Adapter, S2FTTarget
from ..format.digest import sha256_bytes
from ..fsatomic import write_file

LEDGER_NAME = "s2reg-merged.json"
LEDGER_FORMAT = "s2reg.merged"


def adapter_identity(adapter: Adapter) -> str:
    """The content digest that names an adapter in a ledger: sha256 of its raw payload (FORMAT §3.4)."""
    return sha256_bytes(adapter.payload_bytes())


def support_of(adapter: Adapter) -> dict[str, Any]:
    """Per target, the slice it changes (``{"axis", "indices"}``), or ``"dense"``."""
    return {
        name: {"axis": t.axis, "indices": t.indices.tolist()} if isinstance(t, S2FTTarget) else "dense"
        for name, t in adapter.targets.items()
    }


def overlaps(a: Any, b: Any) -> bool:
    """Whether two supports of the same tensor share any element."""
    if a == "dense" or b == "dense":
        return True
    if a["axis"] != b["axis"]:
        return True  # a row and a column always cross
    return bool(set(a["indices"]) & set(b["indices"]))


@dataclass
class Ledger:
    """Merged adapters, oldest first, the sha256 of every touched tensor before the first merge, and the
    tensors a forced merge changed in a way unmerge cannot undo bit for bit."""

    merged: list[dict[str, Any]] = field(default_factory=list)
    original: dict[str, str] = field(default_factory=dict)
    inexact: frozenset[str] = frozenset()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ledger:
        if data.get("format") != LEDGER_FORMAT:
            raise ValueError(data.get("format"))
        return cls(list(data["merged"]), dict(data["original"]), frozenset(data.get("inexact", ())))

    @classmethod
    def read(cls, directory: Path) -> Ledger:
        file = Path(directory) / LEDGER_NAME
        if not file.is_file():
            return cls()
        try:
            return cls.from_json(json.loads(file.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{file}: unreadable merge ledger (spec/SURGERY.md §2)") from None

    def as_json(self) -> dict[str, Any]:
        inexact = {"inexact": sorted(self.inexact)} if self.inexact else {}
        return {"format": LEDGER_FORMAT, "version": 1, "merged": self.merged, "original": dict(sorted(self.original.items())),
                **inexact}

    def to_bytes(self) -> bytes:
        return (json.dumps(self.as_json(), indent=2) + "\n").encode()

    def write(self, directory: Path) -> None:
        file = Path(directory) / LEDGER_NAME
        if self.merged:
            write_file(file, self.to_bytes())
        elif file.exists():
            file.unlink()

    def find(self, identity: str) -> int | None:
        for i, entry in enumerate(self.merged):
            if entry["digest"] == identity:
                return i
        return None

    def with_merged(self, adapter: Adapter, identity: str, originals: dict[str, str]) -> Ledger:
        entry = {"digest": identity, "kind": adapter.kind, "base": adapter.base.name, "support": support_of(adapter)}
        original = dict(self.original)
        for name, sha in originals.items():
            original.setdefault(name, sha)
        return Ledger([*self.merged, entry], original, self.inexact)

    def with_inexact(self, name: str) -> Ledger:
        """The ledger noting that unmerging cannot restore ``name`` bit for bit (a forced merge, spec/SURGERY.md §2)."""
        return Ledger(self.merged, self.original, self.inexact | {name})

    def without(self, identity: str) -> Ledger:
        """The ledger after unmerging ``identity``.

        A tensor a dense (PISA) delta was taken out of is only within an ulp of what it was, so the
        ledger stops vouching for its original bytes.
        """
        removed = [e for e in self.merged if e["digest"] == identity]
        merged = [e for e in self.merged if e["digest"] != identity]
        touched = {name for e in merged for name in e["support"]}
        inexact = {name for e in removed for name, support in e["support"].items() if support == "dense"}
        return Ledger(merged, {n: s for n, s in self.original.items() if n in touched and n not in inexact},
                      frozenset(n for n in self.inexact if n in touched))

    def later_overlap(self, identity: str) -> str | None:
        """A tensor where an adapter merged after ``identity`` overlaps it (so unmerging it first is inexact)."""
        i = self.find(identity)
        if i is None:
            return None
        mine = self.merged[i]["support"]
        for later in self.merged[i + 1:]:
            for name, support in later["support"].items():
                if name in mine and overlaps(mine[name], support):
                    return name
        return None
