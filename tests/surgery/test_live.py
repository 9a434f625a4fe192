"""Apply and remove adapters on live models: the fast switch, exact for S2FT."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from s2reg.errors import BaseMismatch, S2RegError
from s2reg.format.arrays import to_torch
from s2reg.ops.live import applied, applied_adapters, apply, remove
from s2reg.surgery import merge, unmerge

from .helpers import model_of, pisa, s2ft, tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("live") / "llama")


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def bits_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)


@pytest.mark.slow  # over 20 s on 2 cores: outside the quick subset (README)
def test_thousand_bf16_cycles_leave_the_weights_bit_identical(base):
    model = model_of(base)
    first, second = s2ft(base, seed=1), s2ft(base, seed=2, heads=(0,), channels=(7, 8))
    before = snapshot(model)
    for _ in range(1000):
        apply(model, first)
        apply(model, second)
        remove(model, second)
        remove(model, first)
    assert bits_equal(snapshot(model), before)


def test_applied_changes_only_the_slices_and_matches_the_dense_delta(base):
    model = model_of(base)
    adapter = s2ft(base)
    before = snapshot(model)
    with applied(model, adapter):
        after = snapshot(model)
        for name, tensor in after.items():
            if name not in adapter.targets:
                assert torch.equal(tensor, before[name]), name
                continue
            expected = (before[name].double() + to_torch(adapter.to_dense(name)).double()).to(tensor.dtype)
            assert torch.equal(tensor, expected), name
    assert bits_equal(snapshot(model), before)


def test_context_manager_takes_adapters_out_on_error(base):
    model = model_of(base)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), applied(model, s2ft(base, seed=1), s2ft(base, seed=2, heads=(0,), channels=(9,))):
        assert not bits_equal(snapshot(model), before)
        raise RuntimeError("boom")
    assert bits_equal(snapshot(model), before)


def test_overlapping_stack_that_cannot_be_removed_exactly_is_refused(base):
    model = model_of(base)
    first = s2ft(base, seed=1, scale=0.5)
    apply(model, first)
    before = snapshot(model)
    for seed in range(2, 40):  # find an overlapping adapter whose round trip on top of ``first`` is inexact
        other = s2ft(base, seed=seed, scale=0.5)
        name = next(iter(other.targets))
        t = other.targets[name]
        current = model.state_dict()[name].index_select(0 if t.axis == "rows" else 1, to_torch(t.indices))
        if not t.reversible(current):
            break
    else:
        raise AssertionError("every overlapping stack was reversible; the test needs a different construction")
    with pytest.raises(S2RegError, match="could not be unmerged exactly"):
        apply(model, other)
    assert bits_equal(snapshot(model), before)  # the partial application was taken back


def test_double_apply_and_stray_remove_are_refused(base):
    model = model_of(base)
    adapter = s2ft(base)
    apply(model, adapter)
    with pytest.raises(S2RegError, match="already applied"):
        apply(model, adapter)
    remove(model, adapter)
    with pytest.raises(S2RegError, match="not applied"):
        remove(model, adapter)


def test_wrong_model_is_refused_before_any_change(base, tmp_path):
    other = model_of(tiny(tmp_path / "wide", hidden_size=32))
    before = snapshot(other)
    with pytest.raises(BaseMismatch, match="adapter expects"):
        apply(other, s2ft(base))
    assert bits_equal(snapshot(other), before)


def test_applied_state_lives_on_the_module_so_a_new_adapter_is_never_taken_for_a_lost_one(base):
    model = model_of(base)
    before = snapshot(model)
    lost = s2ft(base, seed=1)
    lost_ref, lost_id = weakref.ref(lost), id(lost)
    apply(model, lost)
    del lost
    gc.collect()
    assert lost_ref() is not None  # its delta is in the weights, so the module keeps it (and its id) alive
    assert applied_adapters(model) == [lost_ref()]
    fresh = [s2ft(base, seed=2, heads=(0,), channels=(9,)) for _ in range(8)]
    assert all(id(a) != lost_id for a in fresh)
    with pytest.raises(S2RegError, match="not applied"):
        remove(model, fresh[0])
    apply(model, fresh[0])
    remove(model, fresh[0])
    remove(model, applied_adapters(model)[0])
    assert applied_adapters(model) == []
    assert bits_equal(snapshot(model), before)


def test_removed_adapters_leave_no_state_behind(base):
    model = model_of(base)
    before = snapshot(model)
    adapter = s2ft(base, seed=1)
    apply(model, adapter)
    remove(model, adapter)
    gone = weakref.ref(adapter)
    del adapter
    gc.collect()
    assert gone() is None and applied_adapters(model) == []
    other = s2ft(base, seed=3)  # may reuse the freed id: it is still a stranger to the model
    with pytest.raises(S2RegError, match="not applied"):
        remove(model, other)
    with applied(model, other):
        assert applied_adapters(model) == [other]
    assert bits_equal(snapshot(model), before)


def test_a_copied_model_carries_its_applied_adapters(base):
    model = model_of(base)
    before = snapshot(model)
    adapter = s2ft(base, seed=1)
    apply(model, adapter)
    twin = copy.deepcopy(model)
    (copied,) = applied_adapters(twin)
    remove(twin, copied)
    assert bits_equal(snapshot(twin), before)
    assert applied_adapters(model) == [adapter]


def test_pisa_live_apply_and_remove_equal_merge_and_unmerge(base, tmp_path):
    adapter = pisa(base, seed=4)
    merge(base, [adapter], tmp_path / "merged")
    unmerge(tmp_path / "merged", [adapter], tmp_path / "unmerged")
    model = model_of(base)
    apply(model, adapter)
    assert bits_equal(snapshot(model), snapshot(model_of(tmp_path / "merged")))
    remove(model, adapter)
    assert bits_equal(snapshot(model), snapshot(model_of(tmp_path / "unmerged")))
