"""The adapter registry: a local content-addressed store (the default) and the Hugging Face Hub.

``Store()`` is the local store at ``$S2REG_HOME``; ``push_to_hub`` / ``pull_from_hub`` move
adapters between it and ``hf://ORG/REPO[@REVISION]``. spec/REGISTRY.md describes the layout.
Names are imported from their modules on first use, so listing refs never loads numpy.
"""

from __future__ import annotations

from .._lazy import exports

# public name -> the module of this package that defines it
_EXPORTS = {
    "DEFAULT_TAG": ".names",
    "Ref": ".names",
    "parse_ref": ".names",
    "list_adapters": ".query",
    "load_adapter": ".resolve",
    "BrokenRef": ".verify",
    "Entry": ".entry",
    "GcResult": ".gc",
    "Store": ".store",
    "VerifyResult": ".verify",
    "default_root": "..home",
}

__getattr__ = exports(__name__, _EXPORTS, globals())

__all__ = sorted(_EXPORTS)
