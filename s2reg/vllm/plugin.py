"""The vLLM plugin: a ``LoRAResolver`` that serves stored s2reg adapters by ``NAME[:TAG]``.

vLLM loads every ``vllm.general_plugins`` entry point in each of its processes; :func:`register` (s2reg's
entry point) only registers :class:`S2RegResolver`, importing nothing beyond vLLM's own resolver module.
vLLM asks the registered resolvers about a request's ``model`` that is neither the base nor a loaded
adapter, when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is set. The resolver then (off the event loop, in a
thread) loads the stored adapter, checks it against the served checkpoint and exports it once
(:mod:`.lora_cache`), and hands vLLM the PEFT LoRA directory; vLLM loads it and remembers the name.

- A name that is not a stored adapter (or not an adapter name at all) gets ``None``: other resolvers may
  know it, else vLLM answers 404 ("does not exist").
- An adapter that cannot be served here (another base, a rank over ``--max-lora-rank``, a PISA adapter whose
  LoRA is over the tolerance) raises vLLM's ``VLLMValidationError``: the request gets a 400 whose message
  says what to change, and the server keeps serving.

Settings (environment): ``S2REG_HOME`` (the store, as everywhere in s2reg); ``S2REG_VLLM_BASE`` (the served
checkpoint directory, when vLLM was given something else, e.g. a Hub id that is not in the Hub cache);
``S2REG_VLLM_MAX_ERROR`` (the largest relative error of an export that is served, default 1e-3);
``S2REG_VLLM_MAX_LORA_RANK`` (the server's ``--max-lora-rank``, when it is not on the command line).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from ..errors import NotFound, RegistryError, S2RegError, one_line
from ..registry import parse_ref

RESOLVER_NAME = "s2reg"


def served_checkpoint(base_model_name: str) -> Path:
    """The checkpoint directory vLLM serves: ``S2REG_VLLM_BASE``, else vLLM's model when it is a directory,
    else that Hub id's snapshot in the Hub cache (where vLLM downloaded it)."""
    chosen = os.environ.get("S2REG_VLLM_BASE") or base_model_name
    if Path(chosen).is_dir():
        return Path(chosen)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(chosen, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a Hub id, or not in the cache: one line that says what to set
        raise S2RegError(f"the served model {chosen!r} is neither a checkpoint directory nor in the Hub cache: "
                         "set S2REG_VLLM_BASE to its directory") from None


def served_max_rank(argv: list[str] | None = None) -> int:
    """The engine's ``--max-lora-rank``: ``S2REG_VLLM_MAX_LORA_RANK``, else the option on the server's command line
    (``argv``, by default this process's: vLLM resolves adapters in its API server process, the one started by
    ``vllm serve``), else vLLM's default.

    vLLM hands a resolver names only and gives a plugin no handle on the running engine's configuration, so the
    option is read where the user gave it.
    A server configured through ``--config FILE`` or from Python needs the environment variable."""
    import argparse
    import sys

    from vllm.engine.arg_utils import EngineArgs

    if os.environ.get("S2REG_VLLM_MAX_LORA_RANK"):
        return int(os.environ["S2REG_VLLM_MAX_LORA_RANK"])
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--max-lora-rank", "--max_lora_rank", type=int, default=EngineArgs.max_lora_rank)
    return parser.parse_known_args(sys.argv[1:] if argv is None else argv)[0].max_lora_rank


def rank_advice(rank: int) -> str:
    """``--max-lora-rank`` with the smallest value vLLM accepts that holds ``rank``."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    fitting = [r for r in get_args(MaxLoRARanks) if r >= rank]
    if not fitting:
        return f"a LoRA rank vLLM does not take (its largest is {max(get_args(MaxLoRARanks))})"
    return f"vLLM started with --max-lora-rank {fitting[0]}"


class S2RegResolver(LoRAResolver):
    """Resolves ``NAME[:TAG]`` (and ``hf://ORG/REPO[@REV]``) to an exported PEFT LoRA of the stored adapter."""

    def __init__(self):
        self._served = None  # the ServedBase, made on the first request (the engine is configured by then)
        self._lock = threading.Lock()

    def _served_base(self, base_model_name: str):
        from .lora_cache import ServedBase

        with self._lock:
            if self._served is None:
                tolerance = os.environ.get("S2REG_VLLM_MAX_ERROR")  # unset: export_lora's default
                self._served = ServedBase(served_checkpoint(base_model_name), max_rank=served_max_rank(),
                                          max_error=float(tolerance) if tolerance else None, rank_advice=rank_advice)
            return self._served

    def _resolve(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if not lora_name.startswith("hf://"):
            try:
                parse_ref(lora_name)
            except RegistryError:
                return None  # not an adapter name: another resolver's, or nobody's
        try:
            lora = self._served_base(base_model_name).lora_for(lora_name)
        except NotFound:
            return None
        except S2RegError as exc:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(one_line(f"s2reg: {exc}"), parameter="model") from None
        # the id is vLLM's to give (it sets lora_int_id after resolving); 1 is a placeholder it replaces
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(lora.directory))

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        # loading, hashing and exporting read files and compute: keep the server's event loop answering
        return await asyncio.to_thread(self._resolve, base_model_name, lora_name)


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point (called in every vLLM process; registering twice is harmless)."""
    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, S2RegResolver())
