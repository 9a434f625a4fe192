"""The adapter format (versions 1 to 3): spec/FORMAT.md in code. No CLI, no registry.

Names are imported from their modules on first use, so ``from s2reg.format import limits`` (what the
command line needs to start) costs only that module, not numpy.
"""

from __future__ import annotations

from .._lazy import exports

# public name -> the module of this package that defines it
_EXPORTS = {
    "Adapter": ".adapter",
    "BaseModel": ".adapter",
    "Fingerprint": ".adapter",
    "PISAAdapter": ".adapter",
    "S2FTAdapter": ".adapter",
    "Stored": ".adapter",
    "TensorReader": ".adapter",
    "load": ".adapter",
    "read_manifest": ".manifest",
    "FORMAT_VERSION": ".manifest",
    "MANIFEST_NAME": ".manifest",
    "UnknownKeyWarning": ".manifest",
    "PISATarget": ".pisa",
    "S2FTTarget": ".s2ft",
    "exact_difference": ".s2ft",
}


__getattr__ = exports(__name__, _EXPORTS, globals())


__all__ = sorted(_EXPORTS)
