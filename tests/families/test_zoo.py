"""The zoo builds what the families suite relies on: every family, deterministic, and messy on purpose."""

from __future__ import annotations

import pytest
import torch

from s2reg.tensors import open_source

from . import zoo


def _negative_zeros(source, name: str) -> int:
    tensor = source.get(name)
    return int(((tensor == 0) & torch.signbit(tensor)).sum()) if tensor.is_floating_point() else 0


@pytest.mark.parametrize("name", zoo.NAMES)
def test_every_species_saves_reloads_and_keeps_its_signed_zeros(name, zoo_checkpoint):
    species = zoo.SPECIES[name]
    directory = zoo_checkpoint(name)
    inputs = zoo.example_inputs(species)
    with torch.no_grad():
        fresh, reloaded = zoo.outputs(zoo.build_model(species), inputs), zoo.outputs(zoo.load(species, directory), inputs)
    assert torch.equal(fresh, reloaded) and torch.isfinite(fresh).all()
    with open_source(directory) as source:
        zeros = {n: _negative_zeros(source, n) for n in source.names()}
    holding = {n for n, count in zeros.items() if count}
    assert holding, "no -0.0 in the checkpoint"
    assert all(".0." in n for n in holding), f"-0.0 outside layer 0: {sorted(holding)}"


def test_bert_is_saved_with_and_without_its_prefix(zoo_checkpoint):
    with_prefix = set(zoo.saved_tensors(zoo_checkpoint("bert")))
    bare = set(zoo.saved_tensors(zoo_checkpoint("bert_model")))
    assert "bert.encoder.layer.0.attention.self.query.weight" in with_prefix
    assert "encoder.layer.0.attention.self.query.weight" in bare
    assert not any(n.startswith("bert.") for n in bare)


def test_tied_and_untied_embeddings(zoo_checkpoint):
    assert "lm_head.weight" not in zoo.saved_tensors(zoo_checkpoint("llama"))  # tied: stored once
    assert "lm_head.weight" in zoo.saved_tensors(zoo_checkpoint("mistral"))


def test_builds_are_deterministic():
    species = zoo.SPECIES["qwen2_moe"]
    a, b = zoo.build_model(species).state_dict(), zoo.build_model(species).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
