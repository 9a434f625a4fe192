"""The adapter registry: a local content-addressed store (the default) and the Hugging Face Hub.

``Store()`` is the local store at ``$S2REG_HOME``; ``push_to_hub`` / ``pull_from_hub`` move
adapters between it and ``hf://ORG/REPO[@REVISION]``. spec/REGISTRY.md describes the layout.
"""

from .names import DEFAULT_TAG, Ref, parse_ref
from .query import list_adapters
from .resolve import load_adapter
from .store import Entry, Store, default_root

__all__ = ["DEFAULT_TAG", "Entry", "Ref", "Store", "default_root", "list_adapters", "load_adapter", "parse_ref"]
