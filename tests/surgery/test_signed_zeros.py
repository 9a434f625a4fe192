"""Signed zeros in the base (as in checkpoints dequantised from GGUF): merge and unmerge restore every bit
(FORMAT §4.3 restore lists; spec/SURGERY.md §2 rules 3-4)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.arch import resolve_source
from s2reg.cli import main
from s2reg.surgery.ledger import LEDGER_NAME
from s2reg.tensors import CheckpointSource, save_state_dict

from .helpers import negative_zeros, signed_zero_changes, tensor_digests, tiny

def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("zeros") / "base", negative_zeros=0.05)


def test_fixture_projections_hold_negative_zeros(base):
    with CheckpointSource(base) as source:
        counts = {n: int(negative_zeros(source.get(n)).sum()) for n in source.names() if "proj" in n}
        assert all(c > 0 for c in counts.values()), counts
        assert int(negative_zeros(source.get("model.embed_tokens.weight")).sum()) == 0


@pytest.mark.parametrize("skip_base_check", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_cli_merge_then_unmerge_restores_every_tensor(base, tmp_path, skip_base_check, in_place):
    """The issue's case: -0.0 in the trained slices; merge (also without the base check) then unmerge
    gives back every sha256."""
    with CheckpointSource(base) as source:
        slices, expected = signed_zero_changes(source)
        adapter = s2reg.S2FTAdapter.from_tuned(source, slices, base_name="tiny")
    assert all(t.restore is not None for t in adapter.targets.values())
    adapter.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "s2reg.json").read_text())["format_version"] == 2
    flags = ["--skip-base-check"] if skip_base_check else []
    if in_place:
        work = tmp_path / "work"
        save_state_dict(work, _all(base), extra_files={"config.json": (base / "config.json").read_bytes()})
        assert tensor_digests(work) == tensor_digests(base)
        merged_at, back_at = work, work
        merged = run("merge", work, tmp_path / "a", "--in-place", *flags)
    else:
        merged_at, back_at = tmp_path / "m", tmp_path / "b"
        merged = run("merge", base, tmp_path / "a", "-o", merged_at, *flags)
    assert merged.exit_code == 0, merged.output
    with CheckpointSource(merged_at) as source:
        for name, tensor in expected.items():  # merge reproduces the tuned bits, signed zeros included
            assert torch.equal(source.get(name).view(torch.int16), tensor.view(torch.int16)), name
    assert "inexact" not in json.loads((merged_at / LEDGER_NAME).read_text())
    args = ["--in-place"] if in_place else ["-o", back_at]
    back = run("unmerge", merged_at, tmp_path / "a", *args)
    assert back.exit_code == 0, back.output
    assert tensor_digests(back_at) == tensor_digests(base)


def _all(directory):
    with CheckpointSource(directory) as source:
        return {n: source.get(n) for n in source.names()}


def test_unchecked_merge_onto_a_different_base_is_recorded_and_its_unmerge_refused(base, tmp_path):
    """An adapter made where the -0.0 were +0.0, merged onto the -0.0 base: unmerge cannot restore the signs."""
    tensors = _all(base)
    save_state_dict(tmp_path / "clean", {n: t + 0.0 for n, t in tensors.items()},  # x + 0.0 turns -0.0 into +0.0
                    extra_files={"config.json": (base / "config.json").read_bytes()})
    with CheckpointSource(tmp_path / "clean") as source:
        slices = _small_changes(source)
        adapter = s2reg.S2FTAdapter.from_tuned(source, slices, base_name="clean")
    adapter.save(tmp_path / "a")
    refused = run("merge", base, tmp_path / "a", "-o", tmp_path / "m")
    assert refused.exit_code == 1 and "--skip-base-check" in refused.output
    assert run("merge", base, tmp_path / "a", "-o", tmp_path / "m", "--skip-base-check").exit_code == 0
    ledger = json.loads((tmp_path / "m" / LEDGER_NAME).read_text())
    assert ledger["inexact"] and set(ledger["inexact"]) <= set(adapter.targets)
    plain = run("unmerge", tmp_path / "m", tmp_path / "a", "-o", tmp_path / "b")
    assert plain.exit_code == 1 and "cannot restore them bit for bit" in plain.output
    assert not (tmp_path / "b").exists()
    forced = run("unmerge", tmp_path / "m", tmp_path / "a", "-o", tmp_path / "b", "--skip-base-check")
    assert forced.exit_code == 0, forced.output
    lost = {n for n, sha in tensor_digests(tmp_path / "b").items() if sha != tensor_digests(base)[n]}
    assert lost and lost <= set(ledger["inexact"])  # exactly the recorded tensors differ
    assert not (tmp_path / "b" / LEDGER_NAME).exists()


def _small_changes(source):
    """Two rows of every q projection moved a little, whatever they hold."""
    info = resolve_source(source)
    g = torch.Generator().manual_seed(4)
    slices = {}
    for layer in (0, 1):
        (name,) = info.tensors("q", layer)
        part = source.get(name)[4:6]
        slices[name] = ("rows", [4, 5], (part.double() + torch.randn(part.shape, generator=g, dtype=torch.float64) * 0.01).to(part.dtype))
    return slices


def test_live_apply_and_remove_restore_negative_zeros(base):
    from .helpers import model_of

    with CheckpointSource(base) as source:
        slices, expected = signed_zero_changes(source, layers=(1,))
        adapter = s2reg.S2FTAdapter.from_tuned(source, slices, base_name="tiny")
    model = model_of(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with s2reg.applied(model, adapter):
        params = dict(model.named_parameters())
        for name, tensor in expected.items():
            assert torch.equal(params[name].detach().view(torch.int16), tensor.view(torch.int16))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.int16), before[name].view(torch.int16)), name
