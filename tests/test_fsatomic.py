"""fsatomic reads the umask without changing it: files other threads create meanwhile keep their modes."""

from __future__ import annotations

import os
import stat
import sys
import threading

import pytest

from s2reg import fsatomic

MASKS = [0o022, 0o077, 0o002, 0o027, 0o000, 0o777]


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    real = os.umask  # a test may forbid os.umask; the teardown still needs it
    old = real(0o022)
    yield real
    real(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", MASKS, ids=oct)
def test_the_umask_read_is_the_one_the_kernel_applies(tmp_path, umask, mask):
    umask(mask)
    (tmp_path / "plain").write_bytes(b"x")  # the kernel's own answer: open() with 0o666
    assert _mode(tmp_path / "plain") == 0o666 & ~mask
    assert fsatomic.current_umask() == mask
    assert fsatomic._umask_by_probe() == mask  # the fallback where /proc has no Umask line


@pytest.mark.parametrize("proc", [True, False], ids=["proc", "probe"])
def test_writes_never_change_the_umask(tmp_path, umask, monkeypatch, proc):
    umask(0o027)
    if not proc:
        monkeypatch.setattr(fsatomic, "_umask_from_proc", lambda: None)

    def refused(mask):
        raise AssertionError(f"os.umask({mask:o}) called: the umask is process-wide, other threads see it")

    monkeypatch.setattr(os, "umask", refused)
    fsatomic.write_file(tmp_path / "file", b"data")
    fsatomic.write_directory(tmp_path / "dir", {"a": b"1"})
    assert _mode(tmp_path / "file") == _mode(tmp_path / "dir" / "a") == 0o640
    assert _mode(tmp_path / "dir") == 0o750


def test_files_created_by_other_threads_keep_their_modes_while_the_umask_is_read(tmp_path, umask):
    """Readers of the umask and plain file creators side by side, thread switches as often as the
    interpreter allows: reading the umask by setting it to 0 and back gave the plain files 0o666."""
    umask(0o077)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    modes: list[int] = []
    masks: set[int] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            masks.add(fsatomic.current_umask())

    def create(worker: int) -> None:
        for i in range(400):
            path = tmp_path / f"{worker}-{i}"
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
            modes.append(_mode(path))

    readers = [threading.Thread(target=read) for _ in range(2)]
    creators = [threading.Thread(target=create, args=(w,)) for w in range(2)]
    try:
        for thread in readers + creators:
            thread.start()
        for thread in creators:
            thread.join()
    finally:
        done.set()
        for thread in readers:
            thread.join()
        sys.setswitchinterval(old_interval)
    assert masks == {0o077}
    assert len(modes) == 800 and set(modes) == {0o600}, sorted(set(map(oct, modes)))
