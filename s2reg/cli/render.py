"""All terminal output of the CLI: rich tables and progress for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rich.progress import Progress

console = Console()
errors = Console(stderr=True)


def emit_json(obj: Any) -> None:
    """One JSON document on stdout (for ``--json``): plain text, never wrapped or coloured."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Sequence[str] = (),
          clip: Sequence[str] = ()) -> Table:
    """A table; ``right`` columns are right-aligned, ``clip`` columns stay on one line and end in an
    ellipsis when the terminal is too narrow (their whole text is in ``--json``), the others fold."""
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", overflow="fold")
    clipped = [c in clip for c in columns]
    for row in rows:
        # a clipped cell is one line of text, but its column still gives way first (rich narrows the widest)
        t.add_row(*(Text(str(x), no_wrap=True, overflow="ellipsis") if cut else str(x) for x, cut in zip(row, clipped)))
    return t


def progress(*, transient: bool = True) -> Progress:
    """The one progress bar style of s2reg (on stderr, so stdout stays clean for --json)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=errors,
        transient=transient,
    )
