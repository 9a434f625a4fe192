"""Reading a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import FormatError, S2RegError

PREFIX = "base_model.model."


def read_config(directory: Path) -> dict[str, Any]:
    """A PEFT adapter directory's ``adapter_config.json``; FormatError when missing or not a JSON object."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{directory}: not a readable PEFT adapter ({exc})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{directory}: adapter_config.json is not a JSON object")
    return config


def recorded_base(directory: Path) -> Path:
    """The checkpoint a PEFT adapter names as its base (``base_model_name_or_path``), when that is local.

    PEFT resolves the name as ``from_pretrained`` does: a directory that exists (relative to the
    working directory), else a Hub id, which s2reg does not download.
    """
    name = read_config(directory).get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise S2RegError(f"{directory}: adapter_config.json names no base model; pass --base CKPT")
    if not (Path(name) / "config.json").is_file():
        raise S2RegError(f"{directory}: its base {name!r} is not a local checkpoint directory; pass --base CKPT")
    return Path(name)


def read_peft(directory: Path, peft_type: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and weights of a PEFT adapter of ``peft_type``; FormatError otherwise."""
    config = read_config(directory)
    try:
        weights = load_file(directory / "adapter_model.safetensors")
    except (OSError, ValueError) as exc:
        raise FormatError(f"{directory}: not a readable PEFT adapter ({exc})") from None
    if config.get("peft_type") != peft_type:
        raise FormatError(f"{directory}: peft_type is {config.get('peft_type')!r}, not {peft_type}")
    return config, weights
