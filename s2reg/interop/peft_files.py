"""Reading a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import FormatError

PREFIX = "base_model.model."


def read_peft(directory: Path, peft_type: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and weights of a PEFT adapter of ``peft_type``; FormatError otherwise."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        weights = load_file(directory / "adapter_model.safetensors")
    except (OSError, ValueError) as exc:
        raise FormatError(f"{directory}: not a readable PEFT adapter ({exc})") from None
    if config.get("peft_type") != peft_type:
        raise FormatError(f"{directory}: peft_type is {config.get('peft_type')!r}, not {peft_type}")
    return config, weights
