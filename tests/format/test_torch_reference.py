"""The numpy implementation of FORMAT §4.3 against the torch implementation it replaced (kept here, as the
reference, never in the package): the same deltas, restore lists and merged bits on every float dtype the
format allows, and on the real SmolLM2 the same sha256 for every tensor whichever path merged.

One difference is intended: FORMAT §4.3 rounds to nearest-even straight into the base dtype. torch casts
F64 to F16 through F32, rounding twice; numpy (and ml_dtypes for BF16) round once. The two agree on every
exact difference (no rounding happens there); on snapped arbitrary deltas the numpy result is checked
against exact rational arithmetic instead.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s2reg.format import S2FTAdapter, exact_difference
from s2reg.format.arrays import as_array, to_torch
from s2reg.format.s2ft import add_exact

_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
WIDTH = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32, torch.float64: 64}
FLOATS = list(WIDTH)  # every base dtype of FORMAT §2 that S2FT accepts


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def torch_add_exact(base: torch.Tensor, delta: torch.Tensor, *, subtract: bool = False) -> torch.Tensor:
    wide = base.to(delta.dtype)
    moved = (wide - delta if subtract else wide + delta).to(base.dtype)
    return torch.where(delta == 0, base, moved)


def torch_exact_difference(base: torch.Tensor, tuned: torch.Tensor):
    """s2reg's torch implementation (before issue 12), verbatim in its logic."""
    changed = _bits(base) != _bits(tuned)
    best: tuple[int, torch.Tensor, torch.Tensor] | None = None
    for wide in (torch.float32, torch.float64):
        if wide.itemsize < base.dtype.itemsize:
            continue
        delta = torch.where(changed, tuned.to(wide) - base.to(wide), 0.0)
        delta = torch.where(torch.isfinite(delta), delta, 0.0)
        wrong = (_bits(torch_add_exact(base, delta)) != _bits(tuned)) | \
                (_bits(torch_add_exact(tuned, delta, subtract=True)) != _bits(base))
        if not bool(wrong.any()):
            return delta, None
        cost = delta.numel() * wide.itemsize + int(wrong.sum()) * (8 + 2 * base.dtype.itemsize)
        if best is None or cost < best[0]:
            best = (cost, delta, wrong)
    assert best is not None, "F64 is at least as wide as every float dtype"
    _, delta, wrong = best
    index = wrong.reshape(-1).nonzero().reshape(-1)
    return delta, (index, base.reshape(-1)[index], tuned.reshape(-1)[index])


def _from_bits(values: list[int], dtype: torch.dtype) -> torch.Tensor:
    width = WIDTH[dtype]
    wrapped = [v - (1 << width) if v >= 1 << (width - 1) else v for v in values]
    return torch.tensor(wrapped, dtype=_BITS[dtype]).view(dtype)


def _same(ours: np.ndarray, theirs: torch.Tensor) -> bool:
    return ours.dtype.itemsize == theirs.dtype.itemsize and ours.tobytes() == theirs.contiguous().numpy().tobytes() \
        if theirs.dtype != torch.bfloat16 else ours.tobytes() == _bits(theirs).numpy().tobytes()


@settings(max_examples=400, deadline=None)
@given(dtype=st.sampled_from(FLOATS), data=st.data())
def test_exact_difference_and_merge_match_the_torch_implementation(dtype, data):
    """Arbitrary bit patterns (signed zeros, subnormals, infinities, NaN in the base): same delta dtype and
    bits, same restore list, same merged and unmerged bits."""
    width = WIDTH[dtype]
    pattern = st.integers(0, (1 << width) - 1)
    n = data.draw(st.integers(1, 16))
    base = _from_bits(data.draw(st.lists(pattern, min_size=n, max_size=n)), dtype)
    tuned = _from_bits(data.draw(st.lists(pattern, min_size=n, max_size=n)), dtype)
    tuned = torch.where(torch.isfinite(tuned), tuned, base)  # a non-finite change is refused (FORMAT §4.2)
    delta, restore = exact_difference(as_array(base), as_array(tuned))
    their_delta, their_restore = torch_exact_difference(base, tuned)
    assert _same(delta, their_delta)
    assert (restore is None) == (their_restore is None)
    if restore is not None:
        assert restore.index.tolist() == their_restore[0].tolist()
        assert _same(restore.base, their_restore[1]) and _same(restore.tuned, their_restore[2])
    for subtract, start in ((False, base), (True, tuned)):
        assert _same(add_exact(as_array(start), delta, subtract=subtract),
                     torch_add_exact(start, their_delta, subtract=subtract))


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(FLOATS), payload=st.sampled_from([torch.float32, torch.float64]), data=st.data())
def test_arithmetic_rule_on_other_values_matches_torch_except_its_double_rounding(dtype, payload, data):
    """The arithmetic rule on values a delta was not made for (stacked or forced merges): the same bits as
    torch, except where torch rounds F64 -> F16 twice; there the result is the correctly rounded one."""
    width = WIDTH[dtype]
    base = _from_bits(data.draw(st.lists(st.integers(0, (1 << width) - 1), min_size=1, max_size=12)), dtype)
    finite = st.floats(allow_nan=False, allow_infinity=False, width=32 if payload == torch.float32 else 64)
    delta = torch.tensor(data.draw(st.lists(finite, min_size=len(base), max_size=len(base))), dtype=payload)
    ours = add_exact(as_array(base), as_array(delta))
    theirs = torch_add_exact(base, delta)
    # NaN results: torch narrows every NaN to one canonical pattern, numpy keeps the payload. Both are NaN,
    # and the exact-difference path never computes on a NaN (a changed NaN is listed, FORMAT §4.3).
    nan = np.isnan(ours.astype(np.float64))
    assert nan.tolist() == torch.isnan(theirs).tolist()
    ours, theirs = ours[~nan], theirs[torch.from_numpy(~nan)]
    if not (dtype == torch.float16 and payload == torch.float64):
        assert _same(ours, theirs)
        return
    for b, d, got in zip(base[torch.from_numpy(~nan)].tolist(), delta[torch.from_numpy(~nan)].tolist(), ours.tolist(), strict=True):
        if d == 0 or not np.isfinite(b) or not np.isfinite(b + d) or abs(b + d) > 65504:
            continue  # zero deltas keep the base; overflow is refused where it matters
        assert got == _round_to_half(Fraction(b) + Fraction(d))


def _round_to_half(x: Fraction) -> float:
    """The nearest float16 to the rational ``x``, ties to even: exact arithmetic, independent of any cast."""
    candidates = np.array([float(x)], dtype=np.float64).astype(np.float16)  # a neighbour, then search both sides
    lo = hi = candidates[0]
    while Fraction(float(lo)) > x:
        lo = np.nextafter(lo, np.float16(-np.inf))
    while Fraction(float(hi)) < x:
        hi = np.nextafter(hi, np.float16(np.inf))
    if lo == hi:
        return float(lo)
    down, up = x - Fraction(float(lo)), Fraction(float(hi)) - x
    if down != up:
        return float(lo if down < up else hi)
    return float(lo if int(lo.view(np.uint16)) % 2 == 0 else hi)


def test_torch_double_rounding_case_is_rounded_once():
    """1 + 2**-11 + 2**-40 lies just above the midpoint of 1.0 and the next float16: torch goes through F32,
    which drops 2**-40 and makes it a tie (to even: 1.0); FORMAT §4.3's single rounding gives 1 + 2**-10."""
    base, delta = torch.tensor([1.0], dtype=torch.float16), torch.tensor([2.0**-11 + 2.0**-40], dtype=torch.float64)
    assert torch_add_exact(base, delta).item() == 1.0
    assert add_exact(as_array(base), as_array(delta)).tolist() == [1.0 + 2.0**-10]


@pytest.mark.smollm2
def test_smollm2_merge_is_the_same_bytes_as_the_torch_reference(smollm2_dir, tmp_path):
    """A bf16 adapter with signed-zero changes on the real model: merging it with s2reg (numpy, patching the
    shards) and with the torch reference rule give every tensor the same sha256; unmerge restores the base."""
    import hashlib

    import s2reg
    from s2reg.tensors import CheckpointSource

    from ..surgery.helpers import tensor_digests

    g = torch.Generator().manual_seed(12)
    slices = {}
    with CheckpointSource(smollm2_dir) as source:
        for layer in (0, 5, 29):
            for role, axis, indices in (("self_attn.q_proj", "rows", range(64, 128)),
                                        ("mlp.down_proj", "columns", range(100, 132))):
                name = f"model.layers.{layer}.{role}.weight"
                dim = ("rows", "columns").index(axis)
                index = torch.tensor(list(indices))
                tuned = source.get(name).index_select(dim, index).double()
                tuned += torch.randn(tuned.shape, generator=g, dtype=torch.float64) * 1e-3  # training-like steps
                tuned = tuned.to(torch.bfloat16)
                tuned.view(-1)[:7] = torch.tensor([-0.0, 0.0, 1e-30, 3.0e4, -0.0, 2.0, -1e-35])  # restore-list cases
                slices[name] = (axis, list(indices), tuned)
        adapter = S2FTAdapter.from_tuned(source, slices, base_name="smollm2")
        assert any(t.restore is not None for t in adapter.targets.values())
        expected = {}
        for name in source.names():
            weight = source.get(name)
            target = adapter.targets.get(name)
            if target is not None:
                dim = ("rows", "columns").index(target.axis)
                index = to_torch(target.indices)
                merged = torch_add_exact(weight.index_select(dim, index), to_torch(target.delta)).contiguous()
                if target.restore is not None:
                    merged.view(-1)[to_torch(target.restore.index)] = to_torch(target.restore.tuned)
                weight = weight.index_copy(dim, index, merged)
            expected[name] = hashlib.sha256(_bits(weight).numpy().tobytes()).hexdigest()
    s2reg.merge(smollm2_dir, [adapter], tmp_path / "merged")
    assert tensor_digests(tmp_path / "merged") == expected
    s2reg.unmerge(tmp_path / "merged", [adapter], tmp_path / "back")
    assert tensor_digests(tmp_path / "back") == tensor_digests(smollm2_dir)
