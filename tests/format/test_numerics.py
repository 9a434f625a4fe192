"""Reconstruction against independent references, and exactness of S2FT merge (FORMAT §4.3-§5.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from s2reg import PISAAdapter, S2FTAdapter
from s2reg.errors import NonFiniteError
from s2reg.format import dtypes, exact_difference
from s2reg.format.arrays import as_array, to_torch
from s2reg.format.s2ft import add_exact

from .helpers import random_half_plane_indices

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def T(x):
    """A library result (numpy) as torch, so the torch-built expectations compare with it."""
    return to_torch(x) if isinstance(x, np.ndarray) else x


def bits(t) -> torch.Tensor:
    t = T(t)
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


def random_pisa(rows, cols, bh, bw, k_fraction, scale, seed):
    """A random one-target PISA adapter ``w`` and its dense delta by the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    positions = bh * (bw // 2 + 1)
    k = max(1, int(k_fraction * positions))
    blocks = -(-rows // bh) * -(-cols // bw)
    idx = random_half_plane_indices(blocks, k, (bh, bw), g)
    values = torch.complex(torch.randn(blocks, k, generator=g), torch.randn(blocks, k, generator=g))
    adapter = PISAAdapter.from_coefficients({"w": torch.zeros(rows, cols)}, {"w": ((bh, bw), idx, values)},
                                            base_name="b", scale=scale)
    target = adapter.targets["w"]
    return adapter, reference_pisa(
        (rows, cols), (bh, bw), target.indices, target.complex_coefficients().numpy().astype(np.complex128), scale
    )


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
    adapter, expected = random_pisa(rows, cols, bh, bw, k_fraction, scale, seed)
    got = adapter.to_dense("w").astype(np.float64)
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
    adapter, dense = random_pisa(rows, cols, bh, bw, k_fraction, scale, seed)
    expected = np.linalg.norm(dense)
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
    for pos, value in zip(positions, values[0].numpy(), strict=True):
        half[pos // hw, pos % hw] = value
    np.testing.assert_allclose(adapter.to_dense("w"), np.fft.irfft2(half, s=(bh, bw)), rtol=1e-5, atol=1e-6)


def test_pisa_stores_lower_precision_coefficients():
    g = torch.Generator().manual_seed(4)
    idx = random_half_plane_indices(4, 3, (4, 4), g)
    values = torch.complex(torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g))
    adapter = PISAAdapter.from_coefficients(
        {"w": torch.zeros(8, 8)}, {"w": ((4, 4), idx, values)}, base_name="b", coefficient_dtype=torch.bfloat16
    )
    assert dtypes.name_of(adapter.targets["w"].coefficients.dtype) == "BF16"
    assert adapter.to_dense("w").dtype == np.float32


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
    delta = target.delta.astype(np.float64)
    for j, i in enumerate(chosen):
        if axis == "rows":
            expected[i, :] = delta[j, :]
        else:
            expected[:, i] = delta[:, j]
    np.testing.assert_array_equal(adapter.to_dense("w").astype(np.float64), expected)


def _from_bits(values: list[int], dtype: torch.dtype) -> torch.Tensor:
    signed = _BITS[dtype]
    width = torch.iinfo(signed).bits
    wrapped = [v - (1 << width) if v >= 1 << (width - 1) else v for v in values]
    return torch.tensor(wrapped, dtype=signed).view(dtype)


def _stored_round_trip(base: torch.Tensor, tuned: torch.Tensor, tmp_path=None):
    """Merge and unmerge through an adapter built from ``tuned`` (FORMAT §4.3), optionally saved and loaded again."""
    adapter = S2FTAdapter.from_tuned({"w": base[None, :]}, {"w": ("rows", [0], tuned[None, :])}, base_name="b")
    target = adapter.targets["w"]
    merged = target.merged(base[None, :])[0]
    return adapter, target, merged, target.merged(merged[None, :], subtract=True)[0]


def _check_exact_pairs(base_bits: list[int], tuned_bits: list[int], dtype: torch.dtype) -> None:
    """FORMAT §4.3 for arbitrary bit patterns: merge gives the tuned bits, unmerge the base bits, both compared as integers."""
    base, tuned = _from_bits(base_bits, dtype), _from_bits(tuned_bits, dtype)
    _, target, merged, unmerged = _stored_round_trip(base, tuned)
    assert bits(merged).tolist() == bits(tuned).tolist()
    assert bits(unmerged).tolist() == bits(base).tolist()
    assert bool(np.isfinite(target.delta).all())
    # The restore list holds only elements the arithmetic rule gets wrong (FORMAT §4.3), never unchanged ones.
    if target.restore is not None:
        listed = target.restore.index.tolist()
        assert all(base_bits[i] != tuned_bits[i] for i in listed)
        arithmetic = add_exact(as_array(base), target.delta[0])
        back = add_exact(as_array(tuned), target.delta[0], subtract=True)  # numpy results; bits() compares them as torch
        assert all(bits(arithmetic)[i] != bits(tuned)[i] or bits(back)[i] != bits(base)[i] for i in listed)


def _usable(dtype: torch.dtype, base_bits: list[int], tuned_bits: list[int]) -> list[int]:
    """Tuned patterns, with non-finite ones (refused unless equal to the base, FORMAT §4.2) replaced by the base's."""
    tuned = _from_bits(tuned_bits, dtype)
    return [t if bool(torch.isfinite(tuned[i])) else b for i, (b, t) in enumerate(zip(base_bits, tuned_bits, strict=True))]


SPECIAL_16 = {  # +-0, smallest/largest subnormal, smallest normal, 1.0, largest finite, +-inf, a NaN
    torch.bfloat16: [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x3F80, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0],
    torch.float16: [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00],
}


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16]), data=st.data())
def test_every_16_bit_pattern_pair_merges_and_unmerges_bit_for_bit(dtype, data):
    """All bf16/fp16 bit patterns as base (signed zeros, subnormals, infinities, NaN) and every finite one as tuned."""
    pattern = st.one_of(st.integers(0, 0xFFFF), st.sampled_from(SPECIAL_16[dtype]))
    base_bits = data.draw(st.lists(pattern, min_size=1, max_size=24))
    tuned_bits = _usable(dtype, base_bits, data.draw(st.lists(pattern, min_size=len(base_bits), max_size=len(base_bits))))
    _check_exact_pairs(base_bits, tuned_bits, dtype)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_fp32_bit_pattern_pair_merges_and_unmerges_bit_for_bit(data):
    special = [0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x00800000, 0x3F800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000,
               0xFF800000, 0x7FC00000]
    pattern = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from(special))
    base_bits = data.draw(st.lists(pattern, min_size=1, max_size=24))
    tuned_bits = _usable(torch.float32, base_bits, data.draw(st.lists(pattern, min_size=len(base_bits), max_size=len(base_bits))))
    _check_exact_pairs(base_bits, tuned_bits, torch.float32)


@pytest.mark.slow  # over 20 s on 2 cores: outside the quick subset (README)
def test_exhaustive_bf16_changes_of_signed_zeros_and_subnormals():
    """Every bf16 pattern against the ones where the arithmetic alone fails most: -0.0, +0.0, the tiniest subnormals."""
    every = list(range(0x10000))
    for special in (0x8000, 0x0000, 0x0001, 0x8001):
        tuned = _usable(torch.bfloat16, [special] * len(every), every)
        _check_exact_pairs([special] * len(every), tuned, torch.bfloat16)
        _check_exact_pairs(tuned, [special] * len(every), torch.bfloat16)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(FLOATS),
    magnitude=st.sampled_from([1e-6, 1e-3, 1.0, 1e3]),
    spread=st.sampled_from([1e-4, 1e-2, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_exact_difference_merges_and_unmerges_bit_for_bit(dtype, magnitude, spread, seed):
    """FORMAT §4.3 on ordinary training-like changes: the arithmetic alone is exact, no restore list is needed."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(6, 7, generator=g) * magnitude).to(dtype)
    tuned = (base.double() + torch.randn(6, 7, generator=g, dtype=torch.float64) * magnitude * spread).to(dtype)
    tuned[0, 0] = base[0, 0]  # unchanged elements too
    # Underflow can produce -0.0, whose sign flips need a restore list (tested above); x + 0.0 turns
    # -0.0 into +0.0 and leaves everything else alone.
    base, tuned = base + 0.0, tuned + 0.0
    assume(bool(torch.isfinite(tuned).all()))  # fp16 overflows at 65504; non-finite is refused (§4.2)
    delta, restore = exact_difference(base, tuned)
    assert restore is None
    delta = T(delta)
    assert delta.dtype in (torch.float32, torch.float64)
    assert torch.equal(delta, tuned.to(delta.dtype) - base.to(delta.dtype))  # the plain difference, as before
    assert torch.equal(bits(add_exact(base, delta)), bits(tuned))
    assert torch.equal(bits(add_exact(tuned, delta, subtract=True)), bits(base))


def test_exact_difference_picks_f32_for_bf16_and_f64_when_needed():
    base = torch.tensor([1.0, 2.0, -3.0]).bfloat16()
    tuned = torch.tensor([1.0078125, 2.0, -2.5]).bfloat16()
    assert exact_difference(base, tuned)[0].dtype == np.float32
    # A 20-binade jump needs ~29 significant bits: more than F32's 24, fewer than F64's 53.
    wide_base = torch.tensor([1e-6, 1.0]).bfloat16()
    wide_tuned = torch.tensor([1.0, 1.0]).bfloat16()
    assert exact_difference(wide_base, wide_tuned)[0].dtype == np.float64
    # A 66-binade jump fits no dtype: that element is listed with its bits, and F32 (the smaller payload) holds the rest.
    delta, restore = exact_difference(torch.tensor([1e-20, 1.0]).bfloat16(), torch.tensor([1.0, 1.5]).bfloat16())
    assert delta.dtype == np.float32 and restore.index.tolist() == [0]
    assert bits(restore.base).tolist() == bits(torch.tensor([1e-20]).bfloat16()).tolist()


def test_signed_zero_flips_are_listed_with_their_bits():
    """The issue's minimal case and its relatives: -0.0 -> 0.5, 0.5 -> -0.0, +0.0 <-> -0.0 (FORMAT §4.3)."""
    base = torch.tensor([-0.0, 0.5, 0.0, -0.0, -0.0, 1.0]).bfloat16()
    tuned = torch.tensor([0.5, -0.0, -0.0, 0.0, -0.0, 1.5]).bfloat16()
    delta, restore = exact_difference(base, tuned)
    assert delta.dtype == np.float32
    assert restore.index.tolist() == [0, 1, 2, 3]
    assert delta.tolist() == [0.5, -0.5, 0.0, 0.0, 0.0, 0.5]  # the value differences, for dense consumers
    assert bits(restore.base).tolist() == bits(base[:4]).tolist()
    assert bits(restore.tuned).tolist() == bits(tuned[:4]).tolist()
    minimal = exact_difference(torch.tensor([-0.0]).bfloat16(), torch.tensor([0.5]).bfloat16())
    assert minimal[1] is not None and minimal[1].index.tolist() == [0]


def test_nonfinite_tuned_values_are_refused_unless_unchanged():
    base = torch.tensor([float("inf"), float("nan"), 1.0]).bfloat16()
    delta, restore = exact_difference(base, base.clone())
    assert restore is None and delta.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(NonFiniteError, match="layer.w: .*NaN/Inf"):
        exact_difference(base, torch.tensor([float("inf"), float("nan"), float("inf")]).bfloat16(), name="layer.w")


def test_signed_zero_in_base_survives_merge_and_unmerge():
    """A zero delta leaves the element alone, so a -0.0 the training did not change needs no restore entry."""
    base = torch.tensor([-0.0, 1.0, -0.0]).bfloat16()
    tuned = torch.tensor([-0.0, 1.5, -0.0]).bfloat16()
    delta, restore = exact_difference(base, tuned)
    assert restore is None
    assert torch.equal(bits(add_exact(base, delta)), bits(tuned))
    assert torch.equal(bits(add_exact(tuned, delta, subtract=True)), bits(base))


def test_from_slices_snaps_deltas_so_unmerge_is_exact():
    """FORMAT §4.3 snapping: arbitrary float deltas become exact differences."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(8, 8, generator=g).bfloat16()}
    base["w"][1, 2] = base["w"][4, 5] = -0.0
    raw = torch.randn(8, 3, generator=g) * 1e-3
    raw[4, 2] = 0.0  # a zero delta on a -0.0 keeps it
    adapter = S2FTAdapter.from_slices(base, {"w": ("columns", [0, 2, 5], raw)}, base_name="b")
    target = adapter.targets["w"]
    merged = target.merged_slice(base["w"])
    expected = (base["w"][:, [0, 2, 5]].double() + raw.double()).bfloat16()
    expected[4, 2] = -0.0
    assert torch.equal(bits(merged), bits(expected))
    assert target.restore.index.tolist() == [1 * 3 + 1]  # -0.0 at [1, 2] moved to a nonzero value
    unmerged = target.shifted(merged, subtract=True)
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
    np.testing.assert_array_equal(target.lines(dim, selected, name="w"), target.to_dense().take(selected.numpy(), axis=dim))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 20),
    bh=st.integers(1, 8),
    bw=st.integers(1, 9),
    k_fraction=st.floats(0.05, 1.0),
    scale=st.floats(-4, 4, allow_nan=False),
    seed=st.integers(0, 2**16),
    pass_elements=st.integers(1, 300),
    dtype=st.sampled_from(["BF16", "F16", "F32"]),
)
def test_pisa_in_passes_of_block_rows_matches_the_reference_and_merges_pass_by_pass(
        rows, cols, bh, bw, k_fraction, scale, seed, pass_elements, dtype):
    """Reconstruction and merge go a few block rows at a time (pisa_fft.deltas): with passes as small as one
    block row, the delta still matches the float64 reading of FORMAT §5.3, and the merge, done pass by pass
    in torch, is bit for bit numpy's cast_D(float32(W) +/- delta) of that delta (add_delta), NaN and Inf
    in the weight included."""
    from unittest.mock import patch

    from s2reg.format import pisa_fft
    from s2reg.format.pisa import add_delta

    with patch.object(pisa_fft, "_PASS_ELEMENTS", pass_elements):
        adapter, expected = random_pisa(rows, cols, bh, bw, k_fraction, scale, seed)
        target = adapter.targets["w"]
        assume(len(pisa_fft.block_row_passes((rows, cols), (bh, bw))) > 1)
        dense = target.to_dense()
        np.testing.assert_allclose(dense.astype(np.float64), expected, rtol=1e-6,
                                   atol=1e-6 * max(1.0, np.abs(expected).max()))
        rng = np.random.default_rng(seed)
        weight = (rng.standard_normal((rows, cols)) * 4).astype(np.float32).astype(dtypes.to_numpy(dtype))
        weight.reshape(-1)[rng.choice(rows * cols, min(3, rows * cols), replace=False)] = \
            np.array([np.nan, -np.inf, -np.nan], dtype=np.float32)[: min(3, rows * cols)].astype(weight.dtype)
        for subtract in (False, True):
            got, want = target.merged(weight, subtract=subtract), add_delta(weight, dense, subtract=subtract)
            assert got.dtype == weight.dtype
            assert np.array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))
