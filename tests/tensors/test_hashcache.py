"""Remembered tensor hashes (spec/SURGERY.md §6): used only while their file is provably the same."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from s2reg.errors import BaseMismatch
from s2reg.format.digest import sha256_bytes
from s2reg.surgery import merge, merge_in_place, permute_checkpoint, unmerge_in_place
from s2reg.tensors import CheckpointSource, save_state_dict
from s2reg.tensors import hashcache
from s2reg.tensors.hashcache import HashCache, Stamp

from ..surgery.helpers import file_digests, s2ft, tiny


@pytest.fixture()
def ckpt(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {"a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16), "b.weight": torch.randn(16, 8, generator=g),
               "c.bias": torch.tensor([-0.0, 0.0, 1.5])}
    return save_state_dict(tmp_path / "ckpt", tensors)


@pytest.fixture()
def hashes_taken(monkeypatch) -> list[str]:
    """The tensors actually read and hashed, in order (a remembered hash adds nothing)."""
    taken: list[str] = []
    real = CheckpointSource._hash

    def counting(fd, info):
        taken.append(info.name)
        return real(fd, info)

    monkeypatch.setattr(CheckpointSource, "_hash", staticmethod(counting))
    return taken


@pytest.fixture()
def not_racy(monkeypatch):
    """Files written by the test itself are seconds old at most: treat them as settled."""
    monkeypatch.setattr(hashcache, "RACY_NS", 0)


def truth(path) -> dict[str, str]:
    with CheckpointSource(path) as source:
        return {n: source.sha256_of(n) for n in source.names()}


def remembered(path) -> dict[str, str]:
    with CheckpointSource(path, remember_hashes=True) as source:
        return {n: source.sha256_of(n) for n in source.names()}


def next_tick() -> None:
    """Let the file system's clock move on, so the next write gets a new change time (coarse clocks tick
    every few ms); the racy-hash rule covers writes inside one tick."""
    time.sleep(0.05)


def records(home):
    return sorted((home / "hashes").glob("*.json")) if (home / "hashes").is_dir() else []


def assert_every_remembered_hash_is_true(home) -> None:
    """For every record whose file still has the recorded stamp, each range hashes as recorded."""
    checked = 0
    for path in records(home):
        record = json.loads(path.read_bytes())
        file = record["file"]
        if list(vars(Stamp.of(file)).values()) != record["stamp"]:
            continue
        data = Path(file).read_bytes()
        for start, stop, sha in record["ranges"]:
            assert sha256_bytes(data[start:stop]) == sha, (file, start, stop)
            checked += 1
    assert checked, "nothing was remembered: the test would prove nothing"


def test_a_remembered_hash_is_used_while_the_file_is_unchanged(ckpt, not_racy, hashes_taken, s2reg_home):
    expected = truth(ckpt)
    hashes_taken.clear()
    assert remembered(ckpt) == expected and sorted(hashes_taken) == sorted(expected)
    assert remembered(ckpt) == expected and len(hashes_taken) == len(expected)  # nothing hashed the second time
    assert_every_remembered_hash_is_true(s2reg_home)


def _flip_keep_mtime(file):
    st = os.stat(file)
    with open(file, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))  # a program hiding its write: ctime still moves


def _rewrite_same_bytes(file):
    file.write_bytes(file.read_bytes())


def _replace_with_copy_of_other_bytes(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    tmp = file.with_name("tmp")
    tmp.write_bytes(data)
    shutil.copystat(file, tmp)  # same size and mtime, new inode
    os.replace(tmp, file)


@pytest.mark.parametrize("change", [_flip_keep_mtime, _rewrite_same_bytes, _replace_with_copy_of_other_bytes])
def test_any_write_to_the_file_forgets_its_hashes(ckpt, not_racy, hashes_taken, change):
    remembered(ckpt)
    next_tick()
    change(ckpt / "model.safetensors")
    expected = truth(ckpt)
    hashes_taken.clear()
    assert remembered(ckpt) == expected and len(hashes_taken) == len(expected)


def test_a_racy_hash_is_not_remembered(ckpt, hashes_taken, s2reg_home):
    remembered(ckpt)  # the file is younger than RACY_NS: a write in the same clock tick would go unseen
    hashes_taken.clear()
    remembered(ckpt)
    assert len(hashes_taken) == 3 and records(s2reg_home) == []


def test_a_file_changed_while_it_was_hashed_is_not_remembered(ckpt, not_racy, hashes_taken, monkeypatch):
    real = CheckpointSource._hash

    def hash_then_touch(fd, info):
        try:
            return real(fd, info)
        finally:
            next_tick()
            _rewrite_same_bytes(ckpt / "model.safetensors")

    monkeypatch.setattr(CheckpointSource, "_hash", staticmethod(hash_then_touch))
    with CheckpointSource(ckpt, remember_hashes=True) as source:
        source.sha256_of("a.weight")
        info = source.info("a.weight")
        assert source.hash_cache.lookup(Stamp.of(ckpt / "model.safetensors"), (info.start, info.end)) is None


@pytest.mark.parametrize("record", [
    b"not json", b"[]", b'{"format": "s2reg.hashes", "version": 1}',
    "right stamp, short digest", "right stamp, ranges not a list", "newer version", "oversized",
])
def test_a_malformed_record_is_ignored_and_replaced(ckpt, not_racy, hashes_taken, s2reg_home, record):
    stamp = Stamp.of(ckpt / "model.safetensors")
    path = HashCache(s2reg_home / "hashes")._record_path(stamp)
    path.parent.mkdir(parents=True)
    good = {"format": "s2reg.hashes", "version": 1, "file": "x", "stamp": list(vars(stamp).values())}
    data = {
        "right stamp, short digest": json.dumps({**good, "ranges": [[0, 8, "ab"]]}).encode(),
        "right stamp, ranges not a list": json.dumps({**good, "ranges": {"0": "ab"}}).encode(),
        "newer version": json.dumps({**good, "version": 2, "ranges": []}).encode(),
        "oversized": json.dumps({**good, "ranges": [], "pad": "x" * (9 << 20)}).encode(),
    }.get(record, record)
    path.write_bytes(data)
    expected = truth(ckpt)
    hashes_taken.clear()
    assert remembered(ckpt) == expected and len(hashes_taken) == len(expected)
    assert_every_remembered_hash_is_true(s2reg_home)  # the record was replaced by a good one


def test_the_cache_can_be_turned_off(ckpt, not_racy, hashes_taken, s2reg_home, monkeypatch):
    monkeypatch.setenv("S2REG_HASH_CACHE", "0")
    remembered(ckpt)
    remembered(ckpt)
    assert len(hashes_taken) == 6 and not (s2reg_home / "hashes").exists()


def test_a_cache_that_cannot_be_written_never_fails_a_command(ckpt, not_racy, s2reg_home):
    (s2reg_home / "hashes").write_text("a file where the folder should be")
    assert remembered(ckpt) == truth(ckpt)


def test_records_are_bounded(ckpt, not_racy, s2reg_home, monkeypatch):
    monkeypatch.setattr(hashcache, "_MAX_RECORDS", 4)
    root = s2reg_home / "hashes"
    root.mkdir()
    for i in range(5):
        (root / f"old-{i}.json").write_text("{}")
    next_tick()  # the new record is the newest
    remembered(ckpt)
    assert len(records(s2reg_home)) <= 3 and (root / HashCache(root)._record_path(Stamp.of(ckpt / "model.safetensors")).name).exists()


# -- surgery: what in-place writes teach the cache, and the base check it must never weaken -------------------------
@pytest.fixture()
def base_and_adapter(tmp_path):
    base = tiny(tmp_path / "base")
    return base, s2ft(base, channels=(2, 3, 50, 90, 91))


def test_an_unmerge_remembers_what_it_restored_and_the_next_merge_hashes_nothing(base_and_adapter, tmp_path,
                                                                                  hashes_taken, s2reg_home):
    base, adapter = base_and_adapter
    merge(base, [adapter], tmp_path / "reference")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base, ckpt)
    merge_in_place(ckpt, [adapter])  # hashes the targets (the copy is too young to remember them)
    assert sorted(set(hashes_taken)) == sorted(adapter.targets)
    unmerge_in_place(ckpt, [adapter])
    assert file_digests(ckpt) == file_digests(base)
    assert_every_remembered_hash_is_true(s2reg_home)
    hashes_taken.clear()
    merge_in_place(ckpt, [adapter])
    assert hashes_taken == []  # the base check found every fingerprint remembered
    assert file_digests(ckpt) == file_digests(tmp_path / "reference")


def test_a_changed_tensor_is_refused_even_when_its_hash_was_remembered(base_and_adapter, tmp_path, s2reg_home):
    base, adapter = base_and_adapter
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base, ckpt)
    merge_in_place(ckpt, [adapter])
    unmerge_in_place(ckpt, [adapter])
    assert_every_remembered_hash_is_true(s2reg_home)
    next_tick()
    name = sorted(adapter.targets)[0]
    with CheckpointSource(ckpt) as source:
        info = source.info(name)
    with open(info.file, "r+b") as fh:  # another program edits one weight of the base
        fh.seek(info.start)
        first = fh.read(1)
        fh.seek(info.start)
        fh.write(bytes([first[0] ^ 0x40]))
    before = file_digests(ckpt)
    with pytest.raises(BaseMismatch, match=name):
        merge_in_place(ckpt, [adapter])
    assert file_digests(ckpt) == before


def test_an_unmerge_from_a_permuted_checkpoint_remembers_only_true_hashes(base_and_adapter, tmp_path, s2reg_home,
                                                                           not_racy):
    base, adapter = base_and_adapter
    permuted = tmp_path / "permuted"
    permute_checkpoint(base, adapter, permuted)
    merge_in_place(permuted, [adapter])
    unmerge_in_place(permuted, [adapter])
    remembered(permuted)
    assert_every_remembered_hash_is_true(s2reg_home)


def test_a_record_nested_past_the_parsers_depth_is_ignored(ckpt, not_racy, s2reg_home):
    stamp = Stamp.of(ckpt / "model.safetensors")
    path = HashCache(s2reg_home / "hashes")._record_path(stamp)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"[" * 200_000 + b"]" * 200_000)
    assert remembered(ckpt) == truth(ckpt)
