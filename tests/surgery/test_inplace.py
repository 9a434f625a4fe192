"""In-place merge/unmerge, the undo journal, and recovery from crashes (spec/SURGERY.md §3)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from s2reg.cli import main
from s2reg.errors import CheckpointError, S2RegError
from s2reg.format import payload
from s2reg.fsatomic import TEMP_SUFFIX
from s2reg.surgery import inplace as inplace_module
from s2reg.surgery import (
    merge,
    merge_in_place,
    patching,
    pending,
    permute_checkpoint,
    recover,
    unmerge_in_place,
)
from s2reg.surgery import journal as journal_module
from s2reg.surgery.journal import Journal, Patch
from s2reg.surgery.ledger import LEDGER_NAME, Ledger, Support
from s2reg.ops.permute import PermutationRecord
from s2reg.tensors import CheckpointSource
from s2reg.tensors.reader import leftovers

from .helpers import file_digests, pisa, s2ft, tensor_digests, tiny


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
    assert report.bytes_patched < sum((base / n).stat().st_size for n in shards(base_digests)) / 4
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


def run_child(target, *args) -> int:
    process = multiprocessing.get_context("fork").Process(target=target, args=args)
    process.start()
    process.join()
    return process.exitcode


@pytest.mark.parametrize("seed", range(4))
def test_crash_at_a_random_write_recovers_to_base_or_merged(pristine, tmp_path, seed):
    _, _, base_digests, merged_digests = pristine
    ckpt, adapter = fresh(pristine, tmp_path)
    writes = random.Random(seed).randrange(0, len(adapter.targets))
    assert run_child(_crash_after, ckpt, adapter, writes, "exit") == 17
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
    assert run_child(_crash_after, ckpt, adapter, 3, "raise") == 3
    assert not pending(ckpt)
    assert file_digests(ckpt) == base_digests


def test_failed_rollback_leaves_the_journal_for_recover(pristine, tmp_path):
    _, _, base_digests, _ = pristine
    ckpt, adapter = fresh(pristine, tmp_path)
    assert run_child(_crash_after, ckpt, adapter, 3, "broken") == 4
    assert pending(ckpt)
    assert recover(ckpt).action == "rolled back"
    assert file_digests(ckpt) == base_digests


# Each point of the in-place write sequence (spec/SURGERY.md §3): (file system call, file, before/after it).
KILL_POINTS = {
    "journal payload temp written": ("replace", Journal.PAYLOAD_NAME, "before"),
    "journal payload landed": ("replace", Journal.PAYLOAD_NAME, "after"),
    "journal json temp written": ("replace", Journal.NAME, "before"),
    "journal json landed": ("replace", Journal.NAME, "after"),
    "first patch written": ("patch", None, "after"),
    "ledger temp written": ("replace", LEDGER_NAME, "before"),
    "ledger landed": ("replace", LEDGER_NAME, "after"),
    "journal json removed": ("unlink", Journal.NAME, "after"),
}
COMMITTED = {"journal json removed"}  # past the commit point: recover keeps the merge
NO_JOURNAL = {"journal payload temp written", "journal payload landed", "journal json temp written", "journal json removed"}


def _die_at(ckpt, adapter, point: str) -> None:
    """Child process: an in-place merge killed (os._exit) at ``point`` of its write sequence."""
    op, name, when = KILL_POINTS[point]

    def hook(kind, real, path_of):
        def call(*args, **kwargs):
            hit = kind == op and (name is None or os.fspath(path_of(args)).endswith("/" + name))
            if hit and when == "before":
                os._exit(17)
            result = real(*args, **kwargs)
            if hit and when == "after":
                os._exit(17)
            return result
        return call

    os.replace = hook("replace", os.replace, lambda args: args[1])
    os.unlink = hook("unlink", os.unlink, lambda args: args[0])
    patching.write_patch = hook("patch", patching.write_patch, lambda args: "")
    merge_in_place(ckpt, [adapter])
    os._exit(0)


@pytest.fixture(scope="module")
def adapter_on_disk(pristine, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "a"
    pristine[1].save(path)
    return path


def refusals(ckpt, adapter_dir, out):
    """Every command that reads the checkpoint, as CLI arguments (each must refuse it)."""
    other = ckpt.parent / "other"
    data = ckpt.parent / "data.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 2, 3, 4]}) + "\n")
    return {
        "merge -o": ["merge", str(ckpt), str(adapter_dir), "-o", str(out / "merged")],
        "unmerge -o": ["unmerge", str(ckpt), str(adapter_dir), "-o", str(out / "unmerged")],
        "merge --in-place": ["merge", str(ckpt), str(adapter_dir), "--in-place"],
        "unmerge --in-place": ["unmerge", str(ckpt), str(adapter_dir), "--in-place", "--skip-base-check"],
        "permute": ["permute", str(ckpt), "--plan", str(adapter_dir), "-o", str(out / "permuted")],
        "unpermute": ["unpermute", str(ckpt), "-o", str(out / "unpermuted")],
        "extract": ["extract", str(ckpt), str(other), "--kind", "s2ft", "-o", str(out / "extracted")],
        "extract (as tuned)": ["extract", str(other), str(ckpt), "--kind", "s2ft", "-o", str(out / "extracted")],
        "validate --base": ["validate", str(adapter_dir), "--base", str(ckpt)],
        "diff": ["diff", str(ckpt), str(other)],
        "ls --base": ["ls", "--base", str(ckpt)],
        "train": ["train", "--base", str(ckpt), "--data", str(data), "--method", "s2ft", "-o", str(out / "trained")],
    }


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_at_each_point_every_command_refuses_then_recover_restores(pristine, adapter_on_disk, tmp_path, point,
                                                                      monkeypatch):
    base, _, base_digests, merged_digests = pristine
    monkeypatch.setenv("S2REG_HOME", str(tmp_path / "home"))
    ckpt, adapter = fresh(pristine, tmp_path)
    shutil.copytree(base, tmp_path / "other")
    assert run_child(_die_at, ckpt, adapter, point) == 17
    left = {p.name for p in leftovers(ckpt)}
    assert left, "a kill at any point before the journal payload is removed leaves something"
    assert (Journal.NAME in left) == (point not in NO_JOURNAL)
    if point == "journal payload temp written":
        assert left == {n for n in left if n.startswith(f".{Journal.PAYLOAD_NAME}.") and n.endswith(TEMP_SUFFIX)}
    with CheckpointSource(tmp_path / "other") as source:  # the leftovers are never taken for shards
        assert all(not f.name.startswith(".") for f in source.files)
    before = file_digests(ckpt)
    out = tmp_path / "out"
    for command, args in refusals(ckpt, adapter_on_disk, out).items():
        result = CliRunner().invoke(main, args)
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]  # (train draws a bar first)
        expected_status = 2 if command == "diff" else 1  # diff(1)'s convention: 2 is trouble, 1 a difference
        assert result.exit_code == expected_status and len(errors) == 1, (command, result.output)
        assert errors[0].endswith(f"run `s2reg recover {ckpt}` first"), (command, result.output)
    assert not out.exists()
    assert file_digests(ckpt) == before
    result = CliRunner().invoke(main, ["recover", str(ckpt), "--json"])
    assert result.exit_code == 0, result.output
    action = json.loads(result.output)["action"]
    assert action == ("cleaned" if point in NO_JOURNAL else "rolled back")
    assert file_digests(ckpt) == (merged_digests if point in COMMITTED else base_digests)  # no leftover either
    assert not pending(ckpt) and recover(ckpt).action == "nothing to recover"
    with CheckpointSource(ckpt) as source:
        assert source.names()


@pytest.mark.parametrize("point", ["journal json landed", "ledger temp written", "ledger landed"])
def test_recover_forward_after_a_kill_completes_the_merge(pristine, tmp_path, point):
    _, _, _, merged_digests = pristine
    ckpt, adapter = fresh(pristine, tmp_path)
    assert run_child(_die_at, ckpt, adapter, point) == 17
    assert recover(ckpt, forward=True).action == "rolled forward"
    assert file_digests(ckpt) == merged_digests


def test_recover_on_a_clean_read_only_checkpoint_writes_nothing(pristine, tmp_path, monkeypatch):
    ckpt, _ = fresh(pristine, tmp_path)
    before = file_digests(ckpt)

    def refuse(*args, **kwargs):  # the root user ignores chmod; any write attempt fails loudly instead
        raise PermissionError(13, "read-only checkpoint (test)")

    for name in ("unlink", "replace", "rename"):
        monkeypatch.setattr(os, name, refuse)
    monkeypatch.setattr(inplace_module, "fsync_dir", refuse)
    ckpt.chmod(0o555)
    try:
        result = CliRunner().invoke(main, ["recover", str(ckpt)])
    finally:
        ckpt.chmod(0o755)
    assert result.exit_code == 0, result.output
    assert "nothing to recover" in result.output
    assert file_digests(ckpt) == before


def test_hidden_and_temp_files_are_never_shards(pristine, tmp_path):
    base, _, _, _ = pristine
    ckpt, _ = fresh(pristine, tmp_path)
    shutil.copy(ckpt / sorted(p.name for p in ckpt.glob("*.safetensors"))[0], ckpt / ".hidden.safetensors")
    with CheckpointSource(ckpt) as source, CheckpointSource(base) as reference:
        assert [f.name for f in source.files] == [f.name for f in reference.files]
    with pytest.raises(CheckpointError, match="not a checkpoint shard"):
        CheckpointSource(ckpt / ".hidden.safetensors")


@pytest.mark.parametrize("record, name", [("ledger", LEDGER_NAME), ("journal", Journal.NAME),
                                          ("permutation", PermutationRecord.NAME)])
def test_sidecar_records_of_a_newer_version_are_refused(pristine, tmp_path, record, name):
    base, adapter, _, _ = pristine
    if record == "ledger":
        ckpt = tmp_path / "m"
        merge(base, [adapter], ckpt)
    elif record == "journal":
        ckpt, adapter = fresh(pristine, tmp_path)
        assert run_child(_die_at, ckpt, adapter, "journal json landed") == 17
    else:
        ckpt = tmp_path / "p"
        permute_checkpoint(base, adapter, ckpt)
    data = json.loads((ckpt / name).read_text())
    assert data["version"] == 1
    data["version"] = 2
    (ckpt / name).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"version 2 was written by a newer s2reg") as caught:
        if record == "journal":
            recover(ckpt)
        else:
            merge(ckpt, [s2ft(base, seed=9, channels=(7,))], tmp_path / "out")
    assert str(caught.value).startswith(str(ckpt / name)) and "\n" not in str(caught.value)


def test_records_round_trip_and_reject_wrong_types(pristine, tmp_path):
    base, adapter, _, _ = pristine
    merge(base, [adapter], tmp_path / "m")
    text = (tmp_path / "m" / LEDGER_NAME).read_bytes()
    originals = tensor_digests(base)
    layout = {  # spec/SURGERY.md §2, version 1, as files were written before typed records
        "format": "s2reg.merged", "version": 1,
        "merged": [{"digest": hashlib.sha256(adapter.payload_bytes()).hexdigest(), "kind": "s2ft", "base": "tiny",
                    "support": {n: {"axis": t.axis, "indices": t.indices.tolist()} for n, t in adapter.targets.items()}}],
        "original": {n: originals[n] for n in sorted(adapter.targets)},
    }
    assert json.loads(text) == layout
    ledger = Ledger.from_json(layout)
    assert ledger.to_bytes() == text == (json.dumps(layout, indent=2) + "\n").encode()
    assert all(isinstance(s, Support) for e in ledger.merged for s in e.support.values())
    bad = json.loads(text)
    bad["merged"][0]["support"][next(iter(bad["merged"][0]["support"]))] = "sparse"
    with pytest.raises(CheckpointError, match="dense"):
        Ledger.from_json(bad)
    patch = {"tensor": "t", "file": "../outside.safetensors", "axis": "rows", "indices": [1]}
    with pytest.raises(CheckpointError, match="not a shard"):
        Patch.from_json(patch)
    with pytest.raises(CheckpointError, match="integers"):
        Patch.from_json({**patch, "file": "model.safetensors", "indices": [1.0]})
    with pytest.raises(ValueError, match="indices exactly when there is an axis"):  # patching reads one for both
        Patch("t", "model.safetensors", "rows", None)


def test_corrupt_journal_is_refused(pristine, tmp_path):
    ckpt, adapter = fresh(pristine, tmp_path)
    assert run_child(_crash_after, ckpt, adapter, 3, "exit") == 17
    payload = ckpt / Journal.PAYLOAD_NAME
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
    assert recover(ckpt).action == "nothing to recover"


def test_a_checkpoint_being_changed_in_place_is_refused_by_every_other_surgery(pristine, adapter_on_disk, tmp_path):
    """spec/SURGERY.md §3: one in-place change at a time, and no copy taken during one."""
    from s2reg.surgery.lock import checkpoint_lock

    ckpt, adapter = fresh(pristine, tmp_path)
    before = file_digests(ckpt)
    attempts = {
        "merge --in-place": lambda: merge_in_place(ckpt, [adapter]),
        "unmerge --in-place": lambda: unmerge_in_place(ckpt, [adapter], verify_base=False),
        "recover": lambda: recover(ckpt),
        "merge -o": lambda: merge(ckpt, [adapter], tmp_path / "out"),
        "permute": lambda: permute_checkpoint(ckpt, adapter, tmp_path / "permuted"),
    }
    with checkpoint_lock(ckpt, exclusive=True):  # what an in-place merge holds while it runs
        for what, attempt in attempts.items():
            expected = "using this checkpoint" if what in ("merge --in-place", "unmerge --in-place", "recover") else \
                "changing this checkpoint in place"
            with pytest.raises(CheckpointError, match=f"another s2reg command is {expected}") as caught:
                attempt()
            assert "\n" not in str(caught.value), what
        result = CliRunner().invoke(main, ["merge", str(ckpt), str(adapter_on_disk), "--in-place"])
        assert result.exit_code == 1 and result.output.count("Error: ") == 1, result.output
    assert file_digests(ckpt) == before and not (tmp_path / "out").exists() and not (tmp_path / "permuted").exists()
    with checkpoint_lock(ckpt, exclusive=False):  # copies may run side by side; an in-place change may not
        merge(ckpt, [adapter], tmp_path / "out")
        with pytest.raises(CheckpointError, match=r"another s2reg command is using this checkpoint \(copying it"):
            merge_in_place(ckpt, [adapter])
    assert file_digests(ckpt) == before
    merge_in_place(ckpt, [adapter])  # the lock went with its holder
    assert shards(file_digests(ckpt)) == shards(pristine[3])


def test_a_file_system_without_flock_still_gets_surgery(pristine, tmp_path, monkeypatch):
    import errno
    import fcntl

    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    ckpt, adapter = fresh(pristine, tmp_path)
    merge_in_place(ckpt, [adapter])
    assert shards(file_digests(ckpt)) == shards(pristine[3])


def _disk_full_at(monkeypatch, name: str) -> None:
    """Every fsync of the temp file of ``name`` fails as a full disk does (delayed allocation finds no room)."""
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("name", [Journal.PAYLOAD_NAME, Journal.NAME])
def test_disk_full_while_writing_the_journal_leaves_nothing_and_says_so(pristine, adapter_on_disk, tmp_path,
                                                                        monkeypatch, name):
    _, _, base_digests, _ = pristine
    ckpt, _ = fresh(pristine, tmp_path)
    _disk_full_at(monkeypatch, name)
    result = CliRunner().invoke(main, ["merge", str(ckpt), str(adapter_on_disk), "--in-place"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output == (f"Error: No space left on device in {ckpt} while writing the undo journal; "
                             "nothing was changed\n")
    assert leftovers(ckpt) == [] and file_digests(ckpt) == base_digests
    monkeypatch.undo()
    merge_in_place(ckpt, [pristine[1]])  # nothing holds the checkpoint


def test_a_journal_that_cannot_be_removed_after_a_full_disk_is_left_to_recover(pristine, adapter_on_disk, tmp_path,
                                                                               monkeypatch):
    _, _, base_digests, _ = pristine
    ckpt, _ = fresh(pristine, tmp_path)
    _disk_full_at(monkeypatch, Journal.NAME)
    unlink = Path.unlink

    def payload_stays(path, missing_ok=False):
        if path.name == Journal.PAYLOAD_NAME:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", payload_stays)
    result = CliRunner().invoke(main, ["merge", str(ckpt), str(adapter_on_disk), "--in-place"])
    assert result.exit_code == 1
    assert result.output == (f"Error: No space left on device in {ckpt} while writing the undo journal; nothing was "
                             f"changed, but it could not be removed: `s2reg recover {ckpt}` removes it\n")
    monkeypatch.undo()
    assert recover(ckpt).action == "cleaned"
    assert leftovers(ckpt) == [] and file_digests(ckpt) == base_digests


def test_pisa_in_place_computes_whole_tensors_as_it_writes_them_and_a_kill_recovers_either_way(
        pristine, tmp_path, monkeypatch):
    """A PISA merge patches whole tensors: each goes into the journal as it is computed (the next one computed
    meanwhile), so at most a few are ever in memory, not every tensor of the merge; the streamed journal
    still rolls a killed merge back to the base or forward to the merged checkpoint (spec/SURGERY.md §3)."""
    base, _, base_digests, _ = pristine
    adapter = pisa(base, roles=("q", "k", "v", "o", "up", "down"))
    merge(base, [adapter], tmp_path / "reference")
    merged = shards(file_digests(tmp_path / "reference"))
    alive: list[weakref.ref] = []
    most = [0]
    real = patching._bytes_of

    def tracked(plan, name):
        done = real(plan, name)
        alive.append(weakref.ref(done[1]))
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        return done

    monkeypatch.setattr(patching, "_bytes_of", tracked)
    ckpt, _ = fresh(pristine, tmp_path)
    merge_in_place(ckpt, [adapter])
    assert shards(file_digests(ckpt)) == merged
    assert len(alive) == len(adapter.targets) >= 8
    assert most[0] <= 3
    for forward in (False, True):
        killed = tmp_path / f"killed-{forward}"
        shutil.copytree(base, killed)
        assert run_child(_crash_after, killed, adapter, 3, "exit") == 17
        assert pending(killed)
        recover(killed, forward=forward)
        assert shards(file_digests(killed)) == (merged if forward else shards(base_digests))


def test_the_streamed_journal_payload_is_what_payload_dump_makes(tmp_path):
    """The journal payload is written patch by patch; byte for byte the safetensors file of FORMAT §6.1 that
    ``payload.dump`` makes of the same tensors (in name order: "10.after" before "2.after"), and read back
    a tensor at a time."""
    rng = np.random.default_rng(0)
    blobs = {f"{i}.{which}": rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8)
             for i in (0, 1, 2, 10, 11) for which in ("before", "after")}
    sizes = {name: blob.size for name, blob in blobs.items()}
    out = io.BytesIO()
    sha = journal_module._stream_payload(out, sizes, ((name, blobs[name]) for name in sorted(blobs)))
    assert out.getvalue() == payload.dump(blobs, journal_module.METADATA)
    assert sha == hashlib.sha256(out.getvalue()).hexdigest()
    (tmp_path / "p").write_bytes(out.getvalue())
    with journal_module.JournalPayload(tmp_path / "p") as read:
        assert sorted(read) == sorted(blobs) and all(np.array_equal(read[n], blobs[n]) for n in blobs)
    with pytest.raises(CheckpointError, match="where 1.after was due"):
        journal_module._stream_payload(io.BytesIO(), sizes, ((name, blobs[name]) for name in sorted(blobs) if name != "1.after"))
