"""What one ref points at: its manifest digest and manifest, and the files of its adapter directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..format.manifest import MANIFEST_NAME
from ..results import Result
from .blobs import Blobs
from .names import Ref
from .refs import Refs

AdapterFiles = dict[str, tuple[str, int | None]]  # file name -> (blob digest, recorded size; None for the manifest)


def adapter_files(digest: str, manifest: dict[str, Any]) -> AdapterFiles:
    """The files of the adapter directory whose manifest blob is ``digest``: its manifest and its payload."""
    payload = manifest["payload"]
    return {MANIFEST_NAME: (digest, None), payload["file"]: (payload["sha256"], int(payload["bytes"]))}


@dataclass(frozen=True)
class EntrySummary(Result):
    """One line of ``s2reg ls``: a stored adapter's ref, manifest digest, kind, base model name, number of
    targets, payload bytes and creation time (None when its provenance has none)."""

    ref: str
    digest: str
    kind: str
    base: str
    targets: int
    bytes: int
    created: str | None


@dataclass(frozen=True)
class Entry:
    """One ref and what it points at."""

    ref: Ref
    digest: str
    manifest: dict[str, Any]

    def summary(self) -> EntrySummary:
        m = self.manifest
        return EntrySummary(str(self.ref), self.digest, m["kind"], m["base"]["name"], len(m["targets"]),
                            m["payload"]["bytes"], m["provenance"].get("created"))

    def files(self) -> AdapterFiles:
        return adapter_files(self.digest, self.manifest)


def read_entry(blobs: Blobs, refs: Refs, ref: Ref) -> Entry:
    """The entry of ``ref``, its manifest blob re-hashed (NotFound without the ref, IntegrityError when damaged)."""
    digest = refs.digest_of(ref)
    return Entry(ref, digest, json.loads(blobs.read(digest)))
