"""What one ref points at: its manifest digest and manifest, and the files of its adapter directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..format.manifest import MANIFEST_NAME
from .blobs import Blobs
from .names import Ref
from .refs import Refs

AdapterFiles = dict[str, tuple[str, int | None]]  # file name -> (blob digest, recorded size; None for the manifest)


def adapter_files(digest: str, manifest: dict[str, Any]) -> AdapterFiles:
    """The files of the adapter directory whose manifest blob is ``digest``: its manifest and its payload."""
    payload = manifest["payload"]
    return {MANIFEST_NAME: (digest, None), payload["file"]: (payload["sha256"], int(payload["bytes"]))}


@dataclass(frozen=True)
class Entry:
    """One ref and what it points at."""

    ref: Ref
    digest: str
    manifest: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "ref": str(self.ref),
            "digest": self.digest,
            "kind": m["kind"],
            "base": m["base"]["name"],
            "targets": len(m["targets"]),
            "bytes": m["payload"]["bytes"],
            "created": m["provenance"].get("created"),
        }

    def files(self) -> AdapterFiles:
        return adapter_files(self.digest, self.manifest)


def read_entry(blobs: Blobs, refs: Refs, ref: Ref) -> Entry:
    """The entry of ``ref``, its manifest blob re-hashed (NotFound without the ref, IntegrityError when damaged)."""
    digest = refs.digest_of(ref)
    return Entry(ref, digest, json.loads(blobs.read(digest)))
