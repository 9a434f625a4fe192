"""Save/load round trips, determinism and versioning (FORMAT §3, §3.6, §3.7, §6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

import s2reg
from s2reg.errors import FormatError, UnsupportedVersion
from s2reg.format import UnknownKeyWarning, manifest
from s2reg.format.arrays import as_array
from s2reg.kinds import KINDS, kind_named

from .helpers import (DOWN, EXPERT_DOWN, GATE_UP, expert_adapter, expert_base, forge, parts, pisa_adapter, s2ft_adapter,
                      signed_zero_adapter)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "spec" / "manifest.schema.json").read_text())


def assert_same(a, b):
    assert type(a) is type(b)
    assert a.targets.keys() == b.targets.keys()
    for name, ta in a.targets.items():
        tb = b.targets[name]
        assert ta.manifest_entry() == tb.manifest_entry()
        for key, value in ta.payload_tensors(name).items():
            other = tb.payload_tensors(name)[key]
            assert value.dtype == other.dtype and value.shape == other.shape and value.tobytes() == other.tobytes(), key
    assert a.base.fingerprints == b.base.fingerprints
    assert a.params == b.params and a.provenance == b.provenance


@pytest.mark.parametrize("make", [s2ft_adapter, pisa_adapter, signed_zero_adapter])
@pytest.mark.parametrize("compress", [False, True])
def test_save_load_round_trip(tmp_path, make, compress):
    adapter = make(params={"budget": 4})
    stored = adapter.save(tmp_path / "a", compress=compress)
    loaded = s2reg.load(tmp_path / "a")
    assert_same(adapter, loaded)
    assert loaded.stored.digest == stored.digest
    # FORMAT §3.7: re-saving a loaded adapter gives the same bytes.
    again = loaded.save(tmp_path / "b", compress=compress)
    assert again.digest == stored.digest
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


@pytest.mark.parametrize("make", [s2ft_adapter, pisa_adapter, signed_zero_adapter])
def test_manifest_follows_json_schema(tmp_path, make):
    make().save(tmp_path / "a")
    jsonschema.validate(json.loads((tmp_path / "a" / "s2reg.json").read_text()), SCHEMA)


def test_manifest_is_canonical_json(tmp_path):
    """FORMAT §3: sorted keys, indent 2, trailing newline."""
    s2ft_adapter().save(tmp_path / "a")
    text = (tmp_path / "a" / "s2reg.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def test_payload_is_plain_safetensors(tmp_path):
    """FORMAT §6.1: any safetensors reader opens the raw payload."""
    from safetensors.torch import load_file

    adapter = s2ft_adapter()
    adapter.save(tmp_path / "a", compress=False)
    tensors = load_file(tmp_path / "a" / "payload.safetensors")
    for name, target in adapter.targets.items():
        assert tensors[f"{name}.indices"].tolist() == target.indices.tolist()
        assert tensors[f"{name}.delta"].numpy().tobytes() == target.delta.tobytes()


_DIGEST_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from tests.format.helpers import s2ft_adapter, pisa_adapter
print(s2ft_adapter().save(sys.argv[1] + "/s").digest, pisa_adapter().save(sys.argv[1] + "/p").digest)
"""


@pytest.mark.slow  # over 20 s on 2 cores: outside the quick subset (README)
def test_digest_stable_across_processes(tmp_path):
    """FORMAT §3.7: the same adapter serialises to the same bytes in separate runs."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000", "PYTHONHASHSEED": "random"}
    outs = []
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
        result = subprocess.run(
            [sys.executable, "-c", _DIGEST_SCRIPT, str(tmp_path / run), str(ROOT)],
            env=env, capture_output=True, text=True, check=True,
        )
        outs.append(result.stdout.split())
    assert outs[0] == outs[1]
    for name in ("s", "p"):
        for f in (tmp_path / "one" / name).iterdir():
            assert f.read_bytes() == (tmp_path / "two" / name / f.name).read_bytes()


def test_compression_shrinks_exact_bf16_differences(tmp_path):
    """FORMAT §4.3: F32 exact differences of BF16 weights compress to about BF16 size or less."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(256, 512, generator=g).bfloat16()}
    tuned = (base["w"][:, :64].float() + torch.randn(256, 64, generator=g) * 1e-2).bfloat16()
    adapter = s2reg.S2FTAdapter.from_tuned(base, {"w": ("columns", range(64), tuned)}, base_name="b")
    raw = adapter.save(tmp_path / "raw", compress=False)
    packed = adapter.save(tmp_path / "zst", compress=True)
    assert packed.payload_bytes < 0.6 * raw.payload_bytes
    assert packed.payload_bytes < 256 * 64 * 2  # smaller than the bf16 slice itself


def test_unknown_keys_are_kept_with_a_warning(tmp_path):
    """FORMAT §3.6: unknown keys are preserved and written back."""
    adapter = s2ft_adapter()
    adapter.save(tmp_path / "a", compress=False)
    data = json.loads((tmp_path / "a" / "s2reg.json").read_text())
    data["future_feature"] = {"x": 1}
    name = next(iter(data["targets"]))
    data["targets"][name]["future_hint"] = "y"
    (tmp_path / "a" / "s2reg.json").write_text(json.dumps(data))
    with pytest.warns(UnknownKeyWarning, match="future_feature"):
        loaded = s2reg.load(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.save(tmp_path / "b", compress=False)
    again = json.loads((tmp_path / "b" / "s2reg.json").read_text())
    assert again["future_feature"] == {"x": 1}
    assert again["targets"][name]["future_hint"] == "y"


def test_newer_format_version_is_refused(tmp_path):
    adapter = s2ft_adapter()
    adapter.save(tmp_path / "a", compress=False)
    data = json.loads((tmp_path / "a" / "s2reg.json").read_text())
    data["format_version"] = manifest.FORMAT_VERSION + 1
    (tmp_path / "a" / "s2reg.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedVersion, match="upgrade s2reg"):
        s2reg.load(tmp_path / "a")


def test_save_refuses_to_overwrite_and_replaces_when_asked(tmp_path):
    adapter = s2ft_adapter()
    adapter.save(tmp_path / "a")
    with pytest.raises(FileExistsError):
        adapter.save(tmp_path / "a")
    adapter.save(tmp_path / "a", compress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["payload.safetensors", "s2reg.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp dirs left


def test_source_date_epoch_sets_created(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    assert s2ft_adapter().provenance["created"] == "1970-01-01T00:00:00Z"


def test_load_builds_through_the_constructor_and_keeps_the_stored_provenance(tmp_path, monkeypatch):
    """FORMAT §3.7: a loaded adapter is the stored one: the constructor checks it (``allow_nonfinite`` passed
    through) and stamps nothing anew, neither the tool nor the clock (an unusable SOURCE_DATE_EPOCH included)."""
    from s2reg.format import adapter as adapter_module

    adapter = s2ft_adapter(provenance={"source": "train", "tool": "s2reg 0.0.1", "created": "2020-01-01T00:00:00Z",
                                       "training": {"steps": 3}, "note": "kept"})
    adapter.save(tmp_path / "a")
    built = []

    class Counted(adapter_module.S2FTAdapter):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["allow_nonfinite"])
            super().__init__(*args, **kwargs)

    class CountedKind(type(kind_named("s2ft"))):  # load() finds the adapter type through the kinds registry
        adapter_type = Counted  # type: ignore[assignment]

    monkeypatch.setitem(KINDS, "s2ft", CountedKind())
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "not a number")
    loaded = s2reg.load(tmp_path / "a", allow_nonfinite=True)
    assert type(loaded) is Counted and built == [True]
    assert list(loaded.provenance.items()) == sorted(adapter.provenance.items())  # as stored (keys sorted)


def test_parts_helper_matches_saved_manifest(tmp_path):
    adapter = s2ft_adapter()
    adapter.save(tmp_path / "a", compress=False)
    data, _ = parts(adapter)
    assert data == json.loads((tmp_path / "a" / "s2reg.json").read_text())


def test_restore_lists_are_version_2_and_everything_else_stays_version_1(tmp_path):
    """FORMAT §3.6: the lowest version that holds the adapter, in the manifest and the payload metadata."""
    for make, version in ((s2ft_adapter, 1), (pisa_adapter, 1), (signed_zero_adapter, 2)):
        adapter = make()
        adapter.save(tmp_path / make.__name__, compress=False)
        data = json.loads((tmp_path / make.__name__ / "s2reg.json").read_text())
        assert data["format_version"] == version
        _, meta = s2reg.format.payload.load((tmp_path / make.__name__ / "payload.safetensors").read_bytes())
        assert meta["s2reg.format_version"] == str(version)
    restore = signed_zero_adapter().targets[DOWN].restore
    assert restore.index.tolist() == [0, 5, 21]  # flat positions in the [16, 4] slice: (0,0), (1,1), (5,1)


def test_an_old_reader_refuses_restore_lists_and_never_merges_without_them(tmp_path, monkeypatch):
    """FORMAT §3.6: a version-1 reader stops at the version; one that skipped it would find unknown payload tensors."""
    signed_zero_adapter().save(tmp_path / "a", compress=False)
    monkeypatch.setattr(manifest, "FORMAT_VERSION", 1)
    with pytest.raises(UnsupportedVersion, match="format_version 2 but this s2reg reads up to 1; upgrade s2reg"):
        s2reg.load(tmp_path / "a")
    monkeypatch.undo()
    data, tensors = parts(signed_zero_adapter())
    data["format_version"] = 1
    with pytest.raises(FormatError, match="need format_version 2"):
        s2reg.load(forge(tmp_path / "v1", data, tensors))
    for entry in data["targets"].values():  # what a version-1 writer's manifest would say: no restore field
        entry.pop("restore", None)
    with pytest.raises(FormatError, match="unexpected .*restore"):
        s2reg.load(forge(tmp_path / "old", data, tensors))


# -- stacked experts (FORMAT §4.1 expert axes, §4.5; version 3) ----------------------------------------------
def test_expert_axes_address_one_expert_s_rows_and_columns_and_merge_exactly(tmp_path):
    """Index e * n + k is row/column k of expert e; merge and unmerge are bit-exact, signed zeros included."""
    base = expert_base()
    adapter = expert_adapter(base)
    adapter.save(tmp_path / "a")
    loaded = s2reg.load(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "s2reg.json").read_text())["format_version"] == 3
    up, down = loaded.targets[GATE_UP], loaded.targets[EXPERT_DOWN]
    assert list(up.delta.shape) == [8, 6] and list(down.delta.shape) == [3, 8]
    dense = up.to_dense()
    for j, (expert, column) in enumerate([(0, 2), (0, 3), (1, 0), (1, 1), (2, 8), (2, 9)]):
        assert np.array_equal(dense[expert, :, column], up.delta[:, j])
    assert int((dense != 0).any(1).sum()) == 6  # nothing else is touched
    dense = down.to_dense()
    for j, (expert, row) in enumerate([(0, 1), (1, 0), (2, 4)]):
        assert np.array_equal(dense[expert, row], down.delta[j])
    assert any(t.restore is not None for t in loaded.targets.values())  # the base holds -0.0 every 7th element
    for name, target in loaded.targets.items():
        weight = as_array(base[name])
        merged = target.merged(weight)
        expected = weight.astype(np.float64) + target.to_dense().astype(np.float64)
        changed = target.to_dense() != 0
        assert np.array_equal(merged.astype(np.float64)[changed], expected.astype(weight.dtype).astype(np.float64)[changed])
        assert np.array_equal(target.merged(merged, subtract=True).view(np.int16), weight.view(np.int16))


def test_an_old_reader_refuses_expert_axes(tmp_path, monkeypatch):
    """FORMAT §3.6: a version-2 reader stops at the version; a version-2 manifest with an expert axis is refused."""
    expert_adapter().save(tmp_path / "a", compress=False)
    monkeypatch.setattr(manifest, "FORMAT_VERSION", 2)
    with pytest.raises(UnsupportedVersion, match="format_version 3 but this s2reg reads up to 2; upgrade s2reg"):
        s2reg.load(tmp_path / "a")
    monkeypatch.undo()
    data, tensors = parts(expert_adapter())
    data["format_version"] = 2
    with pytest.raises(FormatError, match="need format_version 3"):
        s2reg.load(forge(tmp_path / "v2", data, tensors))


@pytest.mark.parametrize("forgery, message", [
    (lambda d, t: t.__setitem__(f"{GATE_UP}.indices", torch.tensor([2, 3, 10, 11, 28, 30], dtype=torch.int32)),
     "index 30 out of range for expert_columns of length 30"),
    (lambda d, t: d["targets"][EXPERT_DOWN].update(axis="expert_columns"), "delta shape"),
    (lambda d, t: [x.update(shape=[15, 8]) for x in (d["targets"][EXPERT_DOWN], d["base"]["fingerprints"][EXPERT_DOWN])],
     "needs a rank-2 or 3 tensor|delta shape"),
    (lambda d, t: [x.update(shape=[24, 10]) for x in (d["targets"][GATE_UP], d["base"]["fingerprints"][GATE_UP])],
     "axis 'expert_columns' needs a rank-3 tensor"),
    (lambda d, t: d["targets"][GATE_UP].update(group_size=4), "group_size 4 does not divide the expert_columns length 10"),
])
def test_forged_expert_targets_are_refused(tmp_path, forgery, message):
    data, tensors = parts(expert_adapter())
    forgery(data, tensors)
    with pytest.raises(s2reg.S2RegError, match=message):
        s2reg.load(forge(tmp_path / "forged", data, tensors))
