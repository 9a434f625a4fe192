"""PISA's default scale makes the coefficients -> delta map an isometry (docs/training.md), for every block
shape a target actually gets (the configured block clipped to the matrix).

The reference is numpy's own inverse real FFT in float64, block by block, and the norms of the two sides.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s2reg.format.pisa import half_width
from s2reg.train import PISAConfig, prepare_pisa

from .helpers import tiny_model


def self_conjugate(position: int, block: tuple[int, int]) -> bool:
    bw = block[1]
    v = position % half_width(block)
    return v == 0 or (bw % 2 == 0 and v == bw // 2)


def numpy_delta(shape, block, indices, coefficients, scale) -> np.ndarray:
    bh, bw = block
    gr, gc = -(-shape[0] // bh), -(-shape[1] // bw)
    full = np.zeros((gr * bh, gc * bw))
    hw = half_width(block)
    for n in range(gr * gc):
        spectrum = np.zeros((bh, hw), dtype=complex)
        for position, (re, im) in zip(indices[n].tolist(), coefficients[n].tolist(), strict=True):
            spectrum[divmod(position, hw)] = re + 1j * im
        r, c = divmod(n, gc)
        full[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = scale * np.fft.irfft2(spectrum, s=(bh, bw))
    return full[:shape[0], :shape[1]]


@pytest.mark.parametrize("block", [16, 64])
def test_a_coefficient_change_moves_the_weight_by_its_own_norm(tmp_path, block):
    model, _ = tiny_model(tmp_path / "m")  # q 64x64, v 32x64: a 64 block is clipped to 32x64 on v
    prepared = prepare_pisa(model, PISAConfig(block=block, coefficients=12, seed=3))
    g = torch.Generator().manual_seed(0)
    shapes = set()
    for name, parameter in prepared.parameters.items():
        module = model.get_submodule(name.rpartition(".")[0])
        values = torch.randn(parameter.shape, generator=g, dtype=torch.float64)
        keep = torch.tensor([[not self_conjugate(p, module.pisa_block) for p in row] for row in module.pisa_indices.tolist()])
        values = values * keep[..., None]
        assert module.pisa_scale == math.sqrt(module.pisa_block[0] * module.pisa_block[1] / 2)
        delta = numpy_delta(tuple(module.weight.shape), module.pisa_block, module.pisa_indices, values, module.pisa_scale)
        assert np.linalg.norm(delta) == pytest.approx(float(values.norm()), rel=1e-12)
        shapes.add(module.pisa_block)
    assert len(shapes) == (2 if block == 64 else 1)


def test_an_explicit_scale_is_kept(tmp_path):
    model, _ = tiny_model(tmp_path / "m")
    prepare_pisa(model, PISAConfig(block=16, coefficients=4, scale=0.25))
    assert {m.pisa_scale for m in model.modules() if hasattr(m, "pisa_scale")} == {0.25}
