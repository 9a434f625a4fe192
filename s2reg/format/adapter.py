"""Adapters in memory, and their directory form on disk (FORMAT §1, §3, §6, §7)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Union

import numpy as np

from .._version import __version__
from ..errors import BaseMismatch, FormatError, IntegrityError, ShapeError, listing, one_line
from ..fsatomic import write_directory
from ..parallel import on_every_core
from . import codec, dtypes, limits, manifest, payload
from .arrays import as_array, read_array
from .digest import sha256_bytes, tensor_sha256
from .pisa import PISATarget
from .s2ft import S2FTTarget, add_exact, exact_difference, take

if TYPE_CHECKING:  # tensors imports format: the protocol is only named here, never imported at run time
    from ..tensors.source import TensorSource

Target = Union[S2FTTarget, PISATarget]


class TensorReader(Protocol):
    """What an adapter needs of a base model: its tensors by name (a checkpoint or a state dict)."""

    def get(self, name: str) -> Any: ...


@dataclass(frozen=True)
class Fingerprint:
    """FORMAT §3.2: shape, dtype and sha256 of one base tensor."""

    shape: tuple[int, ...]
    dtype: str
    sha256: str

    @classmethod
    def of(cls, tensor: Any) -> Fingerprint:
        return cls(tuple(tensor.shape), dtypes.name_of(tensor.dtype), tensor_sha256(tensor))

    def as_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "sha256": self.sha256}


@dataclass
class BaseModel:
    """FORMAT §3.2: which base model an adapter belongs to."""

    name: str
    revision: str | None = None
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stored:
    """Where a loaded adapter came from, and what it costs on disk."""

    path: Path
    digest: str
    encoding: str
    payload_bytes: int
    raw_bytes: int


def _now() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch) if epoch else None))


_PROVENANCE_KEYS = frozenset({"tool", "created", "source", "training"})  # FORMAT §3: every manifest has them


def _complete_provenance(given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with this tool, this time and ``from_slices`` for what it leaves out; a complete one (a
    loaded manifest's) is kept exactly as it is, so nothing is stamped anew (nor the clock read) on load."""
    if _PROVENANCE_KEYS <= given.keys():
        return dict(given)
    return {"tool": f"s2reg {__version__}", "created": _now(), "source": "from_slices", "training": None, **given}


def _reader(base: TensorReader | Mapping[str, Any]) -> Callable[[str], np.ndarray]:
    return lambda name: read_array(base, name)


class Adapter:
    """A set of per-tensor deltas of one kind for one base model.

    Build one with :meth:`S2FTAdapter.from_slices`, :meth:`S2FTAdapter.from_tuned`,
    :meth:`PISAAdapter.from_coefficients` or :func:`load`; write it with :meth:`save`.
    """

    kind: ClassVar[str]
    target_type: ClassVar[type[Target]]

    def __init__(
        self,
        targets: Mapping[str, Target],
        base: BaseModel,
        *,
        params: Mapping[str, Any] | None = None,
        provenance: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        allow_nonfinite: bool = False,
    ):
        """Every adapter, built or loaded, passes :meth:`check` here (``allow_nonfinite`` as there)."""
        self.targets: dict[str, Target] = dict(sorted(targets.items()))
        self.base = base
        self.params = dict(params or {})
        self.provenance = _complete_provenance(provenance or {})
        self.extra = dict(extra or {})
        self.stored: Stored | None = None
        self.check(allow_nonfinite=allow_nonfinite)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self.targets)} targets, base={self.base.name!r}>"

    # -- checks ---------------------------------------------------------------------------
    def check(self, *, allow_nonfinite: bool = False) -> None:
        """Check every target against FORMAT §4/§5 and against its base fingerprint."""
        if not self.targets:
            raise FormatError("an adapter needs at least one target tensor")
        for name, target in self.targets.items():
            manifest.check_tensor_name(name)
            if not isinstance(target, self.target_type):
                raise FormatError(f"{name}: a {self.kind} adapter cannot hold a {target.kind} target")
            target.check(name, allow_nonfinite=allow_nonfinite)
            fp = self.base.fingerprints.get(name)
            if fp is None:
                raise FormatError(f"{name}: no base fingerprint (FORMAT §3.2)")
            if fp.shape != tuple(target.shape) or fp.dtype != dtypes.name_of(target.dtype):
                raise ShapeError(
                    f"{name}: target is {list(target.shape)} {dtypes.name_of(target.dtype)} but its base fingerprint "
                    f"says {list(fp.shape)} {fp.dtype}"
                )

    def verify_base(self, base: TensorSource, *, hashes: bool = True) -> None:
        """Raise BaseMismatch unless every target's base tensor matches its fingerprint (FORMAT §3.2).

        Reads headers and streamed hashes only: no base tensor is decoded for a checkpoint source.
        """
        present = set(base.names())
        expected = sorted(self.base.fingerprints.items())
        for name, fp in expected:
            if name not in present:
                raise BaseMismatch(f"base model has no tensor {name!r} (adapter made for {self.base.name!r})")
            shape, dtype = tuple(base.shape(name)), base.dtype(name)
            if shape != fp.shape or dtypes.name_of(dtype) != fp.dtype:
                raise BaseMismatch(
                    f"{name}: base tensor is {list(shape)} {dtypes.name_of(dtype)}, adapter expects "
                    f"{list(fp.shape)} {fp.dtype} (made for {self.base.name!r})"
                )
        if not hashes:
            return
        names = [name for name, _ in expected]
        for (name, fp), sha in zip(expected, on_every_core(base.sha256_of, names), strict=True):
            if sha != fp.sha256:
                raise BaseMismatch(
                    f"{name}: base tensor differs from the one this adapter was made for ({self.base.name!r})"
                )

    # -- access ---------------------------------------------------------------------------
    def to_dense(self, name: str, *, base: TensorReader | Mapping[str, Any] | None = None) -> np.ndarray:
        """The full delta matrix of one target (FORMAT §4.4, §5.3).

        Its size is the target's *declared* shape: with ``base`` it must be the shape of the base's
        tensor (BaseMismatch otherwise); without, it must be within ``limits.MAX_DENSE``.
        """
        target = self.targets.get(name)
        if target is None:
            raise FormatError(f"adapter has no target {name!r}")
        if base is None:
            limits.check_dense(target.shape, name)
        else:
            shape = tuple(base.shape(name)) if hasattr(base, "shape") else tuple(_reader(base)(name).shape)
            if shape != tuple(target.shape):
                raise BaseMismatch(f"{name}: the adapter declares {list(target.shape)}, the base tensor is {list(shape)}")
        return target.to_dense()

    @property
    def format_version(self) -> int:
        """The lowest format version that holds every target (FORMAT §3.6), so older readers refuse only what they
        cannot read."""
        return max(getattr(t, "format_version", 1) for t in self.targets.values())

    @property
    def num_params(self) -> int:
        return sum(t.num_params for t in self.targets.values())

    def stats(self, *, sizes: bool = False) -> list[dict[str, Any]]:
        """One row per target: kind-specific selection, params, share of the base tensor, norm, bytes
        (with ``sizes``, also each target's zstd-compressed size: a compression run per target)."""
        from .stats import target_rows

        return target_rows(self, sizes=sizes)

    # -- serialisation ----------------------------------------------------------------------
    def payload_bytes(self) -> bytes:
        tensors: dict[str, np.ndarray] = {}
        for name, target in self.targets.items():
            tensors.update(target.payload_tensors(name))
        return payload.dump(tensors, payload_metadata(self.format_version, self.kind))

    def manifest_for(self, raw: bytes, blob: bytes, encoding: str, level: int | None) -> dict[str, Any]:
        payload_entry: dict[str, Any] = {
            "file": manifest.PAYLOAD_FILES[encoding],
            "encoding": encoding,
            "bytes": len(blob),
            "sha256": sha256_bytes(blob),
            "raw_bytes": len(raw),
            "raw_sha256": sha256_bytes(raw),
        }
        if level is not None:
            payload_entry["zstd_level"] = level
        return {
            **self.extra,
            "format": manifest.FORMAT,
            "format_version": self.format_version,
            "kind": self.kind,
            "base": {
                **self.base.extra,
                "name": self.base.name,
                "revision": self.base.revision,
                "fingerprints": {n: fp.as_json() for n, fp in sorted(self.base.fingerprints.items())},
            },
            "targets": {name: t.manifest_entry() for name, t in self.targets.items()},
            "payload": payload_entry,
            "params": self.params,
            "provenance": self.provenance,
        }

    def save(
        self, path: str | os.PathLike, *, compress: bool = True, level: int = codec.DEFAULT_LEVEL, overwrite: bool = False
    ) -> Stored:
        """Write the adapter directory atomically; the same adapter and options give the same bytes."""
        raw = self.payload_bytes()
        encoding = codec.ZSTD_BYTEPLANE if compress else codec.RAW
        blob = codec.encode(raw, level) if compress else raw
        text = manifest.dump(self.manifest_for(raw, blob, encoding, level if compress else None))
        path = Path(path)
        write_directory(path, {manifest.MANIFEST_NAME: text, manifest.PAYLOAD_FILES[encoding]: blob}, overwrite=overwrite)
        self.stored = Stored(path, sha256_bytes(text), encoding, len(blob), len(raw))
        return self.stored


class S2FTAdapter(Adapter):
    """Row/column slices of exact differences (FORMAT §4)."""

    kind = "s2ft"
    target_type = S2FTTarget

    @classmethod
    def from_tuned(
        cls,
        base: TensorReader | Mapping[str, Any],
        slices: Mapping[str, tuple[str, Iterable[int] | Any, Any]],
        *,
        base_name: str,
        base_revision: str | None = None,
        group_sizes: Mapping[str, int] | None = None,
        **kwargs: Any,
    ) -> S2FTAdapter:
        """From fine-tuned slice values: ``{name: (axis, indices, tuned_slice)}`` in the base's dtype.

        Stores exact differences (FORMAT §4.3), so merging reproduces the tuned values bit-for-bit.
        """
        return cls._build(base, slices, base_name, base_revision, group_sizes, snap=False, **kwargs)

    @classmethod
    def from_slices(
        cls,
        base: TensorReader | Mapping[str, Any],
        slices: Mapping[str, tuple[str, Iterable[int] | Any, Any]],
        *,
        base_name: str,
        base_revision: str | None = None,
        group_sizes: Mapping[str, int] | None = None,
        **kwargs: Any,
    ) -> S2FTAdapter:
        """From deltas: ``{name: (axis, indices, delta_slice)}``; deltas are snapped to exact ones (§4.3)."""
        return cls._build(base, slices, base_name, base_revision, group_sizes, snap=True, **kwargs)

    @classmethod
    def _build(cls, base, slices, base_name, base_revision, group_sizes, *, snap: bool, **kwargs) -> S2FTAdapter:
        get = _reader(base)
        targets, fingerprints = {}, {}
        for name, (axis, indices, values) in sorted(slices.items()):
            manifest.check_tensor_name(name)
            weight = get(name)
            idx = as_array(indices if not isinstance(indices, range) else list(indices), np.int64).reshape(-1)
            values = as_array(values)
            target = S2FTTarget(tuple(weight.shape), weight.dtype, axis, idx, values.astype(np.float64),
                                (group_sizes or {}).get(name))
            target.check(name, allow_nonfinite=True)  # shapes and ranges before any arithmetic (values: below)
            base_slice = take(weight, axis, idx)
            tuned = add_exact(base_slice, target.delta) if snap else values  # a zero delta keeps a -0.0
            if tuned.dtype != weight.dtype:
                raise ShapeError(f"{name}: tuned slice is {tuned.dtype} but the base tensor is {weight.dtype}")
            target.delta, target.restore = exact_difference(base_slice, tuned, name=name)
            targets[name] = target
            fingerprints[name] = Fingerprint.of(weight)
        return cls(targets, BaseModel(base_name, base_revision, fingerprints), **kwargs)


class PISAAdapter(Adapter):
    """Sparse rfft2 coefficients per block (FORMAT §5)."""

    kind = "pisa"
    target_type = PISATarget

    @classmethod
    def from_coefficients(
        cls,
        base: TensorReader | Mapping[str, Any],
        coefficients: Mapping[str, tuple[tuple[int, int], Any, Any]],
        *,
        base_name: str,
        base_revision: str | None = None,
        scale: float | Mapping[str, float] = 1.0,
        coefficient_dtype: Any = np.float32,
        **kwargs: Any,
    ) -> PISAAdapter:
        """From ``{name: (block, indices [blocks, k], complex coefficients [blocks, k])}``.

        Each block's indices may come in any order; they are sorted together with their coefficients.
        """
        get = _reader(base)
        targets, fingerprints = {}, {}
        for name, (block, indices, values) in sorted(coefficients.items()):
            manifest.check_tensor_name(name)
            weight = get(name)
            idx = as_array(indices, np.int64)
            values = as_array(values)
            if not np.iscomplexobj(values):
                raise FormatError(f"{name}: coefficients must be a complex tensor")
            if idx.shape != values.shape or idx.ndim != 2:
                raise ShapeError(f"{name}: indices {list(idx.shape)} and coefficients {list(values.shape)} must be [blocks, k]")
            order = np.argsort(idx, axis=1, kind="stable")
            idx, values = np.take_along_axis(idx, order, 1), np.take_along_axis(values, order, 1)
            stored = np.stack([values.real, values.imag], axis=-1).astype(_numpy_dtype(coefficient_dtype))
            s = scale[name] if isinstance(scale, Mapping) else scale
            targets[name] = PISATarget(tuple(weight.shape), weight.dtype, (int(block[0]), int(block[1])), idx, stored, float(s))
            fingerprints[name] = Fingerprint.of(weight)
        return cls(targets, BaseModel(base_name, base_revision, fingerprints), **kwargs)


def _numpy_dtype(dtype: Any) -> np.dtype:
    """A numpy or torch float dtype as numpy's (coefficients may be asked for as either)."""
    return dtypes.to_numpy(dtypes.name_of(dtype))


def payload_metadata(format_version: int, kind: str) -> dict[str, str]:
    """The payload's ``__metadata__`` (FORMAT §6.1): the manifest's version (as a string) and kind."""
    return {"s2reg.format_version": str(format_version), "s2reg.kind": kind}


def read_payload(path: Path, entry: Mapping[str, Any]) -> bytes:
    """The verified raw payload bytes (FORMAT §7 steps 2-3)."""
    file = path / entry["file"]
    if not file.is_file():
        raise FormatError(f"{file}: payload file missing")
    others = sorted(name for name in manifest.PAYLOAD_FILES.values() if name != entry["file"] and (path / name).exists())
    if others:
        raise FormatError(f"{path}: holds both {entry['file']} and {others[0]}; an adapter has exactly one payload (FORMAT §1)")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise FormatError(f"{file}: truncated or extended payload ({size} bytes, manifest says {entry['bytes']})")
    blob = file.read_bytes()
    if sha256_bytes(blob) != entry["sha256"]:
        raise IntegrityError(f"{file}: sha256 mismatch, the payload is corrupted or was modified")
    raw = codec.decode(blob, entry["raw_bytes"]) if entry["encoding"] == codec.ZSTD_BYTEPLANE else blob
    if sha256_bytes(raw) != entry["raw_sha256"]:
        raise IntegrityError(f"{file}: decoded payload sha256 mismatch, the payload is corrupted")
    return raw


def load(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> Adapter:
    """Read and fully check the adapter directory at ``path`` (FORMAT §7)."""
    path = Path(path)
    data, text = manifest.read_manifest(path)
    tensors, metadata = payload.load(read_payload(path, data["payload"]))
    # the kinds registry sits above the format (it imports these types), so it is asked here, at run time
    from ..kinds import kind_named

    cls: type[Adapter] = kind_named(data["kind"]).adapter_type
    expected = {n for name, entry in data["targets"].items() for n in cls.target_type.payload_names(name, entry)}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise FormatError(f"{path}: payload tensors do not match the manifest (missing {listing(map(repr, missing))}, "
                          f"unexpected {listing(map(repr, extra))})")
    if metadata != payload_metadata(data["format_version"], data["kind"]):
        raise FormatError(f"{path}: the payload's __metadata__ {one_line(str(metadata), 200)} does not say the manifest's "
                          f"format_version {data['format_version']} and kind {data['kind']!r} (FORMAT §6.1 rule 7)")
    targets = {name: cls.target_type.from_manifest(name, entry, tensors) for name, entry in data["targets"].items()}
    base = data["base"]
    fingerprints = {
        name: Fingerprint(tuple(fp["shape"]), fp["dtype"], fp["sha256"]) for name, fp in base["fingerprints"].items()
    }
    adapter = cls(targets,
                  BaseModel(base["name"], base["revision"], fingerprints,
                            {k: v for k, v in base.items() if k not in {"name", "revision", "fingerprints"}}),
                  params=data["params"], provenance=data["provenance"],
                  extra={k: v for k, v in data.items() if k not in manifest.TOP_KEYS}, allow_nonfinite=allow_nonfinite)
    if adapter.format_version != data["format_version"]:
        raise FormatError(f"{path}: its targets need format_version {adapter.format_version} (restore lists: 2, "
                          f"expert axes: 3, else 1), the manifest says {data['format_version']} (FORMAT §3.6: "
                          "the lowest version that holds the adapter)")
    adapter.stored = Stored(path, sha256_bytes(text), data["payload"]["encoding"], data["payload"]["bytes"],
                            data["payload"]["raw_bytes"])
    return adapter
