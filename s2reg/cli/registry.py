"""``push``, ``pull``, ``ls``, ``show``, ``tag``, ``rm``, ``gc``, ``verify``: the adapter registry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ..registry import Store, list_adapters
from . import render
from .common import json_option, overwrite_option, sizes_option

HF = "hf://"


def _is_hub(location: str) -> bool:
    return location.startswith(HF)


@click.command("push")
@click.argument("source")
@click.argument("destination")
@click.option("--subfolder", help="hf://: put the adapter in this folder of the repo (several adapters per repo).")
@click.option("--private", is_flag=True, help="hf://: create the repo as private.")
@json_option
def push_command(source: str, destination: str, subfolder: str | None, private: bool, as_json: bool) -> None:
    """Store an adapter locally, or publish a stored one on the Hugging Face Hub.

    \b
    s2reg push ./math-adapter math-s2ft:v1               # directory -> local store
    s2reg push math-s2ft:v1 hf://my-org/math-s2ft        # local store -> Hub (model card included)
    s2reg push math-s2ft:v1 hf://my-org/adapters@dev --subfolder math
    """
    store = Store()
    if _is_hub(destination):
        from ..registry.hub import push_to_hub

        pushed = push_to_hub(store, source, destination, subfolder=subfolder, private=private)
        digest, result = pushed.digest, pushed.as_json()
    else:
        digest = store.push(Path(source), destination)
        result = {"ref": destination, "digest": digest, "store": str(store.root)}
    if as_json:
        render.emit_json(result)
    else:
        render.line(("pushed", "green"), f" {source} -> {destination} ({digest[:16]})")


@click.command("pull")
@click.argument("source")
@click.argument("ref", required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the adapter directory here.")
@click.option("--subfolder", help="hf://: the adapter's folder in the repo.")
@overwrite_option
@json_option
def pull_command(source: str, ref: str | None, output: Path | None, subfolder: str | None, overwrite: bool, as_json: bool) -> None:
    """Fetch an adapter from the Hub into the local store, or copy a stored one out to a directory.

    Every digest is verified before anything lands. HF_HUB_OFFLINE=1 pulls from the Hub cache.

    \b
    s2reg pull hf://my-org/math-s2ft math-s2ft:v1
    s2reg pull math-s2ft:v1 -o ./math-adapter
    """
    store = Store()
    if _is_hub(source):
        from ..registry.hub import pull_from_hub

        if output:
            store.check_output(output)  # before anything is downloaded
        pulled = pull_from_hub(store, source, ref, subfolder=subfolder)
        if output:
            store.pull(pulled.ref, output, overwrite=overwrite)
            pulled = dataclasses.replace(pulled, output=str(output))
        result = pulled.as_json()
    else:
        if output is None:
            raise click.UsageError("give -o DIR to copy a stored adapter out")
        store.pull(source, output, overwrite=overwrite)
        result = {"ref": source, "output": str(output), "digest": store.digest_of(source)}
    if as_json:
        render.emit_json(result)
    else:
        render.line(("pulled", "green"), f" {source} -> {result.get('output') or result['ref']}")


@click.command("ls")
@click.option("--base", type=click.Path(exists=True), help="Only adapters whose fingerprints match this checkpoint.")
@click.option("--kind", type=click.Choice(["s2ft", "pisa"]))
@json_option
def ls_command(base: str | None, kind: str | None, as_json: bool) -> None:
    """List the stored adapters."""
    rows = list_adapters(Store(), base=base, kind=kind)
    if as_json:
        render.emit_json([r.as_json() for r in rows])
        return
    if not rows:
        filters = " matching --base/--kind" if base or kind else ""
        render.line(f"no adapters{filters} in {Store().root}; store one with `s2reg push DIR NAME[:TAG]`")
        return
    render.console.print(render.table(
        None, ["ref", "kind", "base", "targets", "bytes", "digest", "created"],
        ([r.ref, r.kind, r.base, r.targets, render.human_bytes(r.bytes), r.digest[:16], (r.created or "")[:10]]
         for r in rows),
        right=["targets", "bytes"], clip=["base"]))


@click.command("show")
@click.argument("ref")
@sizes_option
@json_option
def show_command(ref: str, sizes: bool, as_json: bool) -> None:
    """Show a stored adapter (verified), like `s2reg inspect`."""
    from ..ops.describe import describe
    from .inspect import show as show_report

    store = Store()
    report = describe(store.load(ref), sizes=sizes).with_ref(ref)
    if as_json:
        render.emit_json(report.as_json())
    else:
        show_report(report)


@click.command("tag")
@click.argument("source")
@click.argument("target")
def tag_command(source: str, target: str) -> None:
    """Point TARGET at the adapter SOURCE points at (no bytes copied)."""
    digest = Store().tag(source, target)
    render.line(("tagged", "green"), f" {target} -> {digest[:16]}")


@click.command("rm")
@click.argument("refs", nargs=-1, required=True)
def rm_command(refs: tuple[str, ...]) -> None:
    """Remove refs (their blobs go at the next `s2reg gc`)."""
    store = Store()
    for ref in refs:
        store.remove(ref)
        render.line(("removed", "green"), f" {ref}")


@click.command("gc")
@json_option
def gc_command(as_json: bool) -> None:
    """Delete blobs that no ref points at."""
    result = Store().gc()
    if as_json:
        render.emit_json(result.as_json())
    else:
        render.line(f"removed {result.blobs_removed} blob(s), freed {render.human_bytes(result.bytes_freed)}")


@click.command("verify")
@json_option
def verify_command(as_json: bool) -> None:
    """Re-hash every blob in the store; quarantine corrupt ones (and anything that is not a regular
    file) and name the refs they break; remove views that are not exactly their blobs."""
    result = Store().verify()
    if as_json:
        render.emit_json(result.as_json())
    else:
        stale = len(result.stale_views_removed)
        render.line(f"checked {result.blobs_checked} blob(s): {len(result.corrupt)} corrupt; "
                    f"{result.views_checked} view(s)"
                    + (f": {stale} stale, removed (rebuilt on the next load)" if stale else ""))
        for broken in result.broken_refs:
            render.line(("broken", "red"), f" {broken.ref}: {broken.error}", stderr=True)
    if not result.ok:
        raise SystemExit(1)


COMMANDS = [push_command, pull_command, ls_command, show_command, tag_command, rm_command, gc_command, verify_command]
