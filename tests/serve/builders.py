"""Adapters for the serving tests, built the way ``s2reg train`` builds them (random instead of trained values)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from s2reg.tensors import open_source
from s2reg.train import export_adapter, prepare_pisa, prepare_s2ft

from ..families import zoo
from ..families.test_invariants import info_of, pisa_config, s2ft_config


def build_s2ft(name: str, base: Path, seed: int, layers: list[int] | None):
    model = zoo.load(name, base)
    config = dataclasses.replace(s2ft_config(info_of(base), layers), seed=seed)
    prepared = prepare_s2ft(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in prepared.parameters.values():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.05)
    with open_source(base) as source:
        return export_adapter(model, base=source, base_name=str(base))


def build_pisa(name: str, base: Path, seed: int):
    model = zoo.load(name, base)
    prepared = prepare_pisa(model, pisa_config(zoo.SPECIES[name]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in prepared.parameters.values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2)
    with open_source(base) as source:
        return export_adapter(model, base=source, base_name=str(base))
