"""render: into a pipe, s2reg's lines are what rich would print, written without importing rich."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.console import Console
from rich.text import Text

from s2reg.cli import render

PARTS = [("merged", "green"), " 1 adapter(s) -> /tmp/[v2]/a[/]b ", ("ünïcode", "bold"), " " + "x" * 300]


def test_a_line_into_a_pipe_is_what_rich_would_print(monkeypatch):
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", piped)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    render.line(*PARTS)
    by_rich = io.StringIO()
    Console(file=by_rich, emoji=False).print(Text.assemble(*PARTS), soft_wrap=True)
    assert piped.getvalue() == by_rich.getvalue()


@pytest.mark.parametrize("env", [{"FORCE_COLOR": "1"}, {"TTY_COMPATIBLE": "1"}])
def test_forced_colour_still_goes_through_rich(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(render, "_consoles", {})
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", piped)
    render.line(*PARTS)
    assert "\x1b[" in piped.getvalue() and "ünïcode" in piped.getvalue()


def test_a_command_printing_into_a_pipe_does_not_import_rich(tmp_path):
    code = ("import sys; from s2reg.cli import render\n"
            "with render.progress() as bar:\n"
            "    bar.update(bar.add_task('x', total=None), advance=1)\n"
            "render.line(('ok', 'green'), ' done')\n"
            "print(any(m.startswith('rich') for m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**env, "S2REG_HOME": str(tmp_path)})
    assert done.stdout == "ok done\nFalse\n" and done.stderr == ""
