"""Deterministic random checkpoints in the Hugging Face layout (the tiny fixtures, and big ones
for benchmarks).

Each tensor is drawn from its own generator, seeded from the model seed and the tensor name, and
written as soon as it is drawn: the same arguments give the same bytes, and a checkpoint of many
GB is built in the memory of one tensor. Two families, so nothing in s2reg hard-codes one naming:
``llama`` (GQA, gated FFN; loads as ``LlamaForCausalLM``) and ``bert`` (biases, no gate; loads as
``BertForMaskedLM``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import S2RegError
from .tensors.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    TensorSpec,
    plan_shards,
    write_checkpoint,
)

LLAMA_DEFAULTS: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
BERT_DEFAULTS: dict[str, Any] = {
    "architectures": ["BertForMaskedLM"],
    "model_type": "bert",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}
FAMILIES = {"llama": LLAMA_DEFAULTS, "bert": BERT_DEFAULTS}


def _llama_specs(c: dict[str, Any], dtype: torch.dtype) -> list[TensorSpec]:
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not c.get("tie_word_embeddings"):
        specs.append(("lm_head.weight", (v, h)))
    return [TensorSpec(n, s, dtype) for n, s in specs]


def _bert_specs(c: dict[str, Any], dtype: torch.dtype) -> list[TensorSpec]:
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]

    def linear(prefix: str, out: int, inp: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(prefix + ".weight", (out, inp)), (prefix + ".bias", (out,))]

    def norm(prefix: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(prefix + ".weight", (h,)), (prefix + ".bias", (h,))]

    e = "bert.embeddings."
    specs = [(e + "word_embeddings.weight", (v, h)), (e + "position_embeddings.weight", (c["max_position_embeddings"], h)),
             (e + "token_type_embeddings.weight", (c["type_vocab_size"], h))] + norm(e + "LayerNorm")
    for i in range(c["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        for part in ("query", "key", "value"):
            specs += linear(p + "attention.self." + part, h, h)
        specs += linear(p + "attention.output.dense", h, h) + norm(p + "attention.output.LayerNorm")
        specs += linear(p + "intermediate.dense", f, h) + linear(p + "output.dense", h, f) + norm(p + "output.LayerNorm")
    specs += linear("cls.predictions.transform.dense", h, h) + norm("cls.predictions.transform.LayerNorm")
    specs += [("cls.predictions.bias", (v,))]
    return [TensorSpec(n, s, dtype) for n, s in specs]


def config_for(family: str, **overrides: Any) -> dict[str, Any]:
    """The config.json of a synthetic model of ``family`` with ``overrides`` applied."""
    if family not in FAMILIES:
        raise S2RegError(f"unknown model family {family!r} (choose from {', '.join(FAMILIES)})")
    return {**FAMILIES[family], **overrides}


def tensor_specs(config: dict[str, Any], dtype: torch.dtype) -> list[TensorSpec]:
    return (_llama_specs if config["model_type"] == "llama" else _bert_specs)(config, dtype)


def is_projection(spec: TensorSpec) -> bool:
    """A linear layer's weight matrix (attention and FFN projections), not an embedding table or the LM head."""
    return len(spec.shape) == 2 and spec.name.endswith(".weight") and not any(
        part in spec.name for part in ("embed", "lm_head", "predictions"))


def draw(spec: TensorSpec, seed: int, negative_zeros: float = 0.0) -> torch.Tensor:
    """The deterministic value of one synthetic tensor: norms near 1, biases and weights small.

    ``negative_zeros`` is the fraction of each projection's elements set to ``-0.0`` (at positions
    drawn from the same generator), as in checkpoints dequantised from GGUF; 0 draws none.
    """
    digest = hashlib.sha256(f"{seed}:{spec.name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    values = torch.randn(spec.shape, generator=g, dtype=torch.float32)
    is_norm = "norm" in spec.name.lower()
    if is_norm and spec.name.endswith(".weight"):
        values = 1.0 + 0.1 * values
    else:
        values = values * 0.02 if spec.name.endswith(".weight") else values * 0.01
    if negative_zeros and is_projection(spec):
        values[torch.rand(spec.shape, generator=g) < negative_zeros] = -0.0
    return values.to(spec.dtype)


def build_checkpoint(
    out_dir: str | os.PathLike,
    family: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = True,
    progress=lambda _: None,
    negative_zeros: float = 0.0,
    **overrides: Any,
) -> Path:
    """Write a deterministic random ``family`` checkpoint (config.json + safetensors) to ``out_dir``.

    ``overrides`` change config fields (``num_hidden_layers=4``, ``hidden_size=2048``, ...);
    ``negative_zeros`` puts that fraction of ``-0.0`` values into every projection (see :func:`draw`).
    """
    config = config_for(family, **overrides)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    specs = tensor_specs(config, dtype)
    files = {"config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
    shards = plan_shards(specs, max_shard_bytes)
    metadata = {file: {"format": "pt"} for file in shards}
    return write_checkpoint(out_dir, shards, lambda spec: draw(spec, seed, negative_zeros), metadata=metadata, extra_files=files,
                            overwrite=overwrite, progress=progress)
