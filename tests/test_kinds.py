"""The registry of adapter kinds (``s2reg/kinds``, docs/kinds.md): every kind registered once, every kind
through every behaviour against float64 dense references, and a third kind registered here reached by the
dispatching callers (statistics, describe, diff, model card, merge) without editing them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import pytest
import torch

import s2reg
from s2reg.errors import FormatError, S2RegError
from s2reg.format import Adapter, BaseModel, Fingerprint, manifest
from s2reg.format.arrays import as_array
from s2reg.format.s2ft import axis_dim
from s2reg.kinds import KINDS, Kind, kind_named, kind_of, register
from s2reg.ops.describe import describe
from s2reg.ops.diff import diff_adapters
from s2reg.registry.modelcard import model_card
from s2reg.tensors import CheckpointSource
from s2reg.tensors.memory import MemorySource
from tests.format.helpers import DOWN, Q, pisa_adapter, s2ft_adapter, tiny_base
from tests.surgery.helpers import pisa, s2ft, tiny

EXAMPLES = {"s2ft": s2ft_adapter, "pisa": pisa_adapter}


def f64(array: Any) -> np.ndarray:
    return as_array(array).astype(np.float64)


# -- the registry --------------------------------------------------------------------------------------

def test_every_kind_is_registered_once_under_the_name_its_types_carry(tmp_path):
    assert sorted(KINDS) == ["pisa", "s2ft"]
    assert sorted(KINDS) == sorted(manifest.KINDS)  # FORMAT §3: the kinds a manifest names
    for name, kind in KINDS.items():
        assert kind.name == name and kind_named(name) is kind
        assert kind.target_type.kind == kind.adapter_type.kind == name
        EXAMPLES[name]().save(tmp_path / name)
        assert type(s2reg.load(tmp_path / name)) is kind.adapter_type  # load() builds the type the registry names
        with pytest.raises(S2RegError, match="registered twice"):
            register(type(kind)())
    assert sorted(KINDS) == ["pisa", "s2ft"]  # the refused registrations changed nothing


def test_an_unknown_kind_is_one_clear_error():
    with pytest.raises(FormatError, match="unknown adapter kind 'lora'.*pisa, s2ft"):
        kind_named("lora")


def test_importing_the_registry_costs_neither_numpy_nor_torch():
    import subprocess
    import sys

    code = "import sys, s2reg.kinds; print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- every kind through every behaviour --------------------------------------------------------------------

@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return tiny_base()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_merge_region_matches_the_dense_rule_and_exact_kinds_undo_bit_for_bit(name, base):
    """FORMAT §4.3 / §5.3: the region's new values are cast(W + delta) on it; an exact kind unmerges to W's bits."""
    kind, adapter = KINDS[name], EXAMPLES[name](base)
    for tensor, target in adapter.targets.items():
        assert kind_of(target) is kind and kind_of(adapter) is kind
        weight = as_array(base[tensor])
        region = kind.region(target)
        dense = target.to_dense()
        if region is None:
            before, delta = weight, dense
        else:
            axis, indices = region
            before = np.take(weight, indices, axis=axis_dim(axis))
            delta = np.take(dense, indices, axis=axis_dim(axis))
            assert np.array_equal(f64(kind.region_delta(target)), f64(delta))
        merged = kind.merged_region(target, before)
        wide = np.float32 if name == "pisa" else np.float64  # PISA adds in float32 (FORMAT §5.3)
        reference = (before.astype(wide) + delta.astype(wide)).astype(weight.dtype)
        assert np.array_equal(merged.view(np.uint16), reference.view(np.uint16))
        back = kind.merged_region(target, merged, subtract=True)
        assert kind.undoes(target, before, merged) == kind.exact
        if kind.exact:
            assert np.array_equal(back.view(np.uint16), before.view(np.uint16))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_statistics_and_texts_come_from_the_payload(name, base):
    kind, adapter = KINDS[name], EXAMPLES[name](base)
    rows = adapter.stats()
    for row, (tensor, target) in zip(rows, adapter.targets.items(), strict=True):
        columns = kind.stats_columns(target)
        assert row["name"] == tensor and {k: row[k] for k in columns} == columns
        assert math.isclose(row["delta_norm"], float(np.linalg.norm(f64(target.to_dense()))), rel_tol=1e-6)
        text, card = kind.selection_text(row), kind.card_text(row)
        assert text and card and "\n" not in text + card
        number = str(row["count"] if kind.region(target) is not None else row["coefficients"])
        assert number in text and number in card


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_compare_and_lines_agree_with_dense_float64(name, base):
    kind, adapter, other = KINDS[name], EXAMPLES[name](base), EXAMPLES[name](base, seed=9)
    for tensor, target in adapter.targets.items():
        x, y = f64(target.to_dense()), f64(other.targets[tensor].to_dense())
        common, union, xx, yy, xy, dd, equal = kind.compare(tensor, target, target)
        assert equal and dd == 0 and math.isclose(xx, float(x.ravel() @ x.ravel()), rel_tol=1e-6) and xx == yy
        common, union, xx, yy, xy, dd, equal = kind.compare(tensor, target, other.targets[tensor])
        assert not equal and math.isclose(dd, float(((x - y) ** 2).sum()), rel_tol=1e-5, abs_tol=1e-9)
        assert 0 < common <= union <= x.size
        lines = np.array([0, 3])
        for dim in (0, 1):
            assert np.allclose(f64(kind.lines(target, dim, lines, name=tensor)), np.take(x, lines, axis=dim),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_linear_fuse_is_the_sum_of_the_deltas(name, base):
    """FUSE.md: linear with weights 1 adds the deltas (S2FT's sum snapped to exact differences on the bf16 base)."""
    a, b = EXAMPLES[name](base, seed=1), EXAMPLES[name](base, seed=5)
    fused = s2reg.fuse([a, b], method="linear", base=MemorySource(base)).adapter
    assert fused.kind == name and set(fused.targets) == set(a.targets)
    for tensor, target in a.targets.items():
        want = f64(target.to_dense()) + f64(b.targets[tensor].to_dense())
        got = f64(fused.targets[tensor].to_dense())
        if name == "s2ft":  # within half a bf16 step of the tuned value W + delta
            assert np.all(np.abs(got - want) <= 2.0 ** -8 * (np.abs(f64(base[tensor].float())) + np.abs(want)))
        else:
            assert np.allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_lora_factors_rebuild_the_dense_delta(name, base):
    kind, adapter = KINDS[name], EXAMPLES[name](base)
    for tensor, target in adapter.targets.items():
        a, b, error = kind.lora_factors(tensor, target, None, 1e-6, False)
        dense = f64(target.to_dense())
        rebuilt = b.double().numpy() @ a.double().numpy()
        assert np.linalg.norm(rebuilt - dense) <= max(error, 1e-6) * np.linalg.norm(dense) * 1.01
    assert str(7) in kind.lora_rank_text(7, 1e-3)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_extract_takes_the_merged_checkpoint_back_to_the_adapter(name, tmp_path):
    kind = KINDS[name]
    base = tiny(tmp_path / "base", dtype=torch.float32)  # float32: the merge's rounding stays far below the delta
    adapter = s2ft(base) if name == "s2ft" else pisa(base)
    s2reg.merge(base, [adapter], tmp_path / "tuned")
    options = {"allow_dense": False, "max_fraction": 0.5, "allow_noise": False, "budget": 6, "block": (16, 16),
               "allow_partial": False, "detect_permutation": False, "arch": None}
    kind.check_extract_options(options)
    with CheckpointSource(base) as b, CheckpointSource(tmp_path / "tuned") as t:
        result = kind.extract(b, t, base_name="tiny", progress=lambda _: None, options=options)
    assert result.adapter.kind == name and set(result.adapter.targets) == set(adapter.targets)
    for tensor, target in adapter.targets.items():
        got, want = f64(result.adapter.targets[tensor].to_dense()), f64(target.to_dense())
        # S2FT: exact differences, the same bits; PISA: the merge rounded W + delta to bf16, which extract refits
        assert np.array_equal(got, want) if kind.exact else np.linalg.norm(got - want) < 0.05 * np.linalg.norm(want)
    rows = [kind.extract_row(change) for change in result.report.changes]
    assert rows and all(len(row) == len(kind.extract_columns) for row in rows)


def test_extract_options_a_kind_cannot_use_are_refused():
    KINDS["s2ft"].check_extract_options({"budget": None, "detect_permutation": True})
    with pytest.raises(S2RegError, match="--kind pisa needs --budget"):
        KINDS["pisa"].check_extract_options({"budget": None, "detect_permutation": False})
    with pytest.raises(S2RegError, match="--detect-permutation"):
        KINDS["pisa"].check_extract_options({"budget": 4, "detect_permutation": True})


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_names_its_training_config(name):
    kind = KINDS[name]
    config = kind.train_config()
    assert kind.train_config.method == name
    options = type("Options", (), {"budget": None})()
    summary, rows = kind.train_summary(config, options), kind.train_rows(config, options)
    assert isinstance(summary, dict) and all(isinstance(r, tuple) and len(r) == 2 for r in rows)
    assert (kind.size_options is None) == (name == "s2ft")  # only S2FT is sized by --budget


# -- a third kind, registered here ------------------------------------------------------------------------

@dataclass
class LowRankTarget:
    """A delta ``b @ a`` (a toy low-rank kind): just enough of the format's target interface."""

    kind: ClassVar[str] = "lowrank"
    shape: tuple[int, ...]
    dtype: Any
    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]

    @property
    def num_params(self) -> int:
        return self.a.size + self.b.size

    def check(self, name: str, *, allow_nonfinite: bool = False) -> None:
        if (self.b.shape[0], self.a.shape[1]) != tuple(self.shape):
            raise FormatError(f"{name}: factors do not make the tensor's shape")

    def to_dense(self) -> np.ndarray:
        return (self.b.astype(np.float64) @ self.a.astype(np.float64)).astype(np.float32)

    def payload_tensors(self, name: str) -> dict[str, np.ndarray]:
        return {f"{name}.a": self.a, f"{name}.b": self.b}

    def merged(self, weight: np.ndarray, *, subtract: bool = False) -> np.ndarray:
        delta = self.to_dense()
        return (weight.astype(np.float32) + (-delta if subtract else delta)).astype(weight.dtype)


class LowRankAdapter(Adapter):
    kind = "lowrank"
    target_type = LowRankTarget


class LowRankKind(Kind):
    name = "lowrank"
    target_type = LowRankTarget  # type: ignore[assignment]  # a kind outside s2reg.format names its classes itself
    adapter_type = LowRankAdapter  # type: ignore[assignment]

    def stats_columns(self, target) -> dict[str, Any]:
        # |b a|_F from the factors alone: sqrt(trace((b^T b)(a a^T)))
        gram = (target.b.T.astype(np.float64) @ target.b) * (target.a.astype(np.float64) @ target.a.T)
        return {"rank": target.a.shape[0], "delta_norm": math.sqrt(max(0.0, float(gram.sum())))}

    def selection_text(self, row) -> str:
        return f"rank {row['rank']}"


@pytest.fixture
def lowrank():
    kind = register(LowRankKind())
    try:
        yield kind
    finally:
        del KINDS[kind.name]


def lowrank_adapter(base: dict[str, torch.Tensor], seed: int, rank: int = 2) -> LowRankAdapter:
    g = np.random.default_rng(seed)
    targets, fingerprints = {}, {}
    for name in (DOWN, Q):
        weight = as_array(base[name])
        out, inp = weight.shape
        targets[name] = LowRankTarget(weight.shape, weight.dtype, (g.standard_normal((rank, inp)) * 0.1).astype(np.float32),
                                      (g.standard_normal((out, rank)) * 0.1).astype(np.float32))
        fingerprints[name] = Fingerprint.of(weight)
    return LowRankAdapter(targets, BaseModel("tiny", None, fingerprints))


def test_a_third_kind_reaches_stats_describe_and_the_model_card(lowrank, base):
    adapter = lowrank_adapter(base, seed=1)
    rows = adapter.stats()
    assert [r["kind"] for r in rows] == ["lowrank", "lowrank"] and [r["rank"] for r in rows] == [2, 2]
    for row, target in zip(rows, adapter.targets.values(), strict=True):
        assert math.isclose(row["delta_norm"], float(np.linalg.norm(f64(target.b) @ f64(target.a))), rel_tol=1e-9)
        assert row["params"] == target.a.size + target.b.size
    described = describe(adapter)
    assert described.summary.kind == "lowrank" and [r["rank"] for r in described.targets] == [2, 2]
    card = model_card(adapter, "toy:v1")
    assert card.count("| rank 2 |") == 2  # the table's selection column, from the kind's text


def _tensor_rows(report: Any) -> dict[str, Any]:
    return {r.tensor: r for r in report.tensors}


def test_a_third_kind_reaches_diff_against_itself_and_against_s2ft(lowrank, base):
    a, b = lowrank_adapter(base, seed=1), lowrank_adapter(base, seed=2)
    assert diff_adapters(a, a).identical
    rows = _tensor_rows(diff_adapters(a, b))
    for tensor in a.targets:
        x, y = f64(a.targets[tensor].to_dense()).ravel(), f64(b.targets[tensor].to_dense()).ravel()
        assert math.isclose(rows[tensor].cosine, x @ y / math.sqrt((x @ x) * (y @ y)), rel_tol=1e-9)
        assert rows[tensor].jaccard == 1.0
    # against S2FT: compared on the S2FT slice, the third kind's delta taken there by the default ``lines``
    s2 = s2ft_adapter(base)
    rows = _tensor_rows(diff_adapters(s2, a))
    for tensor, target in s2.targets.items():
        dim = axis_dim(target.axis)
        x = f64(target.delta)
        y = np.take(f64(a.targets[tensor].to_dense()), target.indices, axis=dim)
        assert math.isclose(rows[tensor].cosine, float(x.ravel() @ y.ravel()) /
                            math.sqrt(float(x.ravel() @ x.ravel()) * float(y.ravel() @ y.ravel())), rel_tol=1e-9)
        assert math.isclose(rows[tensor].jaccard, x.size / math.prod(target.shape))


def test_a_third_kind_merges_into_a_checkpoint_by_its_own_rule(lowrank, tmp_path):
    directory = tiny(tmp_path / "base")
    with CheckpointSource(directory) as source:
        names = [n for n in source.names() if n.endswith("down_proj.weight")][:1]
        weights = {n: source.array(n) for n in names}
    g = np.random.default_rng(3)
    targets = {n: LowRankTarget(w.shape, w.dtype, (g.standard_normal((2, w.shape[1])) * 0.1).astype(np.float32),
                                (g.standard_normal((w.shape[0], 2)) * 0.1).astype(np.float32)) for n, w in weights.items()}
    adapter = LowRankAdapter(targets, BaseModel("tiny", None, {n: Fingerprint.of(w) for n, w in weights.items()}))
    s2reg.merge(directory, [adapter], tmp_path / "merged")
    with CheckpointSource(tmp_path / "merged") as merged:
        for n, w in weights.items():
            reference = (w.astype(np.float32) + (f64(targets[n].b) @ f64(targets[n].a)).astype(np.float32)).astype(w.dtype)
            assert merged.array(n).dtype == ml_dtypes.bfloat16
            assert np.array_equal(merged.array(n).view(np.uint16), reference.view(np.uint16))


def test_train_methods_are_the_kinds_that_register_a_train_config(lowrank, monkeypatch):
    """``s2reg train --method`` reads the registry: a kind without ``train_config`` is no method, one with it is."""
    from s2reg.train.settings import default_lr, method_config_class

    for name in ("s2ft", "pisa"):
        assert method_config_class(name) is kind_named(name).train_config and method_config_class(name).method == name
    with pytest.raises(S2RegError, match=r"unknown method 'lowrank' \(s2ft or pisa\)"):
        method_config_class("lowrank")

    @dataclass(frozen=True)
    class LowRankConfig:
        method: ClassVar[str] = "lowrank"
        default_lr: ClassVar[float] = 2e-4

    monkeypatch.setattr(LowRankKind, "train_config", LowRankConfig)
    assert method_config_class("lowrank") is LowRankConfig and default_lr("lowrank") == 2e-4
