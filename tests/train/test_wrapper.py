"""Training layers wrap modules (peft's way): nothing is patched onto the model's own modules, and
unwrapping gives them back.

The reference is the untouched model itself (a deep copy taken before preparing): its modules, its
state dict and its logits, which the unwrapped model must reproduce bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

from s2reg.errors import S2RegError
from s2reg.train import PISAConfig, S2FTConfig, prepare_pisa, prepare_s2ft
from s2reg.train.pisa.layer import PISALinear
from s2reg.train.s2ft.experts import S2FTExperts
from s2reg.train.s2ft.layer import S2FTLinear
from s2reg.train.wrapper import TrainingWrapper, unwrap

from ..families import zoo
from .helpers import tiny_model, zoo_loss

CASES = {  # method -> (build the model, prepare it, the wrapper classes it must use)
    "s2ft": (lambda tmp: tiny_model(tmp, dtype=torch.float32)[0],
             lambda m: prepare_s2ft(m, S2FTConfig(heads=1, channels=4, roles=("q", "o", "up", "down"), seed=1)),
             {S2FTLinear}),
    "s2ft-moe": (lambda tmp: zoo.build_model(zoo.SPECIES["mixtral"]).float(),
                 lambda m: prepare_s2ft(m, S2FTConfig(heads=1, channels=2, roles=("o", "gate", "up", "down"))),
                 {S2FTLinear, S2FTExperts}),
    "pisa": (lambda tmp: tiny_model(tmp, dtype=torch.float32)[0],
             lambda m: prepare_pisa(m, PISAConfig(block=16, coefficients=4, seed=1)),
             {PISALinear}),
}


def _inputs(model) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids}


def _train(model) -> None:
    """Two SGD steps, so the wrappers hold values different from the base weights."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        zoo_loss(model, {"input_ids": _inputs(model)["input_ids"].roll(step)}).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method", list(CASES))
def test_prepare_wraps_the_trained_modules_and_unwrap_gives_the_originals_back(tmp_path, method):
    build, prepare, kinds = CASES[method]
    model = build(tmp_path / "base")
    untouched = copy.deepcopy(model)
    modules = dict(model.named_modules())
    prepared = prepare(model)

    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, TrainingWrapper)}
    assert {type(m) for m in wrappers.values()} == kinds
    # each wrapper sits where its module was, holds that very module, and keeps the parameter names
    assert all(w.base_layer is modules[n] for n, w in wrappers.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(prepared.parameters)
    assert all(n.rpartition(".")[0] in wrappers for n in prepared.parameters)
    # nothing is set on an instance: every module runs its class's forward
    assert not [n for n, m in model.named_modules() if "forward" in vars(m)]
    # the model reads the wrapped modules' weights under their own names
    for name in wrappers:
        for weight in wrappers[name].trained_weights():
            assert model.get_parameter(f"{name}.{weight}") is modules[name].get_parameter(weight)

    _train(model)
    assert not torch.equal(model(**_inputs(model)).logits, untouched(**_inputs(model)).logits)
    unwrap(model)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert not hasattr(model, "s2reg_prepared")
    state, original = model.state_dict(), untouched.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    with torch.no_grad():
        assert torch.equal(model(**_inputs(model)).logits, untouched(**_inputs(model)).logits)


def test_a_prepared_model_is_not_prepared_again(tmp_path):
    model = tiny_model(tmp_path / "base", dtype=torch.float32)[0]
    prepare_pisa(model, PISAConfig(block=16, coefficients=4, targets=["q_proj"]))
    for prepare in (lambda: prepare_pisa(model, PISAConfig()), lambda: prepare_s2ft(model, S2FTConfig())):
        with pytest.raises(S2RegError, match=r"already prepared for training \(model\.layers\.0\.self_attn\.q_proj "
                                             r"is a PISALinear\): s2reg\.train\.wrapper\.unwrap"):
            prepare()
    unwrap(model)
    prepare_s2ft(model, S2FTConfig(heads=1))  # its own layers again
