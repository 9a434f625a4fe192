"""Merge and unmerge into new checkpoints (spec/SURGERY.md §1-2)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import numpy as np
import torch
from click.testing import CliRunner

import s2reg
from s2reg.cli import main
from s2reg.errors import (
    BaseMismatch,
    CheckpointError,
    NonFiniteError,
    S2RegError,
    ShapeError,
)
from s2reg.ops.live import apply
from s2reg.surgery import merge, unmerge
from s2reg.surgery.ledger import LEDGER_NAME
from s2reg.tensors import CheckpointSource

from .helpers import file_digests, logits, model_of, pisa, s2ft, tensor_digests, tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("base") / "llama")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_merge_equals_in_memory_apply_and_unmerge_restores_every_byte(tmp_path, family):
    base = tiny(tmp_path / "base", family)
    adapter = s2ft(base)
    merge(base, [adapter], tmp_path / "merged")
    reference = model_of(base)
    apply(reference, adapter)
    assert torch.equal(logits(model_of(tmp_path / "merged")), logits(reference))
    unmerge(tmp_path / "merged", [adapter], tmp_path / "back")
    assert tensor_digests(tmp_path / "back") == tensor_digests(base)
    assert file_digests(tmp_path / "back") == file_digests(base)  # ledger gone, shards identical


def test_output_keeps_layout_dtypes_and_side_files(base, tmp_path):
    merge(base, [s2ft(base)], tmp_path / "m")
    with CheckpointSource(base) as a, CheckpointSource(tmp_path / "m") as b:
        assert a.shard_names() == b.shard_names()
        assert {n: a.dtype(n) for n in a.names()} == {n: b.dtype(n) for n in b.names()}
    assert (tmp_path / "m" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    ledger = json.loads((tmp_path / "m" / LEDGER_NAME).read_text())
    assert len(ledger["merged"]) == 1 and ledger["merged"][0]["kind"] == "s2ft"


def test_untouched_shards_are_copied_verbatim(base, tmp_path):
    adapter = s2ft(base, layers=[1])
    report = merge(base, [adapter], tmp_path / "m")
    assert report.tensors_patched == len(adapter.targets)
    same = {n for n, d in file_digests(tmp_path / "m").items() if file_digests(base).get(n) == d}
    with CheckpointSource(base) as source:
        untouched = {f for f, names in source.shard_names().items() if not set(names) & set(adapter.targets)}
    assert untouched and untouched <= same


def test_several_adapters_in_one_pass_and_unmerge_order(base, tmp_path):
    a = s2ft(base, seed=1)
    b = s2ft(base, seed=2, heads=(0,), channels=(5, 9))  # disjoint from a
    merge(base, [a, b], tmp_path / "ab")
    merge(base, [a], tmp_path / "a")
    merge(tmp_path / "a", [b], tmp_path / "a_then_b")
    assert tensor_digests(tmp_path / "ab") == tensor_digests(tmp_path / "a_then_b")
    unmerge(tmp_path / "ab", [a], tmp_path / "b_only")  # not the last one in, but disjoint: exact
    merge(base, [b], tmp_path / "b_alone")
    assert tensor_digests(tmp_path / "b_only") == tensor_digests(tmp_path / "b_alone")
    unmerge(tmp_path / "ab", [a, b], tmp_path / "none")
    assert tensor_digests(tmp_path / "none") == tensor_digests(base)


def _inexact_pair(base_value: torch.Tensor):
    """Slice values (first tuned, second tuned) whose stacking cannot be undone exactly in bf16."""
    for step_a in range(1, 200):
        for step_b in range(1, 200):
            tuned_a = base_value + step_a * 2.0 ** -9
            tuned_b = base_value - step_b * 2.0 ** -11
            da = tuned_a.bfloat16().double() - base_value.bfloat16().double()
            db = tuned_b.bfloat16().double() - base_value.bfloat16().double()
            stacked = (base_value.bfloat16().double() + da).bfloat16()
            on_top = (stacked.double() + db).bfloat16()
            if not torch.equal((on_top.double() - db).bfloat16(), stacked):
                return tuned_a.bfloat16(), tuned_b.bfloat16()
    raise AssertionError("no inexact pair found")


def test_overlapping_adapters_that_cannot_unmerge_exactly_are_refused(base, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    with CheckpointSource(base) as source:
        weight = source.get(name)
        column = weight[:, :1].double()
        tuned_a, tuned_b = _inexact_pair(column)
        a = s2reg.S2FTAdapter.from_tuned(source, {name: ("columns", [0], tuned_a)}, base_name="tiny")
        b = s2reg.S2FTAdapter.from_tuned(source, {name: ("columns", [0], tuned_b)}, base_name="tiny")
    merge(base, [a], tmp_path / "a")
    with pytest.raises(S2RegError, match="could not be unmerged exactly"):
        merge(tmp_path / "a", [b], tmp_path / "ab")
    with pytest.raises(S2RegError, match="could not be unmerged exactly"):
        merge(base, [a, b], tmp_path / "ab")
    assert not (tmp_path / "ab").exists()


def test_merging_twice_is_refused(base, tmp_path):
    adapter = s2ft(base)
    merge(base, [adapter], tmp_path / "m")
    with pytest.raises(S2RegError, match="already merged"):
        merge(tmp_path / "m", [adapter], tmp_path / "mm")
    with pytest.raises(S2RegError, match="already merged"):
        merge(base, [adapter, adapter], tmp_path / "mm")
    assert not (tmp_path / "mm").exists()


def test_wrong_base_is_refused_unless_unverified_but_shapes_never(base, tmp_path):
    other = tiny(tmp_path / "other", seed=5)
    adapter = s2ft(base)
    with pytest.raises(BaseMismatch, match="--skip-base-check"):
        merge(other, [adapter], tmp_path / "m")
    with pytest.raises(BaseMismatch, match="--skip-base-check"):  # overwriting an output never skips the check
        merge(other, [adapter], tmp_path / "m", overwrite=True)
    # the shards were being copied while the check ran: no output, and no staging directory left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    merge(other, [adapter], tmp_path / "m", verify_base=False)
    wide = tiny(tmp_path / "wide", hidden_size=32)
    with pytest.raises(ShapeError, match="adapter expects"):
        merge(wide, [adapter], tmp_path / "w", verify_base=False)


def test_nan_result_is_refused_and_nothing_written(base, tmp_path):
    adapter = s2ft(base)
    name = "model.layers.0.mlp.down_proj.weight"
    adapter.targets[name].delta = adapter.targets[name].delta.astype(np.float64) * 1e40  # overflows bf16 once merged
    before = file_digests(base)
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        merge(base, [adapter], tmp_path / "m")
    assert not (tmp_path / "m").exists() and file_digests(base) == before


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 values at the magnitude of ``x`` (8 significant bits)."""
    magnitude = x.double().abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - 7)


def test_pisa_unmerge_error_is_within_one_ulp_of_the_merged_value(base, tmp_path):
    """spec/SURGERY.md §5: PISA merge rounds once at the merged magnitude, unmerge once more."""
    adapter = pisa(base)
    merge(base, [adapter], tmp_path / "m")
    unmerge(tmp_path / "m", [adapter], tmp_path / "back")
    with CheckpointSource(base) as a, CheckpointSource(tmp_path / "m") as m, CheckpointSource(tmp_path / "back") as b:
        for name in adapter.targets:
            error = (a.get(name).double() - b.get(name).double()).abs()
            assert bool((error <= bf16_ulp(m.get(name))).all()), name
            assert float((error == 0).double().mean()) > 0.5  # most elements come back exactly


def test_truncated_base_shard_is_a_clear_error(base, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="truncated"):
        merge(copy, [s2ft(base)], tmp_path / "m")


def test_full_disk_leaves_no_output_and_inputs_untouched_and_names_the_output(base, tmp_path, monkeypatch):
    """The in-kernel copy of the second shard finds the disk full; the OS error names the file it read."""
    second = sorted(base.glob("*.safetensors"))[1].name

    def in_kernel_copy(real):
        def copy(out_fd, in_fd, *args):
            if os.readlink(f"/proc/self/fd/{in_fd}").endswith(second):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(out_fd, in_fd, *args)
        return copy

    for name in ("sendfile", "copy_file_range"):  # whichever shutil uses here
        if hasattr(os, name):
            monkeypatch.setattr(os, name, in_kernel_copy(getattr(os, name)))
    before = file_digests(base)
    result = CliRunner().invoke(main, ["merge", str(base), "-o", str(tmp_path / "m"), "--json", str(_saved(base, tmp_path))])
    assert result.exit_code == 1
    assert result.output == f"Error: No space left on device while writing {tmp_path / 'm'}\n"
    assert not (tmp_path / "m").exists() and file_digests(base) == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_read_only_output_directory(base, tmp_path, monkeypatch):
    """Simulated with EROFS at the first write (the tests may run as root, which ignores modes)."""
    from s2reg import fsatomic

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "ro"))

    adapter = _saved(base, tmp_path)
    before = file_digests(base)
    monkeypatch.setattr(fsatomic.tempfile, "mkdtemp", read_only)
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "ro" / "m")])
    assert result.exit_code == 1 and "Read-only file system" in result.output and "Traceback" not in result.output
    assert file_digests(base) == before


def _saved(base, tmp_path):
    path = tmp_path / "adapter"
    if not path.exists():
        s2ft(base).save(path)
    return path


def test_cli_merge_unmerge_round_trip(base, tmp_path):
    adapter = _saved(base, tmp_path)
    run = CliRunner().invoke
    assert run(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "m")]).exit_code == 0
    again = run(main, ["merge", str(tmp_path / "m"), str(adapter), "-o", str(tmp_path / "mm")])
    assert again.exit_code == 1 and "already merged" in again.output
    out = run(main, ["unmerge", str(tmp_path / "m"), str(adapter), "-o", str(tmp_path / "b"), "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["merged_now"] == []
    assert tensor_digests(tmp_path / "b") == tensor_digests(base)
    both = run(main, ["merge", str(base), str(adapter)])
    assert both.exit_code == 2 and "exactly one of" in both.output
