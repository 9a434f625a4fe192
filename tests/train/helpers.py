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


def zoo_base(name: str, directory):
    """A zoo species' tiny checkpoint with its seeded -0.0 entries made +0.0: a trained -0.0 that becomes
    +0.0 is a real change FORMAT §4.3 cannot store, and random selections may train those units."""
    from ..families import zoo

    species = zoo.SPECIES[name]
    model = zoo.build_model(species)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.0)  # -0.0 + 0.0 == +0.0
    return zoo.save_model(species, model, directory)


def zoo_loss(model, inputs) -> torch.Tensor:
    """A differentiable function of the model's output that every weight moves (float64)."""
    from ..families import zoo

    out = zoo.outputs(model, inputs)
    return (out.double() * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sin().sum()


def trained_zoo_adapter(name: str, base, *, steps: int = 2, lr: float = 0.5, **config):
    """Train a zoo checkpoint with S2FT (every role the family has, unless ``roles`` is given) and export
    the adapter against the checkpoint; returns ``(adapter, trained model)``."""
    from s2reg.tensors import CheckpointSource
    from s2reg.train import S2FTConfig, export_adapter, prepare_s2ft
    from s2reg.train.targets import map_model

    from ..families import zoo

    species = zoo.SPECIES[name]
    model = zoo.load(species, base)
    config.setdefault("roles", map_model(model).info.roles)
    prepare_s2ft(model, S2FTConfig(**{"heads": 1, "channels": 4, "seed": 2, **config}))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        zoo_loss(model, zoo.example_inputs(species, seed=step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    with CheckpointSource(base) as source:
        return export_adapter(model, base=source), model
