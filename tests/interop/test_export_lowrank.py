"""PISA -> LoRA export through the FFT operator and a randomized SVD, against float64 dense references.

References: the dense delta is built here in numpy straight from FORMAT §5.3 (Hermitian extension, inverse DFT,
real part, crop), and the optimal rank-r error is numpy's SVD of it (Eckart-Young); PEFT itself merges the
exported LoRA.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import s2reg
from s2reg.format.pisa import PISATarget, grid_of, half_width, self_conjugate_columns
from s2reg.format.pisa_fft import pisa_top_k
from s2reg.interop import export_lora
from s2reg.interop.peft_files import PREFIX
from s2reg.interop.pisa_lowrank import ToleranceError, one_thread, pisa_low_rank, relative_error
from s2reg.interop.pisa_operator import PISAOperator
from s2reg.tensors import CheckpointSource

from ..surgery.helpers import model_of, pisa, tiny

# The randomized SVD's rank-r error against the optimal rank-r error on these deltas (HMT with two power
# iterations; measured at most 1.03x on flat spectra like PISA's).
OPTIMALITY = 1.1


def spec_dense(target: PISATarget) -> np.ndarray:
    """FORMAT §5.3 in float64, independently of s2reg's kernel: F from S by Hermitian extension, Re(IDFT2(F))."""
    bh, bw = target.block
    gr, gc = grid_of(target.shape, target.block)
    hw = half_width(target.block)
    values = target.coefficients.astype(np.float64)
    values = values[..., 0] + 1j * values[..., 1]
    out = np.zeros((gr * bh, gc * bw))
    for n in range(gr * gc):
        half = np.zeros((bh, hw), dtype=complex)
        half.reshape(-1)[target.indices[n]] = values[n]
        full = np.zeros((bh, bw), dtype=complex)
        full[:, :hw] = half
        for v in range(hw, bw):
            full[:, v] = np.conj(half[(-np.arange(bh)) % bh, bw - v])
        r, c = divmod(n, gc)
        out[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = np.fft.ifft2(full).real * target.scale
    return out[: target.shape[0], : target.shape[1]]


def random_target(shape, block, k, seed=0, scale=0.7) -> PISATarget:
    g = torch.Generator().manual_seed(seed)
    gr, gc = grid_of(shape, block)
    positions = block[0] * half_width(block)
    indices = torch.stack([torch.randperm(positions, generator=g)[:k].sort().values for _ in range(gr * gc)])
    coefficients = torch.randn(gr * gc, k, 2, generator=g)
    target = PISATarget(shape, np.float32, block, indices.numpy(), coefficients.numpy(), scale)
    target.check("t")
    return target


def low_rank_target(shape, block, rank, seed=0) -> PISATarget:
    """A PISA target whose delta is a given rank-``rank`` matrix (every coefficient of every block kept)."""
    g = torch.Generator().manual_seed(seed)
    matrix = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(rank, shape[1], generator=g,
                                                                                          dtype=torch.float64)
    bh, bw = block
    every = bh * half_width(block) - len(self_conjugate_columns(bw)) * ((bh - 1) // 2)  # less the mirrored positions
    indices, values = pisa_top_k(matrix, block, every)
    order = indices.argsort(1)
    indices, values = indices.gather(1, order), values.gather(1, order)
    coefficients = torch.stack([values.real, values.imag], -1).float().numpy()
    target = PISATarget(shape, np.float32, block, indices.numpy(), coefficients, 1.0)
    target.check("t")
    assert np.allclose(spec_dense(target), matrix.numpy(), atol=1e-5 * float(matrix.abs().max()))
    return target


def true_error(target: PISATarget, a, b, transposed=False) -> float:
    dense = spec_dense(target)
    dense = dense.T if transposed else dense
    return float(np.linalg.norm(dense - b.double().numpy() @ a.double().numpy()) / np.linalg.norm(dense))


def optimal_errors(target: PISATarget) -> np.ndarray:
    """``[r = 1 ..]``: the smallest relative error of any rank-r matrix (Eckart-Young, numpy float64 SVD)."""
    s = np.linalg.svd(spec_dense(target), compute_uv=False)
    tail = np.cumsum((s ** 2)[::-1])[::-1]
    return np.sqrt(np.append(tail[1:], 0.0) / tail[0])


@pytest.mark.parametrize("shape, block, k", [((50, 37), (8, 6), 5), ((45, 30), (7, 5), 3), ((33, 70), (16, 16), 140)])
def test_operator_products_equal_the_dense_delta(shape, block, k):
    target = random_target(shape, block, k)
    # non-Hermitian self-conjugate columns (v = 0 and v = bw/2 for even bw): FORMAT takes their Hermitian part
    dense = spec_dense(target)
    assert np.abs(dense - target.to_dense()).max() < 1e-5 * np.abs(dense).max()
    g = torch.Generator().manual_seed(1)
    for transposed in (False, True):
        op = PISAOperator(target, transposed=transposed)
        matrix = dense.T if transposed else dense
        assert op.shape == matrix.shape
        x = torch.randn(matrix.shape[1], 4, generator=g, dtype=torch.float64)
        y = torch.randn(matrix.shape[0], 3, generator=g, dtype=torch.float64)
        np.testing.assert_allclose((op @ x).numpy(), matrix @ x.numpy(), rtol=0, atol=1e-12 * np.abs(matrix).max())
        np.testing.assert_allclose(op.rmatmul(y).numpy(), matrix.T @ y.numpy(), rtol=0, atol=1e-12 * np.abs(matrix).max())
        np.testing.assert_allclose(op.dense().numpy(), matrix, rtol=0, atol=1e-12 * np.abs(matrix).max())
    assert math.isclose(op.squared_norm(), float(np.sum(dense ** 2)), rel_tol=1e-12)


@pytest.mark.parametrize("shape, rank, sketched", [((200, 160), 8, True), ((200, 160), 30, True), ((200, 160), 80, False),
                                                   ((48, 40), 5, False)])
def test_reported_error_is_the_factors_error_and_near_optimal(shape, rank, sketched):
    target = random_target(shape, (16, 16), 24)
    for transposed in (False, True):
        result = pisa_low_rank("t", target, rank=rank, max_error=1.0, transposed=transposed)
        assert result.sketched is sketched and result.rank == rank
        assert result.a.dtype == result.b.dtype == torch.float32
        assert result.a.shape == (rank, shape[0] if transposed else shape[1])
        assert result.b.shape == (shape[1] if transposed else shape[0], rank)
        truth = true_error(target, result.a, result.b, transposed)
        assert math.isclose(result.error, truth, rel_tol=1e-9), (result.error, truth)
        optimal = optimal_errors(target)[rank - 1]
        assert optimal <= truth <= OPTIMALITY * optimal
        if not sketched:  # the dense SVD is the optimum itself, up to the float32 factors' rounding
            assert truth - optimal < 1e-6


def test_error_at_full_rank_is_measured_not_cancelled():
    """||D||^2 - 2<D, BA> + ||BA||^2 is rounding noise near zero: the residual is summed directly there."""
    target = random_target((200, 160), (16, 16), 24)
    result = pisa_low_rank("t", target, rank=160, max_error=1e-3)
    truth = true_error(target, result.a, result.b)
    assert 0 < truth < 1e-6 and math.isclose(result.error, truth, rel_tol=1e-6)
    # the closed form on its own, at an error well above rounding, against the dense reference
    op = PISAOperator(target)
    a, b = result.a[:40], result.b[:, :40]
    assert math.isclose(relative_error(op, a, b, op.squared_norm()), true_error(target, a, b), rel_tol=1e-9)


def test_auto_rank_finds_a_low_true_rank():
    target = low_rank_target((200, 160), (16, 16), rank=6)
    result = pisa_low_rank("t", target, rank=None)
    assert result.sketched and result.rank == 6
    assert result.error < 1e-5 and math.isclose(result.error, true_error(target, result.a, result.b), rel_tol=1e-6)


@pytest.mark.parametrize("shape, max_error, sketched", [
    ((200, 160), 0.8, True),     # found in the first sketch
    ((400, 320), 0.8, True),     # past the first sketch: a wider one
    ((200, 160), 1e-3, False),   # near full rank: the dense SVD
])
def test_auto_rank_is_the_smallest_meeting_the_tolerance(shape, max_error, sketched):
    target = random_target(shape, (16, 16), 24)
    optimal = optimal_errors(target)
    result = pisa_low_rank("t", target, rank=None, max_error=max_error)
    smallest = int(np.argmax(optimal <= max_error)) + 1
    assert result.sketched is sketched
    assert result.error <= max_error and math.isclose(result.error, true_error(target, result.a, result.b), rel_tol=1e-6)
    if sketched:  # the sketch's rank-r error is within OPTIMALITY of the optimum, so its rank is close to it
        assert smallest <= result.rank <= smallest + 4
    else:
        assert result.rank == smallest
        assert pisa_low_rank("t", target, rank=smallest - 1, max_error=1.0).error > max_error


def test_over_the_tolerance_refuses_naming_the_error_and_the_rank_that_meets_it():
    target = random_target((200, 160), (16, 16), 24)
    optimal = optimal_errors(target)
    smallest = int(np.argmax(optimal <= 1e-3)) + 1
    with pytest.raises(ToleranceError) as refused:
        pisa_low_rank("layer.w", target, rank=16)
    message = str(refused.value)
    assert "\n" not in message
    reached = pisa_low_rank("t", target, rank=16, max_error=1.0).error
    assert message == (f"layer.w: a rank-16 LoRA reaches relative error {reached:.3g}, over the tolerance 0.001; "
                       f"rank {smallest} meets it (leave the rank unset to pick the smallest per target)")
    below_rounding = r"^layer.w: a rank-160 LoRA reaches relative error \S+, over the tolerance 1e-12; the rounding of"
    with pytest.raises(ToleranceError, match=below_rounding):
        pisa_low_rank("layer.w", target, rank=None, max_error=1e-12)
    with pytest.raises(s2reg.errors.S2RegError, match="tolerance must be a number >= 0"):
        pisa_low_rank("layer.w", target, rank=None, max_error=float("nan"))


def test_zero_delta_exports_as_a_zero_rank_one_lora():
    target = random_target((40, 40), (8, 8), 3)
    target.coefficients[:] = 0
    result = pisa_low_rank("t", target, rank=None)
    assert (result.rank, result.error) == (1, 0.0) and not result.a.any() and not result.b.any()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("lowrank") / "base", dtype=torch.float32)


def test_peft_merges_the_exported_lora_to_base_plus_the_factors(base, tmp_path):
    from peft import PeftModel

    adapter = pisa(base, k=6, roles=("v", "down"))
    calls = []
    report = export_lora(adapter, tmp_path / "lora", rank=3, max_error=1.0,
                         progress=lambda done, total, name: calls.append((done, total, name)))
    assert calls == [(i + 1, len(adapter.targets), name) for i, name in enumerate(adapter.targets)]
    assert set(report.rank.values()) == {3} and report.max_error == 1.0
    factors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    merged = PeftModel.from_pretrained(model_of(base, torch.float32), tmp_path / "lora").merge_and_unload().state_dict()
    with CheckpointSource(base) as source:
        for name in source.names():
            weight = source.get(name).double()
            if name in adapter.targets:
                module = f"{PREFIX}{name.removesuffix('.weight')}"
                b, a = factors[f"{module}.lora_B.weight"].double(), factors[f"{module}.lora_A.weight"].double()
                expected = weight + b @ a
                assert math.isclose(report.relative_error[name],
                                    true_error(adapter.targets[name], a.float(), b.float()), rel_tol=1e-9)
            else:
                expected = weight
            torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6, msg=name)


def test_export_picks_ranks_per_target_refuses_before_writing_and_is_deterministic(base, tmp_path):
    adapter = pisa(base, k=6, roles=("v", "down"))
    with pytest.raises(ToleranceError, match=r"a rank-2 LoRA reaches relative error .*, over the tolerance 0.001; rank \d+"):
        export_lora(adapter, tmp_path / "refused", rank=2)
    assert not (tmp_path / "refused").exists()
    first = export_lora(adapter, tmp_path / "auto", max_error=0.05)
    second = export_lora(adapter, tmp_path / "again", max_error=0.05)
    assert first.max_relative_error <= 0.05 and first.max_rank == max(first.rank.values())
    for name, target in adapter.targets.items():
        assert first.rank[name] == int(np.argmax(optimal_errors(target) <= 0.05)) + 1  # small: the dense SVD
    assert ((tmp_path / "auto" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "again" / "adapter_model.safetensors").read_bytes())
    assert first == dataclasses.replace(second, output=first.output)


def test_one_thread_is_per_thread_and_restored():
    """An export runs torch on one thread, in its own thread only (a server's other threads keep theirs), and
    gives the count back when it ends, refused or not."""
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    target = random_target((200, 160), (16, 16), 24)
    inside, release, seen = threading.Barrier(2), threading.Event(), []

    def export():
        with one_thread():
            seen.append(torch.get_num_threads())
            inside.wait()
            release.wait()
            pisa_low_rank("t", target, rank=8, max_error=1.0)

    worker = threading.Thread(target=export)
    try:
        worker.start()
        inside.wait()
        assert seen == [1] and torch.get_num_threads() == 2
        release.set()
        worker.join()
        with pytest.raises(ToleranceError):
            pisa_low_rank("t", target, rank=8)
        assert torch.get_num_threads() == 2
    finally:
        release.set()
        torch.set_num_threads(before)


def test_the_cli_refuses_over_max_error_in_one_line_and_exports_within_it(base, tmp_path):
    import json

    from click.testing import CliRunner

    from s2reg.cli import main

    pisa(base, k=6, roles=("v", "down")).save(tmp_path / "adapter")
    run = CliRunner().invoke
    refused = run(main, ["export", str(tmp_path / "adapter"), "-o", str(tmp_path / "refused"), "--rank", "2"])
    assert refused.exit_code == 1 and "over the tolerance 0.001" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "refused").exists()
    loose = run(main, ["export", str(tmp_path / "adapter"), "-o", str(tmp_path / "loose"), "--max-error", "0.05",
                       "--json"])
    assert loose.exit_code == 0, loose.output
    report = json.loads(loose.stdout)
    assert report["max_error"] == 0.05 and report["max_relative_error"] <= 0.05
