"""Coupled structures per architecture: which tensors belong to which head or FFN channel.

S2FT selects attention heads and FFN channels. A head ``h`` owns rows ``h*hd .. h*hd+hd-1`` of
the query (and, through its key/value group, of the key and value) projections and the same
columns of the output projection; an FFN channel ``c`` owns row ``c`` of the up and gate
projections and column ``c`` of the down projection. This module maps tensor names of each
supported family to those roles, so nothing else in s2reg hard-codes one naming scheme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import S2RegError

# role -> (axis on which a head/channel is a slice, unit)
ROLES: dict[str, tuple[str, str]] = {
    "q": ("rows", "head"),
    "k": ("rows", "kv_head"),
    "v": ("rows", "kv_head"),
    "o": ("columns", "head"),
    "up": ("rows", "channel"),
    "gate": ("rows", "channel"),
    "down": ("columns", "channel"),
}


@dataclass(frozen=True)
class Architecture:
    """Tensor-name templates (``{i}`` is the layer) of one model family's coupled projections."""

    family: str
    model_types: tuple[str, ...]
    templates: dict[str, str]

    def _patterns(self) -> dict[str, re.Pattern[str]]:
        return {
            role: re.compile(re.escape(t).replace(re.escape("{i}"), r"(\d+)") + r"\.(weight|bias)")
            for role, t in self.templates.items()
        }

    def role_of(self, name: str) -> tuple[str, int, str] | None:
        """``(role, layer, "weight"|"bias")`` of a coupled-projection tensor, else None."""
        for role, pattern in self._patterns().items():
            match = pattern.fullmatch(name)
            if match:
                return role, int(match.group(1)), match.group(2)
        return None

    def tensor(self, role: str, layer: int, part: str = "weight") -> str:
        return f"{self.templates[role].format(i=layer)}.{part}"


LLAMA = Architecture(
    "llama",
    ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "smollm3"),
    {
        "q": "model.layers.{i}.self_attn.q_proj",
        "k": "model.layers.{i}.self_attn.k_proj",
        "v": "model.layers.{i}.self_attn.v_proj",
        "o": "model.layers.{i}.self_attn.o_proj",
        "up": "model.layers.{i}.mlp.up_proj",
        "gate": "model.layers.{i}.mlp.gate_proj",
        "down": "model.layers.{i}.mlp.down_proj",
    },
)
BERT = Architecture(
    "bert",
    ("bert", "roberta"),
    {
        "q": "bert.encoder.layer.{i}.attention.self.query",
        "k": "bert.encoder.layer.{i}.attention.self.key",
        "v": "bert.encoder.layer.{i}.attention.self.value",
        "o": "bert.encoder.layer.{i}.attention.output.dense",
        "up": "bert.encoder.layer.{i}.intermediate.dense",
        "down": "bert.encoder.layer.{i}.output.dense",
    },
)
ARCHITECTURES = (LLAMA, BERT)


@dataclass(frozen=True)
class Dims:
    """Head and channel sizes read from a Hugging Face config."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class ModelInfo:
    arch: Architecture
    dims: Dims


def detect(config: dict[str, Any] | None) -> ModelInfo:
    """The architecture and dimensions of a checkpoint from its config.json contents."""
    if not config:
        raise S2RegError("the checkpoint has no config.json, so its heads and channels are unknown; pass --targets")
    model_type = config.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            heads = config["num_attention_heads"]
            hidden = config["hidden_size"]
            return ModelInfo(
                arch,
                Dims(
                    layers=config["num_hidden_layers"],
                    heads=heads,
                    kv_heads=config.get("num_key_value_heads") or heads,
                    head_dim=config.get("head_dim") or hidden // heads,
                    hidden=hidden,
                    intermediate=config["intermediate_size"],
                ),
            )
    known = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise S2RegError(f"unsupported architecture {model_type!r} (known: {known}); name tensors explicitly with --targets")


def find_role(name: str) -> tuple[Architecture, str, int, str] | None:
    """Which family and role a tensor name has, trying every known family."""
    for arch in ARCHITECTURES:
        found = arch.role_of(name)
        if found:
            return (arch, *found)
    return None
