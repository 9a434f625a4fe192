"""Reconstruction against independent references, and exactness of S2FT merge (FORMAT §4.3-§5.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from s2reg import PISAAdapter, S2FTAdapter
from s2reg.errors import FormatError
from s2reg.format import exact_difference
from s2reg.format.s2ft import add_exact

from .helpers import random_half_plane_indices

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.dtype])


def reference_pisa(shape, block, indices, coefficients, scale) -> np.ndarray:
    """FORMAT §5.3 read literally, in float64: Hermitian extension, then Re(IDFT2) as a DFT sum."""
    bh, bw = block
    hw = bw // 2 + 1
    gr, gc = -(-shape[0] // bh), -(-shape[1] // bw)
    x = np.arange(bh)[:, None]
    y = np.arange(bw)[None, :]
    out = np.zeros((gr * bh, gc * bw))
    for n in range(gr * gc):
        half = np.zeros((bh, hw), dtype=np.complex128)
        for j, pos in enumerate(indices[n]):
            half[pos // hw, pos % hw] = coefficients[n, j]
        full = np.zeros((bh, bw), dtype=np.complex128)
        for u in range(bh):
            for v in range(bw):
                full[u, v] = half[u, v] if v < hw else np.conj(half[(-u) % bh, bw - v])
        block_values = np.zeros((bh, bw), dtype=np.complex128)
        for u in range(bh):
            for v in range(bw):
                if full[u, v] != 0:
                    block_values += full[u, v] * np.exp(2j * np.pi * (u * x / bh + v * y / bw))
        r, c = divmod(n, gc)
        out[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw] = scale * block_values.real / (bh * bw)
    return out[: shape[0], : shape[1]]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 20),
    bh=st.integers(1, 8),
    bw=st.integers(1, 9),
    k_fraction=st.floats(0.05, 1.0),
    scale=st.floats(-4, 4, allow_nan=False),
    seed=st.integers(0, 2**16),
)
def test_pisa_to_dense_matches_float64_reference(rows, cols, bh, bw, k_fraction, scale, seed):
    """FORMAT §5.3, including non-multiple sides (pad and crop) and odd/even block widths."""
    g = torch.Generator().manual_seed(seed)
    positions = bh * (bw // 2 + 1)
    k = max(1, int(k_fraction * positions))
    blocks = -(-rows // bh) * -(-cols // bw)
    idx = random_half_plane_indices(blocks, k, (bh, bw), g)
    values = torch.complex(torch.randn(blocks, k, generator=g), torch.randn(blocks, k, generator=g))
    base = {"w": torch.zeros(rows, cols)}
    adapter = PISAAdapter.from_coefficients(base, {"w": ((bh, bw), idx, values)}, base_name="b", scale=scale)
    target = adapter.targets["w"]
    expected = reference_pisa(
        (rows, cols), (bh, bw), target.indices.numpy(), target.complex_coefficients().numpy().astype(np.complex128), scale
    )
    got = adapter.to_dense("w").double().numpy()
    assert got.shape == (rows, cols)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(expected).max()))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 24),
    cols=st.integers(1, 24),
    bh=st.integers(1, 8),
    bw=st.integers(1, 9),
    k_fraction=st.floats(0.0, 1.0),
    scale=st.floats(-4, 4, allow_nan=False),
    seed=st.integers(0, 2**16),
)
def test_pisa_norm_from_coefficients_matches_float64_reference(rows, cols, bh, bw, k_fraction, scale, seed):
    """The norm in stats() comes from the coefficients (Parseval, crop sums), never a dense delta.

    Checked against the literal float64 DFT sum, with crops, odd/even widths, non-Hermitian
    self-conjugate columns and both the few-coefficient and the many-coefficient branch.
    """
    g = torch.Generator().manual_seed(seed)
    positions = bh * (bw // 2 + 1)
    k = max(1, int(k_fraction * positions))
    blocks = -(-rows // bh) * -(-cols // bw)
    idx = random_half_plane_indices(blocks, k, (bh, bw), g)
    values = torch.complex(torch.randn(blocks, k, generator=g), torch.randn(blocks, k, generator=g))
    adapter = PISAAdapter.from_coefficients({"w": torch.zeros(rows, cols)}, {"w": ((bh, bw), idx, values)},
                                            base_name="b", scale=scale)
    target = adapter.targets["w"]
    expected = np.linalg.norm(reference_pisa(
        (rows, cols), (bh, bw), target.indices.numpy(), target.complex_coefficients().numpy().astype(np.complex128), scale
    ))
    got = adapter.stats()[0]["delta_norm"]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_pisa_matches_numpy_irfft2_on_hermitian_input():
    """FORMAT §5.3: equals numpy.fft.irfft2 when the self-conjugate columns are Hermitian."""
    bh, bw = 8, 8
    hw = bw // 2 + 1
    positions = [u * hw + v for u in range(bh) for v in range(1, bw // 2)]  # strictly inside the half-plane
    g = torch.Generator().manual_seed(3)
    idx = torch.tensor([positions])
    values = torch.complex(torch.randn(1, len(positions), generator=g), torch.randn(1, len(positions), generator=g))
    adapter = PISAAdapter.from_coefficients({"w": torch.zeros(bh, bw)}, {"w": ((bh, bw), idx, values)}, base_name="b")
    half = np.zeros((bh, hw), dtype=np.complex128)
    for pos, value in zip(positions, values[0].numpy()):
        half[pos // hw, pos % hw] = value
    np.testing.assert_allclose(adapter.to_dense("w").numpy(), np.fft.irfft2(half, s=(bh, bw)), rtol=1e-5, atol=1e-6)


def test_pisa_stores_lower_precision_coefficients():
    g = torch.Generator().manual_seed(4)
    idx = random_half_plane_indices(4, 3, (4, 4), g)
    values = torch.complex(torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g))
    adapter = PISAAdapter.from_coefficients(
        {"w": torch.zeros(8, 8)}, {"w": ((4, 4), idx, values)}, base_name="b", coefficient_dtype=torch.bfloat16
    )
    assert adapter.targets["w"].coefficients.dtype == torch.bfloat16
    assert adapter.to_dense("w").dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    axis=st.sampled_from(["rows", "columns"]),
    dtype=st.sampled_from(FLOATS),
    data=st.data(),
)
def test_s2ft_to_dense_is_a_dense_scatter(rows, cols, axis, dtype, data):
    """FORMAT §4.4 against an independent numpy scatter."""
    length = rows if axis == "rows" else cols
    chosen = sorted(data.draw(st.sets(st.integers(0, length - 1), min_size=1)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    base = {"w": torch.randn(rows, cols, generator=g).to(dtype)}
    shape = (len(chosen), cols) if axis == "rows" else (rows, len(chosen))
    adapter = S2FTAdapter.from_slices(base, {"w": (axis, chosen, torch.randn(shape, generator=g))}, base_name="b")
    target = adapter.targets["w"]
    expected = np.zeros((rows, cols))
    delta = target.delta.double().numpy()
    for j, i in enumerate(chosen):
        if axis == "rows":
            expected[i, :] = delta[j, :]
        else:
            expected[:, i] = delta[:, j]
    np.testing.assert_array_equal(adapter.to_dense("w").double().numpy(), expected)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(FLOATS),
    magnitude=st.sampled_from([1e-6, 1e-3, 1.0, 1e3]),
    spread=st.sampled_from([1e-4, 1e-2, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_exact_difference_merges_and_unmerges_bit_for_bit(dtype, magnitude, spread, seed):
    """FORMAT §4.3: merge(base) == tuned and unmerge(tuned) == base, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(6, 7, generator=g) * magnitude).to(dtype)
    tuned = (base.double() + torch.randn(6, 7, generator=g, dtype=torch.float64) * magnitude * spread).to(dtype)
    tuned[0, 0] = base[0, 0]  # unchanged elements too
    # Underflow can produce -0.0; sign-of-zero flips are refused by design (tested below), so
    # normalise them away here (x + 0.0 turns -0.0 into +0.0 and leaves everything else alone).
    base, tuned = base + 0.0, tuned + 0.0
    assume(bool(torch.isfinite(tuned).all()))  # fp16 overflows at 65504; non-finite is refused (§4.2)
    delta = exact_difference(base, tuned)
    assert delta.dtype in (torch.float32, torch.float64)
    assert torch.equal(bits(add_exact(base, delta)), bits(tuned))
    assert torch.equal(bits(add_exact(tuned, delta, subtract=True)), bits(base))


def test_exact_difference_picks_f32_for_bf16_and_f64_when_needed():
    base = torch.tensor([1.0, 2.0, -3.0]).bfloat16()
    tuned = torch.tensor([1.0078125, 2.0, -2.5]).bfloat16()
    assert exact_difference(base, tuned).dtype == torch.float32
    # A 20-binade jump needs ~29 significant bits: more than F32's 24, fewer than F64's 53.
    wide_base = torch.tensor([1e-6, 1.0]).bfloat16()
    wide_tuned = torch.tensor([1.0, 1.0]).bfloat16()
    assert exact_difference(wide_base, wide_tuned).dtype == torch.float64
    # A 66-binade jump fits no dtype: refused with the tensor's name.
    with pytest.raises(FormatError, match="layer.w: .*exact difference"):
        exact_difference(torch.tensor([1e-20]).bfloat16(), torch.tensor([1.0]).bfloat16(), name="layer.w")


def test_signed_zero_in_base_survives_merge_and_unmerge():
    base = torch.tensor([-0.0, 1.0, -0.0]).bfloat16()
    tuned = torch.tensor([-0.0, 1.5, 0.25]).bfloat16()
    delta = exact_difference(base[:2], tuned[:2])
    assert torch.equal(bits(add_exact(base[:2], delta)), bits(tuned[:2]))
    assert torch.equal(bits(add_exact(tuned[:2], delta, subtract=True)), bits(base[:2]))
    with pytest.raises(FormatError, match="exact difference"):
        exact_difference(base, tuned)  # -0.0 -> 0.25 -> unmerge would give +0.0


def test_from_slices_snaps_deltas_so_unmerge_is_exact():
    """FORMAT §4.3 snapping: arbitrary float deltas become exact differences."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(8, 8, generator=g).bfloat16()}
    raw = torch.randn(8, 3, generator=g) * 1e-3
    adapter = S2FTAdapter.from_slices(base, {"w": ("columns", [0, 2, 5], raw)}, base_name="b")
    target = adapter.targets["w"]
    merged = target.merged_slice(base["w"])
    expected = (base["w"][:, [0, 2, 5]].double() + raw.double()).bfloat16()
    assert torch.equal(bits(merged), bits(expected))
    unmerged = add_exact(merged, target.delta, subtract=True)
    assert torch.equal(bits(unmerged), bits(base["w"][:, [0, 2, 5]]))


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape, block", [((12, 10), (4, 4)), ((13, 9), (5, 3)), ((7, 7), (8, 8))])
def test_pisa_lines_equal_the_dense_delta_there(dim, shape, block):
    """The lines of a PISA delta that an S2FT slice needs come from the blocks holding them only."""
    g = torch.Generator().manual_seed(7)
    blocks = -(-shape[0] // block[0]) * -(-shape[1] // block[1])
    idx = random_half_plane_indices(blocks, 3, block, g)
    values = torch.complex(torch.randn(blocks, 3, generator=g), torch.randn(blocks, 3, generator=g))
    target = PISAAdapter.from_coefficients({"w": torch.zeros(shape)}, {"w": (block, idx, values)}, base_name="b",
                                           scale=0.3).targets["w"]
    selected = torch.tensor([0, 2, shape[dim] - 1])
    assert torch.equal(target.lines(dim, selected, name="w"), target.to_dense().index_select(dim, selected))
