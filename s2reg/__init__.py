"""s2reg: an adapter registry and model-surgery tool for S2FT and PISA fine-tuning.

The Python API is the product; the ``s2reg`` command line is a thin layer over it. This module
names the public API in one table, :data:`_EXPORTS`, and imports each name's module only when the
name is first used, so ``import s2reg`` costs the errors and the version, never torch (which only
the names that run torch code import: ``apply``/``remove``/``applied``, ``fuse``, ``extract_*``).
It imports neither click nor rich.
"""

from __future__ import annotations

from ._lazy import exports
from ._version import __version__
from .errors import (
    BaseMismatch,
    CheckpointError,
    FormatError,
    IntegrityError,
    NonFiniteError,
    NotFound,
    RegistryError,
    S2RegError,
    ShapeError,
    UnsupportedVersion,
)

# public name -> the module that defines it
_EXPORTS = {
    "Adapter": ".format",
    "BaseModel": ".format",
    "Fingerprint": ".format",
    "PISAAdapter": ".format",
    "S2FTAdapter": ".format",
    "load": ".format",
    "CheckpointSource": ".tensors",
    "Store": ".registry",
    "merge": ".surgery",
    "merge_in_place": ".surgery",
    "recover": ".surgery",
    "unmerge": ".surgery",
    "unmerge_in_place": ".surgery",
    "diff_adapters": ".ops.diff",
    "diff_checkpoints": ".ops.diff",
    "fuse": ".ops.fuse",
    "extract_s2ft": ".ops.extract",
    "extract_pisa": ".ops.extract",
    "applied": ".ops.live",
    "applied_adapters": ".ops.live",
    "apply": ".ops.live",
    "remove": ".ops.live",
}


__getattr__ = exports(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BaseMismatch",
    "CheckpointError",
    "FormatError",
    "IntegrityError",
    "NonFiniteError",
    "NotFound",
    "RegistryError",
    "S2RegError",
    "ShapeError",
    "UnsupportedVersion",
    "__version__",
    *_EXPORTS,
]
