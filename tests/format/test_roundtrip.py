"""Save/load round trips, determinism and versioning (FORMAT §3, §3.6, §3.7, §6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jsonschema
import pytest
import torch

import s2reg
from s2reg.errors import FormatError, UnsupportedVersion
from s2reg.format import UnknownKeyWarning, manifest

from .helpers import DOWN, forge, parts, pisa_adapter, s2ft_adapter, signed_zero_adapter

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
    with pytest.raises(FormatError, match="restore lists need format_version 2"):
        s2reg.load(forge(tmp_path / "v1", data, tensors))
    for entry in data["targets"].values():  # what a version-1 writer's manifest would say: no restore field
        entry.pop("restore", None)
    with pytest.raises(FormatError, match="unexpected .*restore"):
        s2reg.load(forge(tmp_path / "old", data, tensors))
