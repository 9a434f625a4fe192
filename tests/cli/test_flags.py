"""Flags mean one thing everywhere: --overwrite only replaces outputs, --skip-base-check only skips
base checks, the retired --force says what replaced it, and error messages suggest real flags."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from s2reg import load, merge
from s2reg.cli import main

from ..surgery.helpers import s2ft, tensor_digests, tiny

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def accepted(command: str) -> set[str]:
    return {opt for p in main.commands[command].params for opt in p.opts + p.secondary_opts} | {"--help"}


def assert_suggests_only_real_flags(command: str, output: str) -> None:
    """Every ``--flag`` an error message names is one ``command`` accepts (and is not the retired --force)."""
    suggested = set(FLAG.findall(output))
    assert "--force" not in suggested, output
    assert suggested <= accepted(command), (command, suggested - accepted(command), output)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    base, other = tiny(root / "base"), tiny(root / "other", seed=5)
    s2ft(base, seed=1).save(root / "a")
    s2ft(base, seed=2, heads=(0,), channels=(9,)).save(root / "b")
    merge(base, [load(root / "a")], root / "merged")
    return root, base, other


def writes_output(command: click.Command) -> bool:
    return any("--output" in p.opts for p in command.params)


def test_every_command_that_writes_an_output_has_the_one_overwrite_option():
    writers = {name for name, command in main.commands.items() if writes_output(command)}
    assert writers >= {"merge", "unmerge", "permute", "unpermute", "extract", "fuse", "train", "export", "import", "pull"}
    for name in writers:
        options = {p.name: p for p in main.commands[name].params}
        assert options["overwrite"].opts == ["--overwrite"] and options["overwrite"].is_flag, name
        assert options["overwrite"].help == "Replace OUTPUT if it exists.", name
        assert options["force"].hidden, name  # only there to say what replaced it
    for name, command in main.commands.items():
        assert all(p.name != "force" or p.hidden for p in command.params), name
    assert {name for name, c in main.commands.items() if any(p.name == "skip_base_check" for p in c.params)} == {
        "merge", "unmerge"}


def test_force_is_retired_with_a_one_line_pointer_to_its_replacements(setup):
    root, base, _ = setup
    for command in ("merge", "unmerge"):
        result = run(command, base, root / "a", "-o", root / "out", "--force")
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (
            "Error: --force was split into --overwrite (replace OUTPUT) and --skip-base-check (skip the base check)")
        assert_suggests_only_real_flags(command, result.output.replace("--force", ""))
    fused = run("fuse", root / "a", root / "b", "-o", root / "out", "--force")
    assert fused.exit_code == 2 and fused.output.strip() == "Error: --force was renamed --overwrite"
    assert not (root / "out").exists()


def test_rerunning_a_merge_with_overwrite_still_refuses_a_wrong_base(setup, tmp_path):
    root, base, other = setup
    out = tmp_path / "merged"
    assert run("merge", base, root / "a", "-o", out).exit_code == 0
    first = tensor_digests(out)
    again = run("merge", other, root / "a", "-o", out, "--overwrite")
    assert again.exit_code == 1 and "differs from the base this adapter was made for" in again.output
    assert len(again.output.strip().splitlines()) == 1 and "Traceback" not in again.output
    assert_suggests_only_real_flags("merge", again.output)
    assert tensor_digests(out) == first  # refused before any write
    exists = run("merge", base, root / "a", "-o", out)
    assert exists.exit_code == 1 and "already exists" in exists.output
    assert_suggests_only_real_flags("merge", exists.output)
    loud = run("merge", other, root / "a", "-o", out, "--overwrite", "--skip-base-check")
    assert loud.exit_code == 0, loud.output
    assert tensor_digests(out) != first
    in_place = run("merge", base, root / "a", "--in-place", "--overwrite")
    assert in_place.exit_code == 2 and "--overwrite is for -o/--output" in in_place.output


def test_unmerge_refuses_an_adapter_the_ledger_lacks_unless_told_loudly(setup, tmp_path):
    root, base, _ = setup
    assert run("merge", base, root / "a", "-o", tmp_path / "merged").exit_code == 0
    stray = run("unmerge", tmp_path / "merged", root / "b", "-o", tmp_path / "back")
    assert stray.exit_code == 1 and "is not recorded as merged" in stray.output
    assert_suggests_only_real_flags("unmerge", stray.output)
    assert not (tmp_path / "back").exists()
    loud = run("unmerge", tmp_path / "merged", root / "b", "-o", tmp_path / "back", "--skip-base-check")
    assert loud.exit_code == 0, loud.output


def test_validate_against_a_wrong_base_suggests_no_flag_it_lacks(setup):
    root, _, other = setup
    result = run("validate", root / "a", "--base", other)
    assert result.exit_code == 1 and "differs from the one this adapter was made for" in result.output
    assert_suggests_only_real_flags("validate", result.output)


@pytest.mark.parametrize("command", ["fuse", "permute", "extract", "export", "train"])
def test_existing_outputs_name_the_overwrite_flag(setup, tmp_path, command):
    root, base, _ = setup
    out = tmp_path / "out"
    out.mkdir()
    args = {
        "fuse": ["fuse", root / "a", root / "b", "-o", out],
        "permute": ["permute", base, "--plan", root / "a", "-o", out],
        "extract": ["extract", base, root / "merged", "-o", out],
        "export": ["export", root / "a", "-o", out],
        "train": ["train", "--base", base, "--data", next((root / "a").glob("*.json")), "--method", "s2ft", "-o", out],
    }[command]
    result = run(*args)
    assert result.exit_code == 1 and result.output.strip().startswith("Error: output already exists"), result.output
    assert len(result.output.strip().splitlines()) == 1 and "--overwrite" in FLAG.findall(result.output)
    assert_suggests_only_real_flags(command, result.output)
    if command != "train":  # (a JSON manifest is no training data; train's own tests cover --overwrite)
        replaced = run(*args, "--overwrite")
        assert replaced.exit_code == 0, replaced.output
