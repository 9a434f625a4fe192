"""The adapter format (versions 1 and 2): spec/FORMAT.md in code. No CLI, no registry."""

from .adapter import (
    Adapter,
    BaseModel,
    Fingerprint,
    PISAAdapter,
    S2FTAdapter,
    Stored,
    TensorReader,
    load,
    read_manifest,
)
from .manifest import FORMAT_VERSION, MANIFEST_NAME, UnknownKeyWarning
from .pisa import PISATarget
from .s2ft import S2FTTarget, exact_difference

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Adapter",
    "BaseModel",
    "Fingerprint",
    "PISAAdapter",
    "PISATarget",
    "S2FTAdapter",
    "S2FTTarget",
    "Stored",
    "TensorReader",
    "UnknownKeyWarning",
    "exact_difference",
    "load",
    "read_manifest",
]
