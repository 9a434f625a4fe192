"""Many adapters, one base: a model loaded once, adapters attached by name, one adapter per sequence.

    server = AdapterServer.from_pretrained("path/to/base")
    server.attach("math", "math-s2ft:v1")              # a directory or a stored NAME[:TAG]
    server.attach("style", "adapters/style-pisa")
    out = server.generate(ids, mask, adapters=["math", "style", None], max_new_tokens=32)

Each sequence computes what the checkpoint with its adapter merged computes (``None``: the base),
and the base weights are left as they are (a layer rerun for an adapter's MoE experts swaps its values in for
that call and back, bit for bit). Attaching checks the adapter's base fingerprints against the
checkpoint the model was loaded from (FORMAT §3.2) and turns its targets into layer deltas
(``deltas.py``): an S2FT adapter costs its slices, a PISA adapter a dense matrix per target (the
merge's exact result, so ``out x in`` numbers in the model's dtype per target). At most
``max_resident`` adapters hold their deltas at once; the least recently used one gives them up
and builds them again (from the adapter it keeps) when a batch asks for it.

The server holds the checkpoint's shared lock (spec/SURGERY.md §3) from loading the model until
:meth:`AdapterServer.close`: it reads the checkpoint's bytes all that time (fingerprints and deltas
when an adapter is attached), so an in-place merge or unmerge of it is refused meanwhile instead of
changing them under the served model.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import BaseMismatch, S2RegError
from ..format import Adapter
from ..ops.permute import read_permutation
from ..registry import load_adapter
from ..surgery.lock import locked_for_reading
from ..tensors import CheckpointSource
from ..arch.layout import placements
from .deltas import Delta, live_deltas
from .routing import Routing
from .served import Batch, ServedModule


class NotAttached(S2RegError):
    """A batch names an adapter that is not attached."""


class TooManyAdapters(S2RegError):
    """A batch uses more distinct adapters than may be resident at once."""


class _HashedOnce:
    """The base checkpoint as :meth:`Adapter.verify_base` reads it, each tensor hashed once however many
    adapters are checked against it (the files the model was loaded from; the server does not write them)."""

    def __init__(self, source: CheckpointSource):
        self._source = source
        self._sha256: dict[str, str] = {}

    def __getattr__(self, name: str):
        return getattr(self._source, name)

    def sha256_of(self, name: str) -> str:
        if name not in self._sha256:
            self._sha256[name] = self._source.sha256_of(name)
        return self._sha256[name]


@dataclass(frozen=True)
class Attached:
    """An attached adapter: what it was attached from, and the adapter itself (kept to rebuild its deltas)."""

    name: str
    source: str
    adapter: Adapter


class AdapterServer:
    """A base model with S2FT and PISA adapters attached by name; see the module docstring."""

    def __init__(self, model: nn.Module, base: str | os.PathLike, *, max_resident: int = 8):
        if max_resident < 1:
            raise S2RegError(f"max_resident must be at least 1, got {max_resident}")
        self.model = model.eval()
        self.base = Path(base)
        self.max_resident = max_resident
        self._held = ExitStack()
        self.source = self._held.enter_context(locked_for_reading(self.base, CheckpointSource))
        if read_permutation(self.source) is not None:
            self._held.close()
            raise S2RegError(f"{self.base} was written by `s2reg permute`: serve adapters on the original checkpoint "
                             "(`s2reg unpermute` gives it back)")
        self._fingerprints = _HashedOnce(self.source)
        self._placements = placements(model)
        self._attached: dict[str, Attached] = {}
        self._resident: OrderedDict[str, dict[str, list[Delta]]] = OrderedDict()  # least recently used first
        self._batch = Batch()

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        max_resident: int = 8) -> AdapterServer:
        """Load ``base`` (a Hugging Face checkpoint directory) as a causal LM with transformers, once."""
        from transformers import AutoModelForCausalLM

        from ..train.session import loading_quietly

        base = Path(base)
        if not (base / "config.json").is_file():
            raise S2RegError(f"{base}: not a Hugging Face checkpoint directory (no config.json)")
        # the weights are loaded under the lock; the server then holds its own
        with locked_for_reading(base, CheckpointSource), loading_quietly():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
            model = model.to(device)  # type: ignore[arg-type]  # transformers' wrapped to() is typed to take the model
            return cls(model, base, max_resident=max_resident)

    def close(self) -> None:
        for name in list(self._attached):
            self.detach(name)
        self._held.close()  # closes the source and lets go of the lock

    def __enter__(self) -> AdapterServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- attaching ---------------------------------------------------------------------------------
    @property
    def attached(self) -> list[str]:
        return list(self._attached)

    @property
    def resident(self) -> list[str]:
        """Adapters holding their deltas now, least recently used first."""
        return list(self._resident)

    def attach(self, name: str, adapter: Adapter | str | os.PathLike) -> Adapter:
        """Attach ``adapter`` (an object, a directory or a stored ``NAME[:TAG]``) under ``name``.

        Refused with :class:`BaseMismatch` when its base fingerprints do not match this checkpoint.
        """
        if not isinstance(name, str) or not name:
            raise S2RegError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self._attached:
            raise S2RegError(f"an adapter is already attached as {name!r} (detach it first)")
        loaded = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
        source = str(adapter) if not isinstance(adapter, Adapter) else f"<{type(adapter).__name__}>"
        try:
            loaded.verify_base(self._fingerprints)
        except BaseMismatch as exc:
            raise BaseMismatch(f"adapter {name!r} ({source}) does not fit {self.base}: {exc}") from None
        self._attached[name] = Attached(name, source, loaded)
        try:
            self._make_resident(name)
        except BaseException:
            del self._attached[name]
            raise
        return loaded

    def detach(self, name: str) -> None:
        self._require(name)
        self._evict(name)
        del self._attached[name]

    def memory(self) -> dict[str, int]:
        """Bytes of deltas each resident adapter holds (PISA: a dense matrix per target)."""
        return {name: sum(d.nbytes for ds in deltas.values() for d in ds) for name, deltas in self._resident.items()}

    def _require(self, name: str) -> None:
        if name not in self._attached:
            known = ", ".join(self._attached) or "none"
            raise NotAttached(f"no adapter is attached as {name!r} (attached: {known})")

    def _make_resident(self, name: str) -> None:
        if name in self._resident:
            self._resident.move_to_end(name)
            return
        deltas = live_deltas(self._attached[name].adapter, self.model, self._placements, self.source)
        while len(self._resident) >= self.max_resident:
            self._evict(next(iter(self._resident)))
        for module_name, module_deltas in deltas.items():
            module = self.model.get_submodule(module_name)
            ServedModule.of(module, module_name, self._batch).deltas[name] = module_deltas
        self._resident[name] = deltas

    def _evict(self, name: str) -> None:
        deltas = self._resident.pop(name, None)
        for module_name in deltas or ():
            module = self.model.get_submodule(module_name)
            ServedModule.of(module, module_name, self._batch).drop(module, name)

    # -- running -----------------------------------------------------------------------------------
    @contextmanager
    def routed(self, adapters: Sequence[str | None]) -> Iterator[None]:
        """Within the block, every call of the model runs sequence ``i`` with ``adapters[i]`` (None: the base)."""
        if self._batch.routing is not None:
            raise S2RegError("a batch is already running on this server")
        wanted = list(dict.fromkeys(a for a in adapters if a is not None))
        for name in wanted:
            self._require(name)
        if len(wanted) > self.max_resident:
            raise TooManyAdapters(f"a batch uses {len(wanted)} adapters, but at most {self.max_resident} may be resident "
                                  "(raise max_resident or split the batch)")
        for name in wanted:
            self._make_resident(name)
        device = next(self.model.parameters()).device
        self._batch.routing = Routing(adapters, device)
        try:
            yield
        finally:
            self._batch.routing = None

    def forward(self, adapters: Sequence[str | None], **inputs):
        """The model's output for ``inputs`` (a batch), sequence ``i`` under ``adapters[i]``."""
        sizes = {int(v.shape[0]) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()}
        if sizes != {len(adapters)}:
            raise S2RegError(f"a batch of {sorted(sizes)} sequences but {len(adapters)} adapter names: give one per sequence")
        with self.routed(adapters), torch.no_grad():
            return self.model(**inputs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 adapters: Sequence[str | None], max_new_tokens: int = 32, **options) -> torch.Tensor:
        """Greedy ``generate`` (unless ``options`` say otherwise), sequence ``i`` under ``adapters[i]``:
        the prompts followed by their continuations, as transformers returns them."""
        if len(adapters) != input_ids.shape[0]:
            raise S2RegError(f"{input_ids.shape[0]} sequences but {len(adapters)} adapter names: give one per sequence")
        options = {"do_sample": False, **options}
        generate = getattr(self.model, "generate", None)  # a transformers model's; a bare module has none
        if generate is None:
            raise S2RegError(f"a {type(self.model).__name__} cannot generate: serve a transformers causal language model")
        with self.routed(adapters), torch.no_grad():
            return generate(input_ids=input_ids, attention_mask=attention_mask,
                              max_new_tokens=max_new_tokens, **options)
