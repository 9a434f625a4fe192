"""All terminal output of the CLI: rich tables and progress for people, JSON for scripts.

Text that comes from users (paths, refs, model names, tensor names) is never parsed as rich markup:
``[v2]`` in a name would vanish into a style and ``[/]`` would crash the print. Tables and
:func:`line` take it as plain text; only the labels s2reg writes itself carry styles.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.table import Table
    from rich.text import Text

_consoles: dict[bool, Console] = {}
PIPE_WIDTH = 10_000  # columns of a console that writes into a pipe: wider than any table s2reg prints


def _console(stderr: bool = False) -> Console:
    """stdout's console (or stderr's), made on first use: a command that prints one plain line into a pipe
    never imports rich. No ":name:" emoji codes: s2reg never writes them, and their table is an import of its own."""
    if stderr not in _consoles:
        from rich.console import Console

        stream = sys.stderr if stderr else sys.stdout
        # into a pipe or a log there is no terminal to fit: rich's default of 80 columns would clip and fold
        # cells, so a table is as wide as its text (COLUMNS still sets a width when given)
        wide = not _styled_stream(stream) and "COLUMNS" not in os.environ
        _consoles[stderr] = Console(stderr=stderr, emoji=False, width=PIPE_WIDTH if wide else None)
    return _consoles[stderr]


def __getattr__(name: str) -> Console:  # ``render.console`` / ``render.errors``, for printing tables
    if name in ("console", "errors"):
        return _console(stderr=name == "errors")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _styled_stream(stream: Any) -> bool:
    """Whether rich would style or animate ``stream`` (its rules: TTY_COMPATIBLE, FORCE_COLOR, then isatty)."""
    if os.environ.get("TTY_COMPATIBLE") in ("0", "1"):
        return os.environ["TTY_COMPATIBLE"] == "1"
    if "FORCE_COLOR" in os.environ:
        return os.environ["FORCE_COLOR"] != ""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def emit_json(obj: Any) -> None:
    """One JSON document on stdout (for ``--json``): plain text, never wrapped or coloured."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def styled(text: str, style: str) -> Text:
    """A table cell in a style of s2reg's own (``styled("yes", "green")``)."""
    from rich.text import Text

    return Text(text, style=style)


def line(*parts: str | tuple[str, str], stderr: bool = False) -> None:
    """Print one line from plain strings and ``(text, style)`` pairs: ``line(("pushed", "green"), f" {ref}")``.

    Long lines are left to the terminal to wrap, so a path or ref stays one piece of text when piped
    (where there are no styles to draw, it is written as it is, without rich)."""
    stream = sys.stderr if stderr else sys.stdout
    if not _styled_stream(stream):
        stream.write("".join(p if isinstance(p, str) else p[0] for p in parts) + "\n")
        return
    from rich.text import Text

    _console(stderr).print(Text.assemble(*parts), soft_wrap=True)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Sequence[str] = (),
          clip: Sequence[str] = ()) -> Table:
    """A table of plain-text cells (or :func:`styled` ones); ``right`` columns are right-aligned, ``clip``
    columns stay on one line and end in an ellipsis when the terminal is too narrow (their whole text is
    in ``--json``; into a pipe nothing is too narrow), the others fold. Columns all named "" show no header."""
    from rich.table import Table
    from rich.text import Text

    # key/value tables have no column names: no header row of blanks
    t = Table(title=title, title_justify="left", header_style="bold", show_header=any(columns))
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", overflow="fold")
    clipped = [c in clip for c in columns]
    for row in rows:
        cells = [x.copy() if isinstance(x, Text) else Text(str(x)) for x in row]
        for cell, cut in zip(cells, clipped, strict=False):  # a short row: rich leaves the rest blank
            if cut:  # one line of text, but its column still gives way first (rich narrows the widest)
                cell.no_wrap, cell.overflow = True, "ellipsis"
        t.add_row(*cells)
    return t


class _Unseen:
    """A transient progress bar on a stderr that is not a terminal: rich's would show nothing either."""

    def __enter__(self) -> _Unseen:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, **_: Any) -> TaskID:
        return cast("TaskID", 0)  # rich's own id type, so code driving either bar type-checks against both

    def update(self, task: TaskID, **_: Any) -> None:
        return None


def progress(*, transient: bool = True) -> Progress | _Unseen:
    """The one progress bar style of s2reg (on stderr, so stdout stays clean for --json)."""
    if transient and not _styled_stream(sys.stderr):
        return _Unseen()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console(stderr=True),
        transient=transient,
    )


class StepBar:
    """A training run's progress bar, started by its first optimizer step (a run refused while it loads prints
    no empty bar); ``update`` takes the loop's ``Progress``."""

    def __init__(self, shown: bool):
        self.shown = shown
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, p: Any) -> None:
        if not self.shown:
            return
        if self.bar is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=_console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("train", total=p.total, loss=p.loss, lr=p.lr, tps=p.tokens_per_second)
        self.bar.update(self.task, completed=p.step, total=p.total, loss=p.loss, lr=p.lr, tps=p.tokens_per_second)
