"""``s2reg demo``: the main job on the embedded defaults."""

from __future__ import annotations

from pathlib import Path

import click

from ..demo import run_demo
from ..home import default_root
from . import render
from .common import json_option
from .inspect import show


def default_workdir() -> Path:
    return default_root() / "demo"


def _verdict(ok: bool):
    return render.styled("yes", "green") if ok else render.styled("no", "red")


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to build (replaced). Default: $S2REG_HOME/demo.")
@json_option
def demo_command(workdir: Path | None, as_json: bool) -> None:
    """The tour on embedded defaults: fixture model, S2FT and PISA adapters, inspect, merge/unmerge,
    then train -> push (local registry) -> fuse -> merge."""
    workdir = workdir or default_workdir()
    result = run_demo(workdir, step=lambda text: None if as_json else render.line((">", "cyan"), f" {text}"))
    if as_json:
        render.emit_json(result.as_json())
        return
    story = result.story
    for report in result.adapters.values():
        render.console.print()
        show(report)
    render.console.print()
    render.console.print(render.table("surgery", ["check", "result"],
                                      ([k.replace("_", " "), _verdict(v)] for k, v in result.surgery.as_json().items())))
    render.console.print(render.table("train -> push -> fuse -> merge", ["", ""], [
        ["trained parameters", f"{story.trainable_parameters:,}"],
        ["steps", story.steps],
        ["eval loss", f"{story.eval_loss_before:.3f} -> {story.eval_loss_after:.3f}"],
        ["registry", ", ".join(story.registry)],
        ["fused merge == merging both", _verdict(story.fused_merge_equals_merging_both)],
    ]))
    render.console.print()
    render.line(("done", "green"), f": everything is in {workdir}")


COMMANDS = [demo_command]
