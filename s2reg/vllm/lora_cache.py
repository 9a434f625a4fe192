"""Stored adapters as PEFT LoRA directories for a LoRA engine serving one base checkpoint.

:class:`ServedBase` answers "which LoRA directory serves the adapter ``NAME[:TAG]`` on this base?":

- the adapter comes from the local store (``hf://ORG/REPO[@REV]`` is pulled into it first, through the
  registry's Hub code) with every check of FORMAT §7;
- its base fingerprints (shape, dtype, sha256 of every target tensor) must match the served checkpoint,
  as for ``s2reg merge`` and ``validate --base``; a co-permuted checkpoint is refused (the engine serves
  its permuted weights, the LoRA is in original coordinates);
- it is exported (``s2reg.interop.peft_lora.export_lora``) once per adapter digest (and rank, for PISA)
  into ``$S2REG_HOME/lora/``, shared by every process and server on the machine: each export is built
  in a staging directory and renamed into place whole, under a per-digest ``flock`` so that concurrent
  requests export once and the others wait for it and read the result;
- it is served only when the export is what the adapter computes: S2FT exports exactly (an F64 delta up to
  F32 rounding), and its relative (Frobenius) error must be at most ``max_error``; a PISA delta is a LoRA
  only approximately below full rank, so it is exported at the smallest rank per target whose relative
  error is at most ``max_error`` (``export_lora``'s tolerance) and never served less exact than that;
- its LoRA rank must be at most the engine's ``max_rank``, else the refusal names the rank it needs.

Every refusal is an :class:`~s2reg.errors.S2RegError` with one line that says what to change. Nothing
here imports an engine; torch is imported when an adapter is exported.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import BaseMismatch, S2RegError
from ..format import Adapter
from ..kinds import kind_of
from ..registry import Store, parse_ref
from ..results import Result, not_in_json

REPORT = "s2reg-export.json"  # beside the PEFT directory in each cache entry: what the export reported
PEFT = "peft"


class NotServable(S2RegError):
    """A stored adapter that this engine cannot serve as it is (wrong base, rank or export error)."""


@dataclass(frozen=True)
class ServedLoRA:
    """A stored adapter's PEFT LoRA directory, ready for the engine."""

    name: str
    digest: str
    kind: str
    directory: Path
    rank: int
    relative_error: float


def load_named(name: str, store: Store) -> Adapter:
    """The stored adapter ``NAME[:TAG]``, or ``hf://ORG/REPO[@REV]`` pulled into ``store`` first."""
    if name.startswith("hf://"):
        from ..registry.hub import pull_from_hub

        name = pull_from_hub(store, name).ref
    return store.load(parse_ref(name))


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed), waiting for another holder to finish.

    The kernel drops it when its holder dies, so it is never stale; it also keeps threads of one process
    apart (each opens the file anew, and locks belong to the open file)."""
    with open(path, "ab") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@dataclass(frozen=True)
class CachedExport(Result):
    """A cached export: what the export reported (the entry's ``s2reg-export.json``, which is this result's JSON
    form): the adapter's ``digest``, ``kind`` and ``base``, the ``max_error`` tolerance it was made at, the
    LoRA ``rank`` and ``relative_error`` per target with their maxima; and its PEFT ``directory``."""

    digest: str
    kind: str
    base: str
    max_error: float
    max_rank: int
    max_relative_error: float
    relative_error: dict[str, float]
    rank: dict[str, int]
    directory: Path = not_in_json()

    @classmethod
    def read(cls, entry: Path) -> CachedExport:
        return cls(**json.loads((entry / REPORT).read_text()), directory=entry / PEFT)


class LoRACache:
    """PEFT LoRA exports keyed by adapter digest (and rank), published whole, made once."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, adapter: Adapter, max_error: float | None) -> Path:
        """An S2FT export depends on the adapter alone; a PISA export also on the tolerance that chose its ranks."""
        return self.root / (adapter.stored.digest + (f"-e{max_error:g}" if kind_of(adapter).lora_by_tolerance else ""))

    def export(self, adapter: Adapter, base: Path, *, max_error: float | None = None) -> CachedExport:
        """The PEFT directory and report of ``adapter`` exported against ``base``; PISA targets at the smallest
        rank whose relative error is at most ``max_error`` (None: ``export_lora``'s default)."""
        if max_error is None:
            from ..interop.pisa_lowrank import DEFAULT_MAX_ERROR

            max_error = DEFAULT_MAX_ERROR
        entry = self.entry(adapter, max_error)
        if not (entry / REPORT).is_file():
            from ..fsatomic import building

            (self.root / "locks").mkdir(parents=True, exist_ok=True)
            with _exclusive(self.root / "locks" / entry.name):
                if not (entry / REPORT).is_file():  # another process may have published it while we waited
                    with building(entry, overwrite=entry.exists()) as staging:
                        report = self._export(adapter, base, staging / PEFT, max_error)
                        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        return CachedExport.read(entry)

    @staticmethod
    def _export(adapter: Adapter, base: Path, output: Path, max_error: float) -> dict[str, Any]:
        """The export's report, as the entry's JSON file holds it (read back as a :class:`CachedExport`)."""
        from ..interop.peft_lora import export_lora

        report = export_lora(adapter, output, max_error=max_error, base=base)
        return {"digest": adapter.stored.digest, "kind": adapter.kind, "base": adapter.base.name, "max_error": max_error,
                "max_rank": report.max_rank, "max_relative_error": report.max_relative_error,
                "relative_error": dict(report.relative_error), "rank": dict(report.rank)}


class ServedBase:
    """The checkpoint an engine serves, and the LoRA directories of stored adapters that fit it.

    ``max_rank``: the largest LoRA rank the engine takes (vLLM's ``--max-lora-rank``); ``max_error``:
    the largest relative error of an export that is served (None: ``export_lora``'s default, 1e-3);
    ``rank_advice(rank)``: how to let the engine
    take a larger rank (the words of a refusal)."""

    def __init__(self, directory: str | os.PathLike, *, max_rank: int, max_error: float | None = None,
                 store: Store | None = None, rank_advice: Callable[[int], str] | None = None):
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise S2RegError(f"{self.directory}: not a checkpoint directory (no config.json)")
        self.max_rank = max_rank
        self.max_error = max_error
        self.store = store or Store()
        self.cache = LoRACache(self.store.root / "lora")
        self.rank_advice = rank_advice or (lambda rank: f"a LoRA rank of at least {rank}")
        self._fits: set[str] = set()  # digests whose fingerprints matched the checkpoint (it is served, not changed)

    def lora_for(self, name: str) -> ServedLoRA:
        """The LoRA directory serving the stored adapter ``name`` on this base; NotFound for an unknown name,
        NotServable (one line saying what to change) for one that cannot be served here."""
        adapter = load_named(name, self.store)
        self.check_base(adapter, name)
        export = self.cache.export(adapter, self.directory, max_error=self.max_error)
        error, needed, tolerance = export.max_relative_error, export.max_rank, export.max_error
        if error > tolerance:  # S2FT (PISA exports refuse this themselves): an F64 delta that F32 factors round off
            raise NotServable(f"{name}: its LoRA export has a relative error of {error:.2e}, over the tolerance "
                              f"{tolerance:g}")
        if needed > self.max_rank:
            what = kind_of(adapter).lora_rank_text(needed, tolerance)
            raise NotServable(f"{name}: this {adapter.kind.upper()} adapter {what}, and this server takes at most "
                              f"rank {self.max_rank}; it needs {self.rank_advice(needed)}")
        return ServedLoRA(name, adapter.stored.digest, adapter.kind, export.directory, needed, error)

    def check_base(self, adapter: Adapter, name: str) -> None:
        """Refuse ``adapter`` unless its base fingerprints match the served checkpoint (FORMAT §3.2)."""
        if adapter.stored.digest in self._fits:
            return
        from ..ops.permute import read_permutation
        from ..surgery.lock import locked_for_reading
        from ..tensors import CheckpointSource

        # the shared lock while hashing, as `validate --base` does; hashes are remembered ($S2REG_HOME/hashes)
        with locked_for_reading(self.directory, partial(CheckpointSource, remember_hashes=True)) as source:
            if read_permutation(source) is not None:
                raise NotServable(f"{self.directory} was written by `s2reg permute`: serve the original checkpoint "
                                  "(`s2reg unpermute` gives it back)")
            try:
                adapter.verify_base(source)
            except BaseMismatch as exc:
                raise BaseMismatch(f"{name} was made for {adapter.base.name!r}, not for the served checkpoint "
                                   f"{self.directory}: {exc}") from None
        self._fits.add(adapter.stored.digest)
