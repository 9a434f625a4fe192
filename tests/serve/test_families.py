"""Every model family x mixed-adapter batches (issue 13): each sequence gets the merged checkpoint's logits.

One table row per family of ``tests/families/zoo.py``. Per row: two S2FT adapters (heads and channels in
every role the family has: gathers, scatters and, for MoE families, fused expert tensors; one on
layer 0, where the zoo's ``-0.0`` entries force restore lists, one on every layer) and one PISA adapter,
served in one batch with base rows. The reference for each sequence is independent of the server:
``s2reg.merge`` writes the checkpoint with that adapter merged and transformers loads it.
"""

from __future__ import annotations

import pytest
import torch

import s2reg
from s2reg.serve import AdapterServer

from ..families import zoo
from ..families.test_invariants import assert_same_logits, logits_of
from .builders import build_pisa, build_s2ft

ROWS = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in zoo.NAMES]
ROUTING = ["s2ft-a", None, "pisa", "s2ft-b", "s2ft-a"]
NEW_TOKENS = 4


def batch_inputs(species: zoo.Species) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if species.inputs == "pixels":
        size = species.make_config().image_size
        return {"pixel_values": torch.randn(len(ROUTING), 3, size, size, generator=generator)}
    return {"input_ids": torch.randint(3, zoo.VOCAB - 3, (len(ROUTING), zoo.SEQ), generator=generator)}


def state_bytes(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow  # over 20 s on 2 cores: outside the quick subset (README)
@pytest.mark.parametrize("name", ROWS)
def test_mixed_batch_equals_merged_checkpoints(name, zoo_checkpoint, tmp_path):
    species = zoo.SPECIES[name]
    base = zoo_checkpoint(name)
    adapters = {"s2ft-a": build_s2ft(name, base, 7, [0]), "s2ft-b": build_s2ft(name, base, 11, None),
                "pisa": build_pisa(name, base, 3)}
    assert any(getattr(t, "restore", None) is not None for t in adapters["s2ft-a"].targets.values())
    inputs = batch_inputs(species)
    references = {None: zoo.load(species, base)}
    for key, adapter in adapters.items():
        s2reg.merge(base, [adapter], tmp_path / key)
        references[key] = zoo.load(species, tmp_path / key)
    expected = {key: logits_of(model, inputs) for key, model in references.items()}
    scale = float(expected[None].abs().max())
    for key in adapters:  # a server that ignored an adapter would fail below
        assert float((expected[key] - expected[None]).abs().max()) > 1e-3 * scale, f"{key} changes nothing"

    model = zoo.load(species, base)
    before = state_bytes(model)
    with AdapterServer(model, base) as server:
        for key, adapter in adapters.items():
            server.attach(key, adapter)
        with server.routed(ROUTING), torch.no_grad():
            served = zoo.outputs(model, inputs)
        for row, key in enumerate(ROUTING):
            assert_same_logits(served[row], expected[key][row])
        if species.objective == "causal":
            generated = server.generate(inputs["input_ids"], torch.ones_like(inputs["input_ids"]), adapters=ROUTING,
                                        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            for row, key in enumerate(ROUTING):
                reference = references[key].generate(input_ids=inputs["input_ids"][row:row + 1], do_sample=False,
                                                     attention_mask=torch.ones_like(inputs["input_ids"][row:row + 1]),
                                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
                assert generated[row].tolist() == reference[0].tolist(), f"row {row} ({key})"
    after = model.state_dict()  # bit for bit: the zoo's -0.0 entries must stay -0.0
    assert all(torch.equal(after[k].contiguous().view(torch.uint8), v.contiguous().view(torch.uint8))
               for k, v in before.items()), "serving changed the base weights"
    assert not any(hasattr(m, "s2reg_served") for m in model.modules())
