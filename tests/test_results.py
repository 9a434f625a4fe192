"""Every public verb returns a frozen, typed result with one JSON form; a surgery plan is immutable and hashes
each adapter's payload once."""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing

import pytest

from s2reg import load
from s2reg.demo import run_demo
from s2reg.interop import export_gguf_lora, export_lora
from s2reg.ops.describe import describe
from s2reg.ops.diff import diff_adapters, diff_checkpoints
from s2reg.ops.fuse import fuse
from s2reg.registry.entry import Entry
from s2reg.registry.hub import pull_from_hub, push_to_hub
from s2reg.results import Result
from s2reg.surgery import (
    merge,
    merge_in_place,
    permute_checkpoint,
    recover,
    unmerge,
    unmerge_in_place,
    unpermute_checkpoint,
)
from s2reg.surgery import plan as plan_module
from s2reg.surgery.journal import Journal
from s2reg.surgery.plan import describe_plan, plan_merge, plan_unmerge
from s2reg.tensors import CheckpointSource

from .surgery.helpers import pisa, s2ft, tiny

VERBS = [merge, unmerge, merge_in_place, unmerge_in_place, recover, permute_checkpoint, unpermute_checkpoint,
         describe_plan, diff_adapters, diff_checkpoints, describe, export_lora, export_gguf_lora, run_demo, fuse,
         push_to_hub, pull_from_hub, Entry.summary]  # the Hub verbs run against a test double in registry/test_hub.py


def _frozen_result_type(cls: type) -> bool:
    return dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen and issubclass(cls, Result)  # type: ignore[attr-defined]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v.__name__)
def test_every_verb_declares_a_frozen_result_type(verb):
    """Checked on the annotations, so the verbs too slow to run here (the demo trains) are held to it as well."""
    returned = typing.get_type_hints(verb)["return"]
    assert returned is not dict and typing.get_origin(returned) is not dict
    assert _frozen_result_type(returned), returned


def _checked(result: Result, keys: set[str]) -> dict:
    """``result`` is its verb's declared frozen type, refuses assignment, and its JSON form has exactly ``keys``
    (the keys ``--json`` has always printed) and survives json.dumps/loads unchanged."""
    assert _frozen_result_type(type(result)) and not isinstance(result, dict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(result, dataclasses.fields(result)[0].name, None)
    data = result.as_json()
    assert set(data) == keys
    assert json.loads(json.dumps(data)) == data
    return data


SURGERY_KEYS = {"operation", "adapters", "tensors", "merged_now", "permuted", "bytes_patched", "seconds"}


def test_surgery_verbs_return_frozen_results(tmp_path):
    base = tiny(tmp_path / "base")
    first, second = s2ft(base), pisa(base)
    merged = merge(base, [first, second], tmp_path / "m")
    data = _checked(merged, SURGERY_KEYS | {"output", "tensors_patched"})
    assert data["adapters"] == list(merged.adapters) and len(merged.merged_now) == 2 and merged.operation == "merge"
    _checked(unmerge(tmp_path / "m", [second], tmp_path / "s2ft-only"), SURGERY_KEYS | {"output", "tensors_patched"})
    shutil.copytree(base, tmp_path / "u")
    in_place = merge_in_place(tmp_path / "u", [first, second])
    assert _checked(in_place, SURGERY_KEYS | {"in_place", "links_broken"})["links_broken"] == []
    _checked(unmerge_in_place(tmp_path / "u", [first, second]), SURGERY_KEYS | {"in_place", "links_broken"})
    # recover's keys say what it did: the fields it has nothing for are left out of the JSON
    assert _checked(recover(tmp_path / "u"), {"checkpoint", "action"})["action"] == "nothing to recover"
    (tmp_path / "u" / Journal.PAYLOAD_NAME).write_bytes(b"left by a crash before the journal landed")
    cleaned = _checked(recover(tmp_path / "u"), {"checkpoint", "action", "removed"})
    assert cleaned["removed"] == [Journal.PAYLOAD_NAME]
    permuted = permute_checkpoint(base, first, tmp_path / "p")
    data = _checked(permuted, {"output", "family", "note", "layers_permuted", "tensors_changed", "permutation"})
    assert data["permutation"] == permuted.permutation.as_json()
    _checked(unpermute_checkpoint(tmp_path / "p", tmp_path / "b"), {"output", "layers_restored", "tensors_changed"})


def test_diff_and_describe_return_frozen_results(tmp_path):
    base = tiny(tmp_path / "base")
    a, b = s2ft(base, seed=0), s2ft(base, seed=1, channels=(3, 9))
    a.save(tmp_path / "a")
    rows = diff_adapters(a, b)
    data = _checked(rows, {"identical", "kinds", "tensors"})
    assert data["kinds"] == ["s2ft", "s2ft"] and not rows.identical
    assert {frozenset(r) for r in data["tensors"]} == {frozenset({"tensor", "jaccard", "common", "cosine", "relative_l2", "equal"})}
    merge(base, [a], tmp_path / "m")
    with CheckpointSource(base) as x, CheckpointSource(tmp_path / "m") as y:
        changes = diff_checkpoints(x, y)
    data = _checked(changes, {"identical", "only_in_a", "only_in_b", "tensors"})
    assert len(data["tensors"]) == len(a.targets) and all(r["changed"] > 0 for r in data["tensors"])
    loaded = describe(load(tmp_path / "a"))
    data = _checked(loaded, {"summary", "targets"})
    assert {"digest", "bytes_on_disk", "base"} <= set(data["summary"]) and "ref" not in data["summary"]
    assert data["summary"]["base"] == {"name": "tiny", "revision": None}
    assert "digest" not in describe(b).as_json()["summary"]  # never saved: nothing on disk to report
    assert loaded.with_ref("x:v1").as_json()["summary"]["ref"] == "x:v1"


def test_exports_return_frozen_results(tmp_path):
    base = tiny(tmp_path / "base")
    adapter = s2ft(base)
    _checked(export_lora(adapter, tmp_path / "lora", base=base),
             {"output", "max_rank", "modules", "task_type", "fan_in_fan_out", "max_relative_error", "relative_error",
              "rank", "max_error"})
    _checked(export_gguf_lora(adapter, tmp_path / "a.gguf", base=base),
             {"output", "architecture", "family", "rank", "alpha", "tensors", "max_relative_error", "relative_error"})


FUSED_KEYS = {"tensor", "inputs", "overlapping", "overlap_fraction"}


def test_fuse_returns_a_frozen_result_whose_json_leaves_the_adapter_out(tmp_path):
    """``s2reg fuse --json`` prints the output, the digest and ``tensors``: S2FT rows count the union's
    ``indices``, PISA rows the ``coefficients_per_block``, each without the other kind's key."""
    base = tiny(tmp_path / "base")
    fused = fuse([s2ft(base, seed=1, heads=(0,), channels=(1, 2)), s2ft(base, seed=2, heads=(1,), channels=(7, 9))])
    data = _checked(fused, {"tensors"})
    assert [set(r) for r in data["tensors"]] == [FUSED_KEYS | {"indices"}] * len(fused.adapter.targets)
    assert fused.adapter.kind == "s2ft" and [r["tensor"] for r in data["tensors"]] == sorted(fused.adapter.targets)
    spectral = fuse([pisa(base, seed=1), pisa(base, seed=2)])
    data = _checked(spectral, {"tensors"})
    assert [set(r) for r in data["tensors"]] == [FUSED_KEYS | {"coefficients_per_block"}] * len(spectral.adapter.targets)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spectral.tensors[0].overlapping = 0  # type: ignore[misc]


def _counting_identity(monkeypatch) -> list[str]:
    """Every payload hash the plans take, by identity."""
    calls: list[str] = []
    real = plan_module.adapter_identity

    def counted(adapter):
        calls.append(real(adapter))
        return calls[-1]

    monkeypatch.setattr(plan_module, "adapter_identity", counted)
    return calls


def test_each_adapter_is_hashed_once_per_plan(tmp_path, monkeypatch):
    """The identity hashes the whole payload (FORMAT §3.4): a plan takes it once per adapter, at construction,
    and the checks, the ledger and the report reuse it."""
    base = tiny(tmp_path / "base")
    adapters = [s2ft(base), pisa(base)]
    calls = _counting_identity(monkeypatch)
    report = merge(base, adapters, tmp_path / "m")
    assert len(calls) == 2 and list(report.adapters) == calls
    calls.clear()
    unmerge(tmp_path / "m", adapters, tmp_path / "u")
    assert len(calls) == 2
    calls.clear()
    shutil.copytree(base, tmp_path / "in-place")
    merge_in_place(tmp_path / "in-place", adapters)
    unmerge_in_place(tmp_path / "in-place", adapters)
    assert len(calls) == 4  # two plans of two adapters each


def test_a_plan_cannot_be_mutated(tmp_path):
    base = tiny(tmp_path / "base")
    adapter = s2ft(base)
    with CheckpointSource(base) as source:
        plan = plan_merge(source, [adapter])
        with pytest.raises(dataclasses.FrozenInstanceError):
            plan.ledger_after = plan.ledger_before  # type: ignore[misc]
        name = next(iter(plan.touched))
        with pytest.raises(TypeError):
            plan.touched[name] = ()  # type: ignore[index]
        with pytest.raises(TypeError):
            plan.expect_sha[name] = "0" * 64  # type: ignore[index]
        assert isinstance(plan.touched[name], tuple) and isinstance(plan.adapters, tuple)
        assert isinstance(plan.stacked, frozenset) and isinstance(plan.unverified, frozenset)
    merge(base, [adapter], tmp_path / "m")
    with CheckpointSource(tmp_path / "m") as source:
        plan = plan_unmerge(source, [adapter])
        assert set(plan.expect_sha) == set(adapter.targets)  # S2FT: every tensor's original bytes come back
        with pytest.raises(TypeError):
            del plan.expect_sha[name]  # type: ignore[attr-defined]
