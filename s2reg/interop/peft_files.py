"""Reading a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ..basename import portable_base_name
from ..errors import FormatError, S2RegError
from ..format import boundedjson, payload
from ..format.arrays import to_torch

PREFIX = "base_model.model."


def architecture(config: dict[str, Any] | None) -> str | None:
    """The transformers model class a checkpoint is for: its config's ``architectures[0]``, or, for a config
    without one (a checkpoint converted from GGUF), the class ``s2reg train`` loads it with: the causal-LM
    Auto class of its ``model_type``, else the masked-LM one (encoders)."""
    architectures = (config or {}).get("architectures") or []
    if architectures:
        return architectures[0]
    from transformers.models.auto import modeling_auto as auto

    model_type = (config or {}).get("model_type")
    if not isinstance(model_type, str):
        return None
    for mapping in (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        if model_type in mapping:
            return mapping[model_type]
    return None


def with_portable_base(adapter, base: str | os.PathLike | None):
    """``(adapter, base)`` for an export read on another machine: the adapter named by its portable base name
    (a Hub id or a directory's name, never a local path), and, when its old name was a local checkpoint and
    no ``base`` is given, that checkpoint as the base (where export reads the base's layout from)."""
    name = adapter.base.name
    portable = portable_base_name(name)
    if portable == name:
        return adapter, base
    if base is None and (Path(name) / "config.json").is_file():
        base = name
    renamed = copy.copy(adapter)
    renamed.base = dataclasses.replace(adapter.base, name=portable)
    return renamed, base


def recorded_base(directory: Path) -> Path:
    """The checkpoint a PEFT adapter names as its base (``base_model_name_or_path``), when that is local.

    PEFT resolves the name as ``from_pretrained`` does: a directory that exists (relative to the
    working directory), else a Hub id, which s2reg does not download.
    """
    name = peft_config(directory).get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise S2RegError(f"{directory}: adapter_config.json names no base model; pass --base CKPT")
    if not (Path(name) / "config.json").is_file():
        raise S2RegError(f"{directory}: its base {name!r} is not a local checkpoint directory; pass --base CKPT")
    return Path(name)


def read_peft(directory: Path, peft_type: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and weights of a PEFT adapter of ``peft_type``; FormatError otherwise."""
    config = peft_config(directory)
    try:
        data = (directory / "adapter_model.safetensors").read_bytes()
    except OSError as exc:
        raise FormatError(f"{directory}: not a readable PEFT adapter ({exc.strerror})") from None
    try:
        arrays, _ = payload.load(data)  # the one strict safetensors reader (FORMAT §6.1)
    except FormatError as exc:
        raise FormatError(f"{directory}/adapter_model.safetensors: {exc}") from None
    if config.get("peft_type") != peft_type:
        raise FormatError(f"{directory}: peft_type is {config.get('peft_type')!r}, not {peft_type}")
    return config, {name: to_torch(array) for name, array in arrays.items()}  # PEFT's factors are torch math here


def peft_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT adapter directory, read within the bounds of FORMAT §3."""
    try:
        data = (directory / "adapter_config.json").read_bytes()
    except OSError:
        raise FormatError(f"{directory}: no readable adapter_config.json") from None
    config = boundedjson.loads(data, what=f"{directory}/adapter_config.json")
    if not isinstance(config, dict):
        raise FormatError(f"{directory}/adapter_config.json is not a JSON object")
    return config
