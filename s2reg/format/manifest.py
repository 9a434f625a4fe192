"""The manifest ``s2reg.json`` (FORMAT §3): canonical serialisation and checked parsing.

Parsing checks structure and types only; what the numbers mean is checked by the kind modules
(``s2ft``, ``pisa``) against the payload.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import FormatError, UnsupportedVersion, listing
from . import boundedjson, dtypes
from .safetensors_header import MAX_DIMENSION

MANIFEST_NAME = "s2reg.json"
FORMAT = "s2reg.adapter"
FORMAT_VERSION = 3  # the newest version this s2reg reads; each adapter is written with the lowest that holds it
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
KINDS = ("s2ft", "pisa")

TOP_KEYS = {"format", "format_version", "kind", "base", "targets", "payload", "params", "provenance"}
PAYLOAD_FILES = {"raw": "payload.safetensors", "zstd-byteplane": "payload.safetensors.zst"}

_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,512}")
_HEX = re.compile(r"[0-9a-f]{64}")


class UnknownKeyWarning(UserWarning):
    """A manifest holds keys this version does not know; they are kept and written back (FORMAT §3.6)."""


def check_tensor_name(name: object) -> str:
    """FORMAT §2: 1-512 characters of [A-Za-z0-9_.-/], no leading/trailing '.', no '..'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name[0] == "." or name[-1] == "." or ".." in name:
        raise FormatError(f"invalid tensor name {name!r} (FORMAT §2: 1-512 chars of A-Z a-z 0-9 _ . - /, no '..')")
    return name


def dump(manifest: Mapping[str, Any]) -> bytes:
    """Canonical manifest bytes (FORMAT §3): sorted keys, indent 2, UTF-8, trailing newline."""
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _fail(where: str, message: str) -> FormatError:
    return FormatError(f"manifest {where}: {message}")


def require(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]``, checked to be of ``kind`` (bool is never an int here)."""
    if key not in obj:
        raise _fail(where, f"missing required key {key!r}")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise _fail(where, f"{key!r} must be {names}, got {type(value).__name__}")
    return value


def require_shape(obj: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    shape = require(obj, key, list, where)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d < MAX_DIMENSION for d in shape):
        raise _fail(where, f"{key!r} must be a non-empty list of positive integers below 2**63, got {shape!r}"[:300])
    return tuple(shape)


def require_dtype(obj: Mapping[str, Any], key: str, where: str, allowed: frozenset[str] | None = None) -> str:
    name = require(obj, key, str, where)
    dtypes.check(name)
    if allowed is not None and name not in allowed:
        raise _fail(where, f"{key!r} must be one of {', '.join(sorted(allowed))}, got {name}")
    return name


def require_sha256(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = require(obj, key, str, where)
    if not _HEX.fullmatch(value):
        raise _fail(where, f"{key!r} must be 64 lowercase hex characters")
    return value


def warn_unknown(obj: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        warnings.warn(
            f"manifest {where}: unknown keys {listing(unknown)} kept and ignored "
            "(written by a newer s2reg?)",
            UnknownKeyWarning,
            stacklevel=3,
        )


def parse(data: bytes, what: str = "manifest") -> dict[str, Any]:
    """Parse and structurally check manifest bytes (FORMAT §3, §7 step 1)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    manifest = boundedjson.loads(data, what=what)
    if not isinstance(manifest, dict):
        raise FormatError("manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise _fail("format", f"expected {FORMAT!r}, got {manifest.get('format')!r} (not an s2reg adapter?)")
    version = require(manifest, "format_version", int, "top level")
    if version > FORMAT_VERSION:
        raise UnsupportedVersion(
            f"adapter has format_version {version} but this s2reg reads up to {FORMAT_VERSION}; "
            "upgrade s2reg (pip install -U s2reg)"
        )
    if version < 1:
        raise _fail("format_version", f"must be >= 1, got {version}")
    kind = require(manifest, "kind", str, "top level")
    if kind not in KINDS:
        raise _fail("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    warn_unknown(manifest, TOP_KEYS, "top level")
    _check_base(require(manifest, "base", dict, "top level"))
    targets = require(manifest, "targets", dict, "top level")
    if not targets:
        raise _fail("targets", "must name at least one tensor")
    for name in targets:
        check_tensor_name(name)
        require(targets, name, dict, "targets")
    _check_payload(require(manifest, "payload", dict, "top level"))
    require(manifest, "params", dict, "top level")
    provenance = require(manifest, "provenance", dict, "top level")
    for key in ("tool", "created", "source"):
        require(provenance, key, str, "provenance")
    require(provenance, "training", (dict, type(None)), "provenance")
    missing = sorted(set(targets) - set(manifest["base"]["fingerprints"]))
    if missing:
        raise _fail("base.fingerprints", f"no fingerprint for target(s) {listing(missing)}")
    return manifest


def _check_base(base: Mapping[str, Any]) -> None:
    require(base, "name", str, "base")
    require(base, "revision", (str, type(None)), "base")
    for name, fp in require(base, "fingerprints", dict, "base").items():
        where = f"base.fingerprints[{name!r}]"
        check_tensor_name(name)
        require(base["fingerprints"], name, dict, "base.fingerprints")
        require_shape(fp, "shape", where)
        require_dtype(fp, "dtype", where)
        require_sha256(fp, "sha256", where)


def _check_payload(payload: Mapping[str, Any]) -> None:
    encoding = require(payload, "encoding", str, "payload")
    if encoding not in PAYLOAD_FILES:
        raise _fail("payload", f"'encoding' must be one of {', '.join(PAYLOAD_FILES)}, got {encoding!r}")
    if require(payload, "file", str, "payload") != PAYLOAD_FILES[encoding]:
        raise _fail("payload", f"'file' must be {PAYLOAD_FILES[encoding]!r} for encoding {encoding!r}")
    for key in ("bytes", "raw_bytes"):
        if not 0 <= require(payload, key, int, "payload") < MAX_DIMENSION:
            raise _fail("payload", f"{key!r} must be >= 0 and below 2**63")
    require_sha256(payload, "sha256", "payload")
    require_sha256(payload, "raw_sha256", "payload")
    if encoding == "raw" and (payload["bytes"], payload["sha256"]) != (payload["raw_bytes"], payload["raw_sha256"]):
        raise _fail("payload", "a raw payload must have bytes == raw_bytes and sha256 == raw_sha256")
    if encoding == "zstd-byteplane":
        require(payload, "zstd_level", int, "payload")
    elif "zstd_level" in payload:
        raise _fail("payload", f"'zstd_level' is present only when 'encoding' is 'zstd-byteplane', not {encoding!r}")


def read_manifest(path: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
    """The parsed manifest of the adapter directory at ``path`` and its bytes (FORMAT §7 step 1)."""
    path = Path(path)
    file = path / MANIFEST_NAME
    if not path.is_dir():
        raise FormatError(f"{path}: not an adapter directory (no such directory)")
    if not file.is_file():
        raise FormatError(f"{path}: not an adapter directory (no {MANIFEST_NAME})")
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise FormatError(f"{file}: larger than the {MAX_MANIFEST_BYTES}-byte manifest limit")
    text = file.read_bytes()
    return parse(text, what=f"manifest {file}"), text  # the file named: users have many adapters
