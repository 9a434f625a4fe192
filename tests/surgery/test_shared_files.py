"""Shard files other names also reach, and the locks on shard files (spec/SURGERY.md §3, "Shared shard files").

Two layouts give two checkpoint directories the same shard files: the Hugging Face cache (each snapshot a
directory of symbolic links into one blobs/) and a `cp -al` copy (hard links). An in-place command must
never change what the other directory reads; readers hold the shared lock while they read.
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from s2reg.cli import main
from s2reg.errors import CheckpointError, S2RegError
from s2reg.surgery import merge, merge_in_place, permute_checkpoint, recover, unmerge_in_place
from s2reg.surgery.lock import checkpoint_lock, shard_locks
from s2reg.tensors import CheckpointSource
from s2reg.tensors.reader import leftovers

from .helpers import file_digests, s2ft, tensor_digests, tiny
from .test_inplace import _crash_after, run_child


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The base, an adapter (in memory and on disk), and the shard digests of the base and of the merge."""
    root = tmp_path_factory.mktemp("shared")
    base = tiny(root / "base")
    adapter = s2ft(base, channels=(2, 3, 50, 90, 91))
    adapter.save(root / "adapter")
    merge(base, [adapter], root / "merged")
    return base, adapter, root / "adapter", shards(file_digests(base)), shards(file_digests(root / "merged"))


def shards(digests: dict[str, str]) -> dict[str, str]:
    return {n: d for n, d in digests.items() if n.endswith(".safetensors")}


def touched(base: Path, adapter) -> set[str]:
    with CheckpointSource(base) as source:
        return {source.info(n).file.name for n in adapter.targets}


def tree_state(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry under ``root``: a link and where it points, or a file and its bytes' sha256."""
    state = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            key = str(path.relative_to(root))
            state[key] = (("link", os.readlink(path)) if path.is_symlink()
                          else ("file", hashlib.sha256(path.read_bytes()).hexdigest()))
    return state


def hugging_face_cache(root: Path, base: Path) -> tuple[Path, Path, Path]:
    """``models--org--tiny`` as huggingface_hub lays it out: two snapshots of relative links into blobs/."""
    repo = root / "models--org--tiny"
    snapshots = [repo / "snapshots" / rev for rev in ("1a2b3c", "4d5e6f")]
    (repo / "blobs").mkdir(parents=True)
    for snapshot in snapshots:
        snapshot.mkdir(parents=True)
    for file in sorted(base.iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        for snapshot in snapshots:
            (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshots[1].name)
    return snapshots[0], snapshots[1], repo


def hard_linked_copy(root: Path, base: Path) -> tuple[Path, Path, Path]:
    """A checkpoint and what ``cp -al`` makes of it: every file a second name of the same inode."""
    first, second = root / "ckpt", root / "ckpt-copy"
    shutil.copytree(base, first)
    second.mkdir()
    for file in first.iterdir():
        os.link(file, second / file.name)
    return first, second, root


Layout = Callable[[Path, Path], tuple[Path, Path, Path]]
LAYOUTS: dict[str, tuple[Layout, str]] = {  # builder (-> two checkpoints, the tree holding both), refusal
    "hugging-face-cache": (hugging_face_cache, "this looks like a Hugging Face cache snapshot: its shards are links "
                                               "into blobs/ that every snapshot"),
    "cp -al": (hard_linked_copy, r"has 2 hard links \(a `cp -al` copy\?\)"),
}


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request, pristine, tmp_path) -> Callable[[str], tuple[Path, Path, Path, str]]:
    """Builds the layout under a fresh directory: (first checkpoint, second, the tree holding both, the refusal)."""
    build, refusal = LAYOUTS[request.param]
    return lambda where: (*build(tmp_path / where, pristine[0]), refusal)


def test_in_place_refuses_shared_shards_and_changes_nothing(pristine, layout):
    first, second, tree, refusal = layout("layout")
    _, adapter, _, _, _ = pristine
    before = tree_state(tree)
    for checkpoint in (first, second):  # one after the other: each is refused the same way
        with pytest.raises(CheckpointError, match=refusal) as caught:
            merge_in_place(checkpoint, [adapter])
        assert "\n" not in str(caught.value) and "--break-links" in str(caught.value)
    assert tree_state(tree) == before  # no byte, link or temp file changed anywhere


def test_unmerge_in_place_refuses_a_shared_merged_checkpoint(pristine, tmp_path):
    _, adapter, _, _, merged_digests = pristine
    merged = tmp_path / "merged"
    merge(pristine[0], [adapter], merged)
    copy = tmp_path / "merged-copy"
    copy.mkdir()
    for file in merged.iterdir():
        os.link(file, copy / file.name)
    with pytest.raises(CheckpointError, match="hard links .* in-place unmerge would change"):
        unmerge_in_place(copy, [adapter])
    assert shards(file_digests(merged)) == shards(file_digests(copy)) == merged_digests


def test_break_links_changes_only_this_checkpoint(pristine, layout):
    first, second, tree, _ = layout("layout")
    base, adapter, _, base_digests, merged_digests = pristine
    others = {k: v for k, v in tree_state(tree).items() if not (tree / k).is_relative_to(first)}
    report = merge_in_place(first, [adapter], break_links=True)
    assert sorted(report.links_broken) == sorted(touched(base, adapter))  # only the shards it patched
    for name in report.links_broken:
        entry = (first / name).lstat()
        assert not (first / name).is_symlink() and entry.st_nlink == 1
    assert shards(file_digests(first)) == merged_digests
    assert {k: v for k, v in tree_state(tree).items() if not (tree / k).is_relative_to(first)} == others
    assert shards(file_digests(second)) == base_digests
    with CheckpointSource(second) as source:
        adapter.verify_base(source)  # the other checkpoint still is the adapter's base
    merge_in_place(second, [adapter], break_links=True)
    assert shards(file_digests(second)) == merged_digests
    for checkpoint in (first, second):
        unmerge_in_place(checkpoint, [adapter])
        assert shards(file_digests(checkpoint)) == base_digests


def _merge_on_signal(checkpoint: Path, adapter, break_links: bool, go, results) -> None:
    """Child process: wait for ``go``, merge in place, and say how it went."""
    go.wait()
    try:
        merge_in_place(checkpoint, [adapter], break_links=break_links)
        results.put((str(checkpoint), "merged"))
    except S2RegError as refused:
        results.put((str(checkpoint), f"refused: {refused}"))
    except Exception as other:  # noqa: BLE001 - reported, so the test fails at once with the reason
        results.put((str(checkpoint), f"crashed: {other!r}"))


def _merge_both_at_once(first: Path, second: Path, adapter, break_links: bool) -> dict[str, str]:
    context = multiprocessing.get_context("fork")
    go, results = context.Event(), context.Queue()
    children = [context.Process(target=_merge_on_signal, args=(c, adapter, break_links, go, results))
                for c in (first, second)]
    for child in children:
        child.start()
    go.set()
    outcomes = dict(results.get(timeout=120) for _ in children)
    for child in children:
        child.join()
        assert child.exitcode == 0
    return outcomes


@pytest.mark.parametrize("break_links", [False, True], ids=["refuse", "break-links"])
def test_two_concurrent_in_place_merges_never_merge_twice(pristine, layout, break_links):
    """The issue's race: both base checks passed, both wrote, the shared tensors held base + 2*delta."""
    _, adapter, _, base_digests, merged_digests = pristine
    for trial in range(3):
        first, second, tree, refusal = layout(f"trial{trial}")
        before = tree_state(tree)
        outcomes = _merge_both_at_once(first, second, adapter, break_links)
        for checkpoint in (first, second):
            outcome = outcomes[str(checkpoint)]
            assert "\n" not in outcome
            if not break_links:
                assert outcome.startswith("refused: ") and re.search(refusal, outcome), outcome
            expected = merged_digests if outcome == "merged" else base_digests
            assert shards(file_digests(checkpoint)) == expected, (trial, outcome)  # one merge or none, never torn
            assert not leftovers(checkpoint)
            if outcome == "merged":
                unmerge_in_place(checkpoint, [adapter])
                assert shards(file_digests(checkpoint)) == base_digests
        if not break_links:
            assert tree_state(tree) == before
        assert any(v == "merged" for v in outcomes.values()) == break_links


def _linked_out(pristine, tmp_path) -> tuple[Path, Path, str]:
    """A checkpoint one of whose patched shards is a symbolic link to a file elsewhere."""
    base, adapter, _, _, _ = pristine
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(base, checkpoint)
    name = sorted(touched(base, adapter))[0]
    elsewhere = tmp_path / "elsewhere" / "weights.safetensors"
    elsewhere.parent.mkdir()
    shutil.move(checkpoint / name, elsewhere)
    (checkpoint / name).symlink_to(elsewhere)
    return checkpoint, elsewhere, name


def test_a_shard_linked_outside_the_checkpoint_is_refused(pristine, tmp_path):
    checkpoint, elsewhere, name = _linked_out(pristine, tmp_path)
    _, _, adapter_dir, base_digests, merged_digests = pristine
    kept = elsewhere.read_bytes()
    result = CliRunner().invoke(main, ["merge", str(checkpoint), str(adapter_dir), "--in-place"])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")
    assert f"{name} is a symbolic link to {elsewhere}" in result.output
    assert shards(file_digests(checkpoint)) == base_digests and (checkpoint / name).is_symlink()

    result = CliRunner().invoke(main, ["merge", str(checkpoint), str(adapter_dir), "-o", str(tmp_path / "o"),
                                       "--break-links"])
    assert result.exit_code == 2 and "--break-links is for --in-place" in result.output

    result = CliRunner().invoke(main, ["merge", str(checkpoint), str(adapter_dir), "--in-place", "--break-links"])
    assert result.exit_code == 0, result.output
    assert "copied 1 linked shard(s)" in result.output
    assert shards(file_digests(checkpoint)) == merged_digests and not (checkpoint / name).is_symlink()
    assert elsewhere.read_bytes() == kept


def test_in_place_is_refused_while_another_command_reads_a_shard(pristine, tmp_path):
    base, adapter, _, base_digests, _ = pristine
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(base, checkpoint)
    shard = checkpoint / sorted(touched(base, adapter))[0]
    fd = os.open(shard, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what a copy or a reader (perhaps through another directory) holds
        with pytest.raises(CheckpointError, match="another s2reg command is using this shard file") as caught:
            merge_in_place(checkpoint, [adapter])
        assert str(caught.value).startswith(str(shard)) and "\n" not in str(caught.value)
    finally:
        os.close(fd)
    assert shards(file_digests(checkpoint)) == base_digests and not leftovers(checkpoint)
    merge_in_place(checkpoint, [adapter])  # the lock went with its holder


def test_recover_locks_the_shards_it_writes(pristine, tmp_path):
    base, adapter, _, _, _ = pristine
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(base, checkpoint)
    assert run_child(_crash_after, checkpoint, adapter, 1, "exit") == 17
    with shard_locks([checkpoint / n for n in touched(base, adapter)], exclusive=False):
        with pytest.raises(CheckpointError, match="shard file"):
            recover(checkpoint)
    assert leftovers(checkpoint)
    recover(checkpoint)
    assert shards(file_digests(checkpoint)) == pristine[3]


def _hold(holder: str, checkpoint: Path):
    """What an in-place command holds while it patches: the directory lock, or (through another
    directory that reaches the same files) the shard files' locks."""
    if holder == "directory":
        return checkpoint_lock(checkpoint, exclusive=True)
    return shard_locks(sorted(checkpoint.glob("*.safetensors")), exclusive=True)


def _cli(*args: str) -> Callable[[Path, tuple, Path], None]:
    """A command line run against CKPT, ADAPTER (the adapter's directory), TUNED (a merged checkpoint) and OUT;
    its one-line error raised as the library's."""

    def run(checkpoint: Path, pristine: tuple, out: Path) -> None:
        fill = {"CKPT": str(checkpoint), "ADAPTER": str(pristine[2]), "TUNED": str(pristine[0].parent / "merged"),
                "OUT": str(out)}
        result = CliRunner().invoke(main, [fill.get(a, a) for a in args])
        assert result.exit_code in (1, 2) and result.output.count("\n") == 1, result.output
        raise CheckpointError(result.output.strip())

    return run


def _serve(checkpoint: Path, *_) -> None:
    from s2reg.serve import AdapterServer

    AdapterServer.from_pretrained(checkpoint).close()


READERS = {
    "validate --base": _cli("validate", "ADAPTER", "--base", "CKPT"),
    "diff": _cli("diff", "CKPT", "TUNED"),
    "extract": _cli("extract", "CKPT", "TUNED", "-o", "OUT"),
    "serve": _serve,
    "merge -o": lambda checkpoint, pristine, out: merge(checkpoint, [pristine[1]], out),
    "permute": lambda checkpoint, pristine, out: permute_checkpoint(checkpoint, pristine[1], out),
}
HOLDERS = [(reader, "directory") for reader in ("validate --base", "diff", "extract", "serve")] + \
          [(reader, "shard files") for reader in READERS]


@pytest.mark.parametrize(("reader", "holder"), HOLDERS)
def test_readers_are_refused_while_a_checkpoint_is_changed_in_place(pristine, tmp_path, reader, holder):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(pristine[0], checkpoint)
    what = "checkpoint" if holder == "directory" else "shard file"
    with _hold(holder, checkpoint):
        with pytest.raises(CheckpointError, match=f"another s2reg command is changing this {what} in place"):
            READERS[reader](checkpoint, pristine, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_served_checkpoint_is_not_changed_in_place_until_the_server_closes(pristine, tmp_path):
    from s2reg.serve import AdapterServer

    base, adapter, _, _, merged_digests = pristine
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(base, checkpoint)
    with AdapterServer.from_pretrained(checkpoint) as server:
        server.attach("a", adapter)
        with pytest.raises(CheckpointError, match="another s2reg command is using this checkpoint"):
            merge_in_place(checkpoint, [adapter])
        assert tensor_digests(checkpoint) == tensor_digests(base)
    merge_in_place(checkpoint, [adapter])
    assert shards(file_digests(checkpoint)) == merged_digests
