"""In-place merge/unmerge, the undo journal, and recovery from crashes (spec/SURGERY.md §3)."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil

import pytest
from click.testing import CliRunner

from s2reg.cli import main
from s2reg.errors import CheckpointError, S2RegError
from s2reg.surgery import inplace as inplace_module
from s2reg.surgery import (
    merge,
    merge_in_place,
    patching,
    pending,
    recover,
    unmerge_in_place,
)
from s2reg.tensors import CheckpointSource

from .helpers import file_digests, pisa, s2ft, tiny


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("inplace")
    base = tiny(root / "base")
    adapter = s2ft(base, channels=(2, 3, 50, 90, 91))
    merge(base, [adapter], root / "merged")
    return base, adapter, file_digests(base), file_digests(root / "merged")


def fresh(pristine, tmp_path):
    base, adapter, _, _ = pristine
    copy = tmp_path / "ckpt"
    shutil.copytree(base, copy)
    return copy, adapter


def shards(digests):
    return {n: d for n, d in digests.items() if n.endswith(".safetensors")}


def test_in_place_equals_new_checkpoint_and_unmerges_exactly(pristine, tmp_path):
    base, adapter, base_digests, merged_digests = pristine
    ckpt, _ = fresh(pristine, tmp_path)
    report = merge_in_place(ckpt, [adapter])
    assert shards(file_digests(ckpt)) == shards(merged_digests)
    assert report["bytes_patched"] < sum((base / n).stat().st_size for n in shards(base_digests)) / 4
    with pytest.raises(S2RegError, match="already merged"):
        merge_in_place(ckpt, [adapter])
    unmerge_in_place(ckpt, [adapter])
    assert file_digests(ckpt) == base_digests


def test_in_place_pisa_round_trip(pristine, tmp_path):
    ckpt, _ = fresh(pristine, tmp_path)
    adapter = pisa(ckpt)
    merge_in_place(ckpt, [adapter])
    merge(pristine[0], [adapter], tmp_path / "reference")
    assert shards(file_digests(ckpt)) == shards(file_digests(tmp_path / "reference"))


def _crash_after(ckpt, adapter, writes: int, mode: str) -> None:
    """Child process: an in-place merge that dies (os._exit) or raises after ``writes`` tensor patches."""
    real = patching.write_patch
    count = [0]

    def failing(*args):
        count[0] += 1
        if count[0] == writes + 1 or (mode == "broken" and count[0] > writes):
            if mode == "exit":
                os._exit(17)
            raise OSError(5, "Input/output error (injected)")
        return real(*args)

    patching.write_patch = failing
    try:
        merge_in_place(ckpt, [adapter])
    except OSError:
        os._exit(3)  # the write failed and was rolled back
    except CheckpointError:
        os._exit(4)  # the rollback failed too: the journal is left for recover
    os._exit(0)


def run_child(*args) -> int:
    process = multiprocessing.get_context("fork").Process(target=_crash_after, args=args)
    process.start()
    process.join()
    return process.exitcode


@pytest.mark.parametrize("seed", range(4))
def test_crash_at_a_random_write_recovers_to_base_or_merged(pristine, tmp_path, seed):
    _, _, base_digests, merged_digests = pristine
    ckpt, adapter = fresh(pristine, tmp_path)
    writes = random.Random(seed).randrange(0, len(adapter.targets))
    assert run_child(ckpt, adapter, writes, "exit") == 17
    assert pending(ckpt)
    with pytest.raises(CheckpointError, match="s2reg recover"):
        CheckpointSource(ckpt)
    with pytest.raises(CheckpointError, match="s2reg recover"):
        merge_in_place(ckpt, [adapter])
    forward = seed % 2 == 1
    result = CliRunner().invoke(main, ["recover", str(ckpt)] + (["--forward"] if forward else []))
    assert result.exit_code == 0, result.output
    assert not pending(ckpt)
    expected = merged_digests if forward else base_digests
    assert shards(file_digests(ckpt)) == shards(expected)
    if not forward:
        assert file_digests(ckpt) == base_digests  # ledger restored too


def test_injected_io_error_rolls_back_at_once(pristine, tmp_path):
    _, _, base_digests, _ = pristine
    ckpt, adapter = fresh(pristine, tmp_path)
    assert run_child(ckpt, adapter, 3, "raise") == 3
    assert not pending(ckpt)
    assert file_digests(ckpt) == base_digests


def test_failed_rollback_leaves_the_journal_for_recover(pristine, tmp_path):
    _, _, base_digests, _ = pristine
    ckpt, adapter = fresh(pristine, tmp_path)
    assert run_child(ckpt, adapter, 3, "broken") == 4
    assert pending(ckpt)
    assert recover(ckpt)["action"] == "rolled back"
    assert file_digests(ckpt) == base_digests


def test_crash_before_the_journal_landed_leaves_the_base(pristine, tmp_path, monkeypatch):
    _, _, base_digests, _ = pristine
    ckpt, adapter = fresh(pristine, tmp_path)
    real = inplace_module.write_file

    def dies_on_journal(path, data):
        real(path, data)
        if path.name == inplace_module.JOURNAL_PAYLOAD:
            raise KeyboardInterrupt

    monkeypatch.setattr(inplace_module, "write_file", dies_on_journal)
    with pytest.raises(KeyboardInterrupt):
        merge_in_place(ckpt, [adapter])
    assert not pending(ckpt)
    assert recover(ckpt)["action"] == "cleaned"
    assert file_digests(ckpt) == base_digests


def test_corrupt_journal_is_refused(pristine, tmp_path):
    ckpt, adapter = fresh(pristine, tmp_path)
    assert run_child(ckpt, adapter, 3, "exit") == 17
    payload = ckpt / inplace_module.JOURNAL_PAYLOAD
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0xFF
    payload.write_bytes(bytes(data))
    with pytest.raises(Exception, match="journal payload corrupted"):
        recover(ckpt)
    assert pending(ckpt)


def test_read_only_shard_is_refused_before_the_journal(pristine, tmp_path, monkeypatch):
    _, _, base_digests, _ = pristine
    ckpt, adapter = fresh(pristine, tmp_path)
    monkeypatch.setattr(inplace_module.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="not writable"):
        merge_in_place(ckpt, [adapter])
    assert file_digests(ckpt) == base_digests and not pending(ckpt)


def test_recover_with_nothing_pending(pristine, tmp_path):
    ckpt, _ = fresh(pristine, tmp_path)
    assert recover(ckpt)["action"] == "nothing to recover"
