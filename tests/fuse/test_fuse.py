"""Fusing adapters: the methods against independent float64 derivations and PEFT, S2FT and PISA fusion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.format.arrays import to_torch
from s2reg.cli import main
from s2reg.errors import BaseMismatch, FormatError, S2RegError
from s2reg.ops.fuse import FuseOptions, combine, fuse
from s2reg.tensors import CheckpointSource

from ..surgery.helpers import pisa, s2ft, tensor_digests, tiny


def reference_ties(tasks, weights, density, sign_method="total"):
    """TIES from the paper, element by element in float64: trim, elect, disjoint mean."""
    n, m = tasks.shape
    k = int(density * m)
    trimmed = torch.zeros_like(tasks)
    for t in range(n):
        keep = sorted(range(m), key=lambda j: -abs(float(tasks[t, j])))[:k]
        for j in keep:
            trimmed[t, j] = tasks[t, j]
    out = torch.zeros(m, dtype=torch.float64)
    for j in range(m):
        column = [float(trimmed[t, j]) for t in range(n)]
        mass = sum(column) if sign_method == "total" else sum((c > 0) - (c < 0) for c in column)
        elected = 1.0 if mass >= 0 else -1.0
        agree = [t for t in range(n) if (column[t] > 0) - (column[t] < 0) == elected]
        out[j] = sum(weights[t] * column[t] for t in agree) / max(1, len(agree))
    return out


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties_matches_the_paper_and_peft(sign_method, density):
    from peft.utils.merge_utils import ties as peft_ties

    g = torch.Generator().manual_seed(1)
    tasks = torch.randn(3, 40, generator=g, dtype=torch.float64)
    weights = [0.5, 1.0, 2.0]
    options = FuseOptions(torch.tensor(weights, dtype=torch.float64), density, 0, sign_method)
    ours = combine(tasks, "ties", options, torch.Generator())
    torch.testing.assert_close(ours, reference_ties(tasks, weights, density, sign_method))
    theirs = peft_ties(list(tasks), torch.tensor(weights, dtype=torch.float64), density, sign_method)
    torch.testing.assert_close(ours, theirs)


def test_linear_magnitude_prune_and_dare_definitions():
    from peft.utils.merge_utils import magnitude_prune as peft_magnitude_prune
    from peft.utils.merge_utils import task_arithmetic

    g = torch.Generator().manual_seed(2)
    tasks = torch.randn(2, 6, 7, generator=g, dtype=torch.float64)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    options = FuseOptions(w, 0.4, 0)
    torch.testing.assert_close(combine(tasks, "linear", options, torch.Generator()), task_arithmetic(list(tasks), w))
    torch.testing.assert_close(combine(tasks, "magnitude_prune", options, torch.Generator()),
                               peft_magnitude_prune(list(tasks), w, 0.4))
    a = combine(tasks, "dare_linear", options, torch.Generator().manual_seed(9))
    b = combine(tasks, "dare_linear", options, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)  # the seed makes a DARE fuse reproducible
    single = combine(tasks[:1], "dare_linear", FuseOptions(torch.ones(1, dtype=torch.float64), 0.4, 0),
                     torch.Generator().manual_seed(3))
    kept = single != 0
    torch.testing.assert_close(single[kept], tasks[0][kept] / 0.4)  # kept entries are rescaled by 1/density
    assert 0.1 < float(kept.double().mean()) < 0.7


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("fuse") / "base")


def test_disjoint_s2ft_adapters_concatenate_exactly_without_the_base(base, tmp_path):
    a = s2ft(base, seed=1, heads=(0,), channels=(1, 2))
    b = s2ft(base, seed=2, heads=(1,), channels=(7, 9))
    result = fuse([a, b])
    fused = result.adapter
    assert [r.tensor for r in result.tensors] == sorted(set(a.targets) | set(b.targets))
    assert all(r.overlapping == 0 and r.overlap_fraction == 0 for r in result.tensors)
    s2reg.merge(base, [fused], tmp_path / "fused")
    s2reg.merge(base, [a, b], tmp_path / "both")
    assert tensor_digests(tmp_path / "fused") == tensor_digests(tmp_path / "both")


def test_overlapping_s2ft_fuse_needs_the_base_and_then_is_exact(base, tmp_path):
    a = s2ft(base, seed=1, heads=(0,), channels=(1, 2))
    b = s2ft(base, seed=2, heads=(0,), channels=(2, 3))
    with pytest.raises(S2RegError, match="--base"):
        fuse([a, b], weights=[0.5, 0.5])
    with CheckpointSource(base) as source:
        result = fuse([a, b], weights=[0.5, 0.5], base=source)
        fused = result.adapter
        down = "model.layers.0.mlp.down_proj.weight"
        row = next(r for r in result.tensors if r.tensor == down)
        union = np.union1d(a.targets[down].indices, b.targets[down].indices)  # channels 1, 2, 3: 2 is in both
        assert (row.inputs, row.indices, row.overlapping, row.coefficients_per_block) == (2, union.size, 1, None)
        assert row.overlap_fraction == 1 / union.size
        weight = source.get(down).double()
        expected = (weight + 0.5 * to_torch(a.to_dense(down)).double() + 0.5 * to_torch(b.to_dense(down)).double()).to(torch.bfloat16)
        assert torch.equal(to_torch(fused.targets[down].merged(source.get(down))), expected)
    fused.save(tmp_path / "f")
    s2reg.merge(base, [s2reg.load(tmp_path / "f")], tmp_path / "m")
    s2reg.unmerge(tmp_path / "m", [s2reg.load(tmp_path / "f")], tmp_path / "back")
    assert tensor_digests(tmp_path / "back") == tensor_digests(base)


def test_pisa_fuse_sums_the_spectra(base):
    a, b = pisa(base, seed=1, k=4), pisa(base, seed=2, k=4)
    result = fuse([a, b], weights=[1.0, -0.5])
    fused = result.adapter
    for name in a.targets:
        expected = to_torch(a.to_dense(name)).double() - 0.5 * to_torch(b.to_dense(name)).double()
        torch.testing.assert_close(to_torch(fused.to_dense(name)).double(), expected, rtol=1e-5, atol=1e-6)
    assert all(r.coefficients_per_block >= 4 and r.indices is None for r in result.tensors)


def test_bad_fuse_inputs_are_clear_errors_and_write_nothing(base, tmp_path):
    other = tiny(tmp_path / "other", seed=3)
    for path, adapter in (("a", s2ft(base)), ("b", s2ft(base, seed=5, heads=(0,), channels=(50,))), ("p", pisa(base)),
                          ("x", s2ft(other))):
        adapter.save(tmp_path / path)
    run = CliRunner().invoke
    cases = [
        (["a", "p"], [], "different kinds"),
        (["a", "x"], [], "different base models"),
        (["a", "b"], ["--weights", "1,2,3"], "3 weights for 2 adapters"),
        (["a", "b"], ["--method", "ties", "--density", "-0.5"], "density must be in"),
        (["a", "missing"], [], "no such adapter directory"),
    ]
    for names, options, message in cases:
        result = run(main, ["fuse", *[str(tmp_path / n) for n in names], *options, "-o", str(tmp_path / "out")])
        assert result.exit_code != 0 and message in result.output, (names, result.output)
        assert not (tmp_path / "out").exists()
    ok = run(main, ["fuse", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "out"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert {r["tensor"] for r in json.loads(ok.stdout)["tensors"]} >= set(s2reg.load(tmp_path / "a").targets)
    with pytest.raises(FormatError):
        fuse([s2reg.load(tmp_path / "a"), s2reg.load(tmp_path / "p")])
    with pytest.raises(BaseMismatch):
        fuse([s2reg.load(tmp_path / "a"), s2reg.load(tmp_path / "x")])


def test_adapters_for_different_model_families_are_refused_in_one_line(base, tmp_path):
    """A Llama adapter and a BERT adapter touch no common tensor: nothing ties them to one base."""
    bert = tiny(tmp_path / "bert", family="bert")
    pisa(base).save(tmp_path / "llama-pisa")
    pisa(bert).save(tmp_path / "bert-pisa")
    adapters = [s2reg.load(tmp_path / "llama-pisa"), s2reg.load(tmp_path / "bert-pisa")]
    assert not set(adapters[0].targets) & set(adapters[1].targets)
    with pytest.raises(BaseMismatch, match="nothing shows these adapters share a base model"):
        fuse(adapters)
    result = CliRunner().invoke(main, ["fuse", str(tmp_path / "llama-pisa"), str(tmp_path / "bert-pisa"),
                                       "-o", str(tmp_path / "mixed")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("Error: nothing shows these adapters share a base model") and "--base" in result.output
    assert not (tmp_path / "mixed").exists()
    with CheckpointSource(base) as source, pytest.raises(BaseMismatch, match="base model has no tensor"):
        fuse(adapters, base=source)  # --base ties inputs to one checkpoint, and the BERT one does not fit it


def test_disjoint_adapters_of_one_base_fuse_when_the_base_vouches_for_them(base, tmp_path):
    a = s2ft(base, seed=1, layers=[0])
    b = s2ft(base, seed=2, layers=[1])
    assert not set(a.base.fingerprints) & set(b.base.fingerprints)
    with pytest.raises(BaseMismatch, match="share a base model"):
        fuse([a, b])
    with CheckpointSource(base) as source:
        fused = fuse([a, b], base=source).adapter
    s2reg.merge(base, [fused], tmp_path / "fused")
    s2reg.merge(base, [a, b], tmp_path / "both")
    assert tensor_digests(tmp_path / "fused") == tensor_digests(tmp_path / "both")
    other = tiny(tmp_path / "other", seed=3)
    with CheckpointSource(other) as source, pytest.raises(BaseMismatch, match="differs from the one this adapter"):
        fuse([a, b], base=source)


def test_disjoint_fuse_carries_restore_lists_onto_the_union(tmp_path):
    """FORMAT §4.3: copied deltas keep their restore lists, moved to their places in the fused slice."""
    from ..surgery.helpers import negative_zeros

    zeros = tiny(tmp_path / "base", negative_zeros=0.1)
    a = s2ft(zeros, seed=1, heads=(0,), channels=(1, 9))
    b = s2ft(zeros, seed=2, heads=(1,), channels=(2, 7))
    down = "model.layers.0.mlp.down_proj.weight"
    assert a.targets[down].restore is not None and b.targets[down].restore is not None
    fused = fuse([a, b]).adapter
    assert fused.targets[down].restore.count == a.targets[down].restore.count + b.targets[down].restore.count
    s2reg.merge(zeros, [fused], tmp_path / "fused")
    s2reg.merge(zeros, [a, b], tmp_path / "both")
    assert tensor_digests(tmp_path / "fused") == tensor_digests(tmp_path / "both")
    s2reg.unmerge(tmp_path / "fused", [fused], tmp_path / "back")
    assert tensor_digests(tmp_path / "back") == tensor_digests(zeros)
    with CheckpointSource(zeros) as source:
        assert int(negative_zeros(source.get(down)).sum()) > int(negative_zeros(fused.targets[down].merged(source.get(down))).sum())
