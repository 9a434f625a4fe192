"""Tiny models for training tests (synthetic checkpoints loaded with transformers)."""

from __future__ import annotations

import torch
import transformers

from s2reg.synth import build_checkpoint


def tiny_model(path, family: str = "llama", dtype=torch.float64, seed: int = 0, **overrides):
    directory = build_checkpoint(path, family, dtype=dtype, seed=seed, **overrides)
    cls = transformers.BertForMaskedLM if family == "bert" else transformers.LlamaForCausalLM
    model = cls.from_pretrained(directory, dtype=dtype)
    model.config._name_or_path = "tiny-" + family
    return model.eval(), directory


def batch(model, seed: int = 0, size: int = 2, length: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (size, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}
