"""Serving many S2FT and PISA adapters on one base model: one adapter per sequence of a batch.

``AdapterServer`` loads a base once, attaches adapters by name (directories or registry refs, their
base fingerprints checked) and runs ``forward``/``generate`` with an adapter name per sequence,
giving each sequence what the checkpoint with that adapter merged gives, without changing the base
weights. docs/serving.md says when to use it and when to export to vLLM or LoRAX instead.
"""

from .server import AdapterServer, Attached, NotAttached, TooManyAdapters

__all__ = ["AdapterServer", "Attached", "NotAttached", "TooManyAdapters"]
