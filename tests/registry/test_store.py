"""The local store (spec/REGISTRY.md): content addressing, refs, verification, concurrency, names."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource

import pytest
from click.testing import CliRunner

import s2reg
from s2reg.cli import main
from s2reg.errors import IntegrityError, NotFound, RegistryError
from s2reg.registry import Store, list_adapters, parse_ref
from s2reg.results import Result

from .helpers import adapter_dir, base_checkpoint, tree_digest


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return base_checkpoint(root / "a", seed=0), base_checkpoint(root / "b", seed=1)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("S2REG_HOME", str(tmp_path / "home"))
    return Store()


def test_push_pull_round_trip_is_byte_identical(store, bases, tmp_path):
    source = adapter_dir(bases[0], tmp_path / "a")
    digest = store.push(source, "math:v1")
    assert digest == s2reg.load(source).stored.digest
    out = store.pull("math:v1", tmp_path / "out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in source.iterdir()}
    store.tag("math:v1", "math")
    assert store.load("math").stored.digest == digest  # NAME alone means NAME:latest


def test_blobs_are_stored_once(store, bases, tmp_path):
    source = adapter_dir(bases[0], tmp_path / "a")
    for i in range(5):
        store.push(source, f"copy{i}:v1")
    blobs = list((store.root / "blobs").rglob("*"))
    assert len([b for b in blobs if b.is_file()]) == 2  # one manifest, one payload
    assert len(store.refs()) == 5


@pytest.mark.parametrize("bad", ["", "../evil", "a/../b", "/abs", "UPPER", "a//b", "x" * 200, "ok:bad tag", "-lead", "a/..:v1"])
def test_bad_names_are_refused_and_nothing_is_written(store, bases, tmp_path, bad):
    source = adapter_dir(bases[0], tmp_path / "a")
    with pytest.raises(RegistryError):
        store.push(source, bad)
    assert not (store.root / "refs").exists() or not any((store.root / "refs").rglob("*"))
    assert not (tmp_path / "evil").exists()


def test_missing_ref_is_not_found(store):
    with pytest.raises(NotFound, match="s2reg ls"):
        store.entry("nothing:here")


def test_corrupted_payload_blob_is_caught_and_quarantined(store, bases, tmp_path):
    store.push(adapter_dir(bases[0], tmp_path / "a"), "math:v1")
    entry = store.entry("math:v1")
    blob = store.blob_path(entry.manifest["payload"]["sha256"])
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupted"):
        store.load("math:v1")
    with pytest.raises(IntegrityError):
        store.pull("math:v1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = store.verify()
    assert report.corrupt == (entry.manifest["payload"]["sha256"],)
    assert [b.ref for b in report.broken_refs] == ["math:v1"]
    assert any((store.root / "quarantine").iterdir())


def test_corrupted_manifest_blob_is_caught(store, bases, tmp_path):
    digest = store.push(adapter_dir(bases[0], tmp_path / "a"), "math:v1")
    blob = store.blob_path(digest)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes().replace(b'"s2ft"', b'"pisa"'))
    with pytest.raises(IntegrityError):
        store.load("math:v1")
    result = CliRunner().invoke(main, ["verify"])
    assert result.exit_code == 1 and "broken" in result.output


def test_push_refuses_a_corrupt_adapter_and_leaves_the_store_unchanged(store, bases, tmp_path):
    store.push(adapter_dir(bases[0], tmp_path / "a"), "good:v1")
    bad = adapter_dir(bases[0], tmp_path / "b", seed=2)
    payload = next(bad.glob("payload.*"))
    payload.write_bytes(payload.read_bytes()[:-1])
    before = tree_digest(store.root)
    with pytest.raises(s2reg.FormatError, match="truncated"):
        store.push(bad, "bad:v1")
    assert tree_digest(store.root) == before


def test_crash_before_the_ref_leaves_no_half_ref_and_gc_cleans_up(store, bases, tmp_path, monkeypatch):
    store.push(adapter_dir(bases[0], tmp_path / "a"), "keep:v1")

    def crash(ref, digest):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.ref_files, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        store.push(adapter_dir(bases[0], tmp_path / "b", seed=3), "lost:v1")
    monkeypatch.undo()
    assert [str(r) for r in store.refs()] == ["keep:v1"]
    assert store.gc().blobs_removed == 2
    assert store.load("keep:v1")


def _push_many(root, source, worker):
    store = Store(root)
    for i in range(5):
        store.push(source, f"shared:v{i}")
        store.push(source, f"worker{worker}:v{i}")


@pytest.mark.slow  # over 20 s on 2 cores: outside the quick subset (README)
def test_concurrent_pushes_from_several_processes(store, bases, tmp_path):
    source = adapter_dir(bases[0], tmp_path / "a")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_push_many, args=(str(store.root), str(source), w)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(w.exitcode == 0 for w in workers)
    assert len(store.refs()) == 5 + 15
    report = store.verify()
    assert report.ok and report.corrupt == () and report.broken_refs == ()
    assert not list((store.root / "blobs").rglob(".*"))  # no temp file left behind


def test_ls_base_lists_only_adapters_made_for_that_checkpoint(store, bases, tmp_path):
    store.push(adapter_dir(bases[0], tmp_path / "a"), "for-a:v1")
    store.push(adapter_dir(bases[1], tmp_path / "b"), "for-b:v1")
    assert [r.ref for r in list_adapters(store, base=bases[0])] == ["for-a:v1"]
    assert [r.ref for r in list_adapters(store, base=bases[1])] == ["for-b:v1"]
    assert len(list_adapters(store, kind="s2ft")) == 2 and list_adapters(store, kind="pisa") == []


def test_cli_session(store, bases, tmp_path):
    source = adapter_dir(bases[0], tmp_path / "a")
    run = CliRunner().invoke
    assert run(main, ["push", str(source), "team/math:v1"]).exit_code == 0
    assert run(main, ["tag", "team/math:v1", "team/math:stable"]).exit_code == 0
    listed = json.loads(run(main, ["ls", "--json", "--base", str(bases[0])]).output)
    assert [r["ref"] for r in listed] == ["team/math:stable", "team/math:v1"]
    adapter = s2reg.load(source)  # each row: the ref's typed summary (issue 26), keys and values as ls always printed
    assert listed[0] == {"ref": "team/math:stable", "digest": adapter.stored.digest, "kind": "s2ft", "base": adapter.base.name,
                         "targets": len(adapter.targets), "bytes": adapter.stored.payload_bytes,
                         "created": adapter.provenance["created"]}
    shown = json.loads(run(main, ["show", "team/math:stable", "--json"]).output)
    assert shown["summary"]["digest"] == s2reg.load(source).stored.digest
    inspected = run(main, ["inspect", "team/math:v1", "--json"])  # a ref wherever a path is accepted
    assert inspected.exit_code == 0 and json.loads(inspected.output)["targets"][0]["indices"] == [1, 20, 30]
    merged = run(main, ["merge", str(bases[0]), "team/math:v1", "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert run(main, ["pull", "team/math:v1", "-o", str(tmp_path / "out")]).exit_code == 0
    assert run(main, ["rm", "team/math:v1", "team/math:stable"]).exit_code == 0
    assert json.loads(run(main, ["gc", "--json"]).output)["blobs_removed"] == 2
    missing = run(main, ["pull", "team/math:v1", "-o", str(tmp_path / "again")])
    assert missing.exit_code == 1 and missing.output.startswith("Error: no adapter team/math:v1")
    bad = run(main, ["push", str(source), "../../etc/passwd"])
    assert bad.exit_code == 1 and "invalid adapter name" in bad.output


def test_gc_and_verify_return_frozen_results_whose_json_the_cli_prints(store, bases, tmp_path):
    """The --json keys are the ones `s2reg gc` and `s2reg verify` always printed."""
    import dataclasses

    store.push(adapter_dir(bases[0], tmp_path / "a"), "math:v1")
    store.push(adapter_dir(bases[0], tmp_path / "b", seed=2), "other:v1")
    store.remove("other:v1")
    _corrupt_payload(store, "math:v1")
    run = CliRunner().invoke
    verified = run(main, ["verify", "--json"])
    assert verified.exit_code == 1
    report = json.loads(verified.output)
    assert set(report) == {"blobs_checked", "corrupt", "broken_refs", "views_checked", "stale_views_removed"}
    assert report["blobs_checked"] == 4 and len(report["corrupt"]) == 1 and report["stale_views_removed"] == []
    assert [set(b) for b in report["broken_refs"]] == [{"ref", "error"}] and report["broken_refs"][0]["ref"] == "math:v1"
    collected = json.loads(run(main, ["gc", "--json"]).output)
    assert collected == {"blobs_removed": 2, "bytes_freed": collected["bytes_freed"], "blobs_kept": 2}
    assert collected["bytes_freed"] > 0
    result = store.verify()
    assert result.as_json() == {"blobs_checked": 1, "corrupt": [],  # the manifest: the payload is in quarantine
                                "broken_refs": [dataclasses.asdict(b) for b in result.broken_refs],
                                "views_checked": 0, "stale_views_removed": []}
    assert not result.ok and result.broken_refs[0].error.startswith("blob ")  # the quarantined payload is missing
    assert isinstance(result, Result) and isinstance(store.gc(), Result)  # the one JSON form of every verb's result
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.blobs_checked = 0  # type: ignore[misc]


def test_parse_ref_defaults_to_latest():
    assert str(parse_ref("org/name")) == "org/name:latest"
    assert parse_ref("a.b-c_d:V1.0").tag == "V1.0"


def test_pushing_again_repairs_a_damaged_blob(store, bases, tmp_path):
    source = adapter_dir(bases[0], tmp_path / "a")
    store.push(source, "math:v1")
    store.load("math:v1")  # a view now links the blob
    blob = store.blob_path(store.entry("math:v1").manifest["payload"]["sha256"])
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[10] ^= 1
    blob.write_bytes(bytes(data))
    store.push(source, "math:v2")
    assert store.verify().corrupt == ()
    assert store.load("math:v1").num_params == s2reg.load(source).num_params


# -- concurrency: tag vs rm + gc, load vs gc (spec/REGISTRY.md §3-§4) ----------------------------

def _churn(root, sources, done, remove_after_push):
    """Until ``done``: push the sources in turn as m:src (then remove it, when asked) and gc."""
    store, i = Store(root), 0
    while not done.is_set():
        store.push(sources[i % len(sources)], "m:src")
        if remove_after_push:
            store.remove("m:src")
        store.gc()
        i += 1
    os._exit(0)


def _start_churn(store, sources, *, remove_after_push):
    ctx = multiprocessing.get_context("fork")
    done = ctx.Event()
    process = ctx.Process(target=_churn, args=(str(store.root), [str(s) for s in sources], done, remove_after_push))
    process.start()
    return process, done


def test_tag_racing_rm_and_gc_never_leaves_a_dangling_ref(store, bases, tmp_path):
    source = adapter_dir(bases[0], tmp_path / "a")
    churn, done = _start_churn(store, [source], remove_after_push=True)
    tagged = dangling = 0
    try:
        for _ in range(300):
            try:
                store.tag("m:src", "m:dst")
            except NotFound:
                continue
            tagged += 1
            try:
                entry = store.entry("m:dst")  # m:dst keeps its blobs from gc: missing ones mean it dangled
                store.read_blob(entry.manifest["payload"]["sha256"])
            except IntegrityError:
                dangling += 1
            store.remove("m:dst")
    finally:
        done.set()
        churn.join(60)
    assert churn.exitcode == 0
    assert tagged > 0 and dangling == 0, (tagged, dangling)
    report = store.verify()
    assert report.ok and report.corrupt == () and report.broken_refs == ()


def test_loads_never_fail_because_of_a_concurrent_gc(store, bases, tmp_path):
    sources = [adapter_dir(bases[0], tmp_path / "a"), adapter_dir(bases[0], tmp_path / "b", seed=2)]
    digests = {s2reg.load(s).stored.digest for s in sources}
    store.push(sources[0], "m:src")
    churn, done = _start_churn(store, sources, remove_after_push=False)  # re-points m:src, gc drops the other
    failures, seen = [], set()
    try:
        for _ in range(300):
            try:
                seen.add(store.load("m:src").stored.digest)
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))
    finally:
        done.set()
        churn.join(60)
    assert churn.exitcode == 0
    assert failures == [], (len(failures), failures[:3])
    assert seen == digests  # the loads did see the ref move


# -- views: stale after quarantine + re-push, checked by verify ---------------------------------

def _corrupt_payload(store, ref):
    blob = store.blob_path(store.entry(ref).manifest["payload"]["sha256"])
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))  # in place: a hard-linked view shares these bytes


@pytest.mark.parametrize("verify_first", [True, False])
def test_stale_view_after_quarantine_and_repush_is_rebuilt(store, bases, tmp_path, verify_first):
    source = adapter_dir(bases[0], tmp_path / "a")
    digest = store.push(source, "math:v1")
    store.load("math:v1")  # the view links the blobs
    _corrupt_payload(store, "math:v1")
    if verify_first:
        report = store.verify()
        assert len(report.corrupt) == 1 and report.stale_views_removed == (digest,)
    store.push(source, "math:v1")
    assert store.load("math:v1").stored.digest == digest
    report = store.verify()
    assert report.ok and report.stale_views_removed == ()
    assert store.gc().blobs_removed == 0
    assert CliRunner().invoke(main, ["show", "math:v1"]).exit_code == 0


def test_verify_checks_views(store, bases, tmp_path):
    source = adapter_dir(bases[0], tmp_path / "a")
    digest = store.push(source, "math:v1")
    view = store.resolve("math:v1")
    payload = next(view.glob("payload.*"))
    replacement = bytearray(payload.read_bytes())
    replacement[len(replacement) // 2] ^= 1
    payload.unlink()  # a view file that is no longer the blob (the blob itself stays intact)
    payload.write_bytes(bytes(replacement))
    report = store.verify()
    assert report.corrupt == () and report.stale_views_removed == (digest,) and report.views_checked == 1
    assert not view.exists()
    assert store.load("math:v1").stored.digest == digest  # rebuilt
    assert store.verify().stale_views_removed == ()


# -- special files in place of blobs -------------------------------------------------------------

def _replace_with(path, special):
    path.unlink()
    if special == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    elif special == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


def _store_commands(root, out, conn):
    """Child: pull, load (show) and verify against a damaged store, with address space capped."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[0])
    headroom = 512 * 1024 * 1024  # reading /dev/zero without limit would blow through this at once
    resource.setrlimit(resource.RLIMIT_AS, (pages * os.sysconf("SC_PAGE_SIZE") + headroom, resource.RLIM_INFINITY))
    os.environ["S2REG_HOME"] = root
    results = {}
    for name, args in {"pull": ["pull", "m:v1", "-o", out], "load": ["show", "m:v1"], "verify": ["verify"]}.items():
        result = CliRunner().invoke(main, args)
        results[name] = (result.exit_code, result.output)
    conn.send(results)
    os._exit(0)


@pytest.mark.parametrize("which", ["payload", "manifest"])
@pytest.mark.parametrize("special", ["symlink to /dev/zero", "fifo", "directory"])
def test_special_files_in_place_of_blobs_give_one_line_errors_fast(store, bases, tmp_path, special, which):
    source = adapter_dir(bases[0], tmp_path / "a")
    digest = store.push(source, "m:v1")
    blob = store.blob_path(store.entry("m:v1").manifest["payload"]["sha256"] if which == "payload" else digest)
    _replace_with(blob, special)
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_store_commands, args=(str(store.root), str(tmp_path / "out"), send))
    child.start()
    ready = receive.poll(60)  # a hang (FIFO) or an endless read (/dev/zero) never answers
    if not ready:
        child.kill()
    child.join(10)
    assert ready, f"pull/load/verify hung on a {special}"
    results = receive.recv()
    for command in ("pull", "load"):
        code, output = results[command]
        assert code == 1 and output.startswith("Error: ") and len(output.strip().splitlines()) == 1, (command, output)
        assert "regular file" in output, output
    code, output = results["verify"]
    assert code == 1 and "1 corrupt" in output, output
    assert not os.path.lexists(blob) and not (tmp_path / "out").exists()
    store.push(source, "m:v1")  # pushing again repairs it
    assert store.load("m:v1").stored.digest == digest


# -- pull -o into the store ----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["root", "inside", "parent"])
def test_pull_into_the_store_is_refused(store, bases, tmp_path, where):
    store.push(adapter_dir(bases[0], tmp_path / "a"), "m:v1")
    before = tree_digest(store.root)
    output = {"root": store.root, "inside": store.root / "refs" / "x", "parent": store.root.parent}[where]
    result = CliRunner().invoke(main, ["pull", "m:v1", "-o", str(output), "--overwrite"])
    assert result.exit_code == 1 and "inside the store" in result.output, result.output
    assert tree_digest(store.root) == before
    assert store.load("m:v1")
