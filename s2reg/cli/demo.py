"""``s2reg demo``: the main job on the embedded defaults."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..demo import run_demo
from . import render
from .common import json_option
from .inspect import show


def default_workdir() -> Path:
    return Path(os.environ.get("S2REG_HOME", Path.home() / ".cache" / "s2reg")) / "demo"


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to build (replaced). Default: $S2REG_HOME/demo.")
@json_option
def demo_command(workdir: Path | None, as_json: bool) -> None:
    """The tour on embedded defaults: fixture model, S2FT and PISA adapters, inspect, merge, unmerge."""
    workdir = workdir or default_workdir()
    reports = run_demo(workdir, step=lambda text: None if as_json else render.console.print(f"[cyan]>[/] {text}"))
    surgery = reports.pop("surgery")
    if as_json:
        render.emit_json({"workdir": str(workdir), "adapters": reports, "surgery": surgery})
        return
    for report in reports.values():
        render.console.print()
        show(report)
    render.console.print()
    render.console.print(render.table("surgery", ["check", "result"],
                                      ([k.replace("_", " "), "[green]yes[/]" if v else "[red]no[/]"] for k, v in surgery.items())))
    render.console.print(f"\n[green]done[/]: everything is in {workdir}")


COMMANDS = [demo_command]
