"""PISA training: the block layer's gradients, agreement with the format, export."""

from __future__ import annotations

import pytest
import torch

import s2reg
from s2reg.errors import S2RegError
from s2reg.format.pisa import reconstruct
from s2reg.train import PISAConfig, export_adapter, prepare_pisa
from s2reg.train.pisa.layer import PISALinear, canonical_positions, delta, pisa_linear
from s2reg.format.arrays import to_torch

from .helpers import batch, tiny_model


def test_gradcheck_on_the_block_layer():
    torch.manual_seed(0)
    linear = PISALinear(torch.nn.Linear(20, 12, dtype=torch.float64),  # not multiples of the block: padding and crop
                        (8, 8), 5, scale=3.0, generator=torch.Generator().manual_seed(1))
    coefficients = torch.randn(linear.pisa_coefficients.shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    weight = linear.weight.detach().requires_grad_(True)

    def layer(c, inputs, w):
        return pisa_linear(inputs, w, linear.bias, c, linear.pisa_indices, (8, 8), 3.0)

    assert torch.autograd.gradcheck(layer, (coefficients, x, weight))
    with torch.no_grad():
        linear.pisa_coefficients.copy_(coefficients)
    assert torch.equal(linear(x), layer(coefficients, x, weight))  # the module runs the same function


def test_delta_is_the_format_reconstruction_and_starts_at_zero(tmp_path):
    model, _ = tiny_model(tmp_path / "m", dtype=torch.float32)
    before = model(**batch(model)).logits.detach()
    prepared = prepare_pisa(model, PISAConfig(block=16, coefficients=6, seed=2))
    assert torch.equal(model(**batch(model)).logits, before)  # zero coefficients: the base model
    with torch.no_grad():
        for p in prepared.parameters.values():
            p.normal_()
    adapter = export_adapter(model)
    for name, target in adapter.targets.items():
        module = dict(model.named_modules())[name.removesuffix(".weight")]
        assert torch.equal(to_torch(target.to_dense()), delta(module).detach())
        independent = reconstruct(target.shape, target.block, to_torch(target.indices), target.complex_coefficients().to(torch.complex128),
                                  target.scale, precision=torch.complex128)
        torch.testing.assert_close(to_torch(target.to_dense()).double(), independent, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # over 20 s on 2 cores: outside the quick subset (README)
def test_training_lowers_the_loss_and_export_reproduces_the_model(tmp_path):
    model, base_dir = tiny_model(tmp_path / "m", dtype=torch.float32)
    prepared = prepare_pisa(model, PISAConfig(block=16, coefficients=8))
    optimizer = torch.optim.AdamW(prepared.parameters.values(), lr=0.05)
    data = batch(model, seed=4)
    first = model(**data).loss.item()
    for _ in range(20):
        model(**data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = model(**data)
    assert trained.loss.item() < first
    adapter = export_adapter(model)
    adapter.save(tmp_path / "adapter")
    fresh, _ = tiny_model(tmp_path / "fresh", dtype=torch.float32)
    with s2reg.applied(fresh, s2reg.load(tmp_path / "adapter")):
        torch.testing.assert_close(fresh(**data).logits, trained.logits, rtol=1e-4, atol=1e-5)


def test_positions_are_independent_coefficients():
    positions = canonical_positions((4, 4)).tolist()
    hw = 3
    assert 3 * hw + 0 not in positions and 1 * hw + 0 in positions  # u=3 mirrors u=1 in column v=0
    assert 2 * hw + 0 in positions  # u=2 is its own mirror


def test_explicit_targets_for_unknown_architectures():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    prepared = prepare_pisa(model, PISAConfig(block=4, coefficients=2, targets=("0", "2")))
    assert set(prepared.parameters) == {"0.pisa_coefficients", "2.pisa_coefficients"}
    with pytest.raises(S2RegError, match="no linear module named"):
        prepare_pisa(torch.nn.Sequential(torch.nn.Linear(8, 8)), PISAConfig(targets=("nope",)))
    with pytest.raises(S2RegError, match="--targets"):
        prepare_pisa(torch.nn.Sequential(torch.nn.Linear(8, 8)))
