"""What a new user hits (issue 24): adapter arguments, one adapter identity, file modes, readable tables."""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from s2reg import Store
from s2reg.cli import main, render

from ..surgery.helpers import s2ft, tiny


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def setup(tmp_path):
    base = tiny(tmp_path / "base")
    s2ft(base, seed=1).save(tmp_path / "a")
    return tmp_path, base


def test_a_mistyped_directory_is_told_it_is_neither_a_directory_nor_a_stored_name(tmp_path):
    result = run("inspect", "no-such-dir")
    assert result.exit_code == 1
    assert "no-such-dir: no such adapter directory, and no adapter no-such-dir:latest in" in result.output
    invalid = run("inspect", tmp_path / "no such dir")  # not a valid NAME either
    assert invalid.exit_code == 1 and "no such adapter directory, and not a valid NAME[:TAG]" in invalid.output


@pytest.mark.parametrize("command", [["validate"], ["inspect"], ["diff", "x:v1"], ["export", "--to", "peft-lora", "-o", "out"]])
def test_every_adapter_argument_takes_a_path_or_a_stored_name(setup, command):
    root, _ = setup
    assert run("push", root / "a", "x:v1").exit_code == 0
    stored = run(*command, "x:v1") if command[0] != "export" else run("export", "x:v1", *command[1:3], "-o", root / "out")
    assert stored.exit_code == 0, stored.output
    missing = run(command[0], root / "nope", *command[1:]) if command[0] != "export" else \
        run("export", root / "nope", *command[1:3], "-o", root / "out2")
    assert missing.exit_code == (2 if command[0] == "diff" else 1), missing.output  # README: bad input is 1 (diff: 2)
    assert missing.output.startswith("Error: ") and "no such adapter directory" in missing.output


def test_validate_names_a_stored_adapter_and_exits_1_for_a_missing_one(setup):
    root, _ = setup
    assert run("push", root / "a", "upper-s2ft:v1").exit_code == 0
    ok = run("validate", "upper-s2ft:v1", "--json")
    assert ok.exit_code == 0 and json.loads(ok.output)["ok"] is True
    assert run("validate", "./nope").exit_code == 1


def test_already_merged_names_the_adapter_by_the_digest_inspect_shows_and_the_checkpoint_as_such(setup):
    root, base = setup
    digest = json.loads(run("inspect", root / "a", "--json").output)["summary"]["digest"][:16]
    assert run("merge", base, root / "a", "--in-place").exit_code == 0
    again = run("merge", base, root / "a", "--in-place")
    assert again.exit_code == 1
    assert f"adapter {digest} (made for base " in again.output and f"already merged into checkpoint {base}" in again.output
    assert run("push", root / "a", "m:v1").exit_code == 0
    assert digest in run("ls").output


def _modes(directory):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*") if p.is_file()}


def test_every_file_written_gets_the_users_umask(setup):
    """The export's safetensors was 0600 while its config was 0644 (safetensors' save_file makes owner-only files)."""
    root, base = setup
    old = os.umask(0o022)
    try:
        assert run("export", root / "a", "--to", "peft-lora", "-o", root / "peft").exit_code == 0
        assert run("merge", base, root / "a", "-o", root / "merged").exit_code == 0
        s2ft(base, seed=3).save(root / "saved")
        assert run("push", root / "a", "p:v1").exit_code == 0
    finally:
        os.umask(old)
    assert set(_modes(root / "peft").values()) == {0o644}, _modes(root / "peft")
    assert set(_modes(root / "merged").values()) == {0o644}, _modes(root / "merged")
    assert set(_modes(root / "saved").values()) == {0o644}
    store = _modes(Store().root)
    assert store and all(mode & 0o044 == 0o044 for mode in store.values()), store  # readable by group and others


def test_diff_sorts_tensors_in_model_order_and_prints_only_the_verdict_when_identical(setup):
    from s2reg.ops.diff import _natural

    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (10, 2, 1, 0, 11)]
    assert sorted(names, key=_natural) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2, 10, 11)]
    root, base = setup
    same = run("diff", root / "a", root / "a")
    assert same.exit_code == 0 and same.output == "identical adapters\n"
    checkpoints = run("diff", base, base)
    assert checkpoints.exit_code == 0 and checkpoints.output == "identical checkpoints\n"


def test_ls_on_an_empty_store_says_how_to_fill_it():
    result = run("ls")
    assert result.exit_code == 0 and "no adapters in" in result.output and "s2reg push" in result.output
    assert "┃" not in result.output


def test_generate_cells_keep_a_continuation_on_its_row():
    from s2reg.cli.generate import _cell

    assert _cell("one\ntwo\r\nthree") == "one\\ntwo\\nthree"
    assert _cell("[bold]x[/]") == "[bold]x[/]"  # plain text: nothing escaped for rich


def test_generate_and_train_default_to_the_same_device(setup, monkeypatch):
    import s2reg.train.session as session

    def chosen():
        raise session.S2RegError("chosen by default_device")

    monkeypatch.setattr(session, "default_device", chosen)
    root, base = setup
    result = run("generate", base, "--adapter", root / "a", "--prompt", "hi")
    assert result.exit_code == 1 and "chosen by default_device" in result.output


def test_piped_tables_keep_every_cell_and_key_value_tables_have_no_blank_header(monkeypatch, capsys):
    """Into a pipe a table is as wide as its text: nothing clipped at 80 columns (the demo's PISA selection)."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(render, "_consoles", {})
    long = "expert 3: up channels " + ",".join(map(str, range(0, 200, 3)))
    render.console.print(render.table(None, ["layer", "selection"], [["0", long]], clip=["selection"]))
    render.console.print(render.table("summary", ["", ""], [["steps", "10"]]))
    out = capsys.readouterr().out
    assert long in out and "…" not in out
    summary = out.split("summary", 1)[1].splitlines()
    assert "steps" in summary[2] and not summary[2].startswith("┡")  # top rule, then the first row: no blank header
    assert not any(line.strip("┃ ") == "" for line in summary[1:3])


def test_a_manifest_that_is_not_json_is_named(setup):
    root, _ = setup
    (root / "a" / "s2reg.json").write_text("{not json")
    result = run("inspect", root / "a")
    assert result.exit_code == 1 and str(root / "a" / "s2reg.json") in result.output and "not valid JSON" in result.output
