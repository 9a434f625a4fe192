"""s2reg: an adapter registry and model-surgery tool for S2FT and PISA fine-tuning.

The Python API is the product; the ``s2reg`` command line is a thin layer over it.
This module re-exports the public API and imports neither click nor rich.
"""

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
from .format import Adapter, BaseModel, Fingerprint, PISAAdapter, S2FTAdapter, load
from .ops.live import applied, applied_adapters, apply, remove
from .surgery import merge, merge_in_place, recover, unmerge, unmerge_in_place

__all__ = [
    "Adapter",
    "BaseMismatch",
    "BaseModel",
    "CheckpointError",
    "Fingerprint",
    "FormatError",
    "IntegrityError",
    "NonFiniteError",
    "NotFound",
    "PISAAdapter",
    "RegistryError",
    "S2FTAdapter",
    "S2RegError",
    "ShapeError",
    "UnsupportedVersion",
    "__version__",
    "applied",
    "applied_adapters",
    "apply",
    "load",
    "merge",
    "merge_in_place",
    "recover",
    "remove",
    "unmerge",
    "unmerge_in_place",
]
