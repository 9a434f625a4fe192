"""The command line starts without importing any command's module: ``--help`` lists every command
from the summaries in ``s2reg.cli.COMMANDS``, which must stay equal to the commands' own help."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from s2reg.cli import COMMANDS, main

MODULES = sorted({f"s2reg.cli.{lazy.module}" for lazy in COMMANDS.values()})


def test_every_summary_is_the_commands_own_first_line():
    for name, lazy in COMMANDS.items():
        command = lazy.load()
        assert command.name == name
        assert lazy.summary == command.get_short_help_str(10_000), name


def test_every_command_module_is_in_the_table():
    listed = {(lazy.module, lazy.attribute) for lazy in COMMANDS.values()}
    for module in MODULES:
        loaded = sys.modules.get(module) or __import__(module, fromlist=["x"])
        commands = {k for k, v in vars(loaded).items() if isinstance(v, click.Command) and v.callback.__module__ == module}
        assert commands and {(module.rsplit(".", 1)[1], k) for k in commands} <= listed, module


def test_help_lists_every_command_and_runs_one():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:", 1)[1].split()
    assert set(COMMANDS) <= set(listed)
    assert CliRunner().invoke(main, ["rm", "--help"]).exit_code == 0
    assert CliRunner().invoke(main, ["no-such-command"]).exit_code == 2


def test_help_imports_no_command_module():
    code = ("import sys; from s2reg.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
