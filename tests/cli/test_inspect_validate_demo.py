"""The format-level commands through the CLI: inspect, validate --base, demo."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.cli import main, render
from s2reg.tensors import save_state_dict
from tests.format.helpers import DOWN, Q, pisa_adapter, s2ft_adapter, tiny_base


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_json_lists_indices_and_blocks(tmp_path):
    s2ft_adapter().save(tmp_path / "s")
    pisa_adapter().save(tmp_path / "p", compress=False)
    s = json.loads(run("inspect", tmp_path / "s", "--json").output)
    by_name = {t["name"]: t for t in s["targets"]}
    assert by_name[DOWN]["axis"] == "columns" and by_name[DOWN]["indices"] == [3, 7, 8, 30]
    assert by_name[Q]["groups"] == [1] and by_name[Q]["group_size"] == 8
    assert s["summary"]["bytes_on_disk"] == (tmp_path / "s" / "payload.safetensors.zst").stat().st_size
    p = json.loads(run("inspect", tmp_path / "p", "--json").output)
    assert {t["block"][0] for t in p["targets"]} == {4} and {t["coefficients"] for t in p["targets"]} == {5}
    assert p["summary"]["encoding"] == "raw" and p["summary"]["compression_ratio"] == 1.0


def test_inspect_table_shows_every_target(tmp_path, monkeypatch):
    monkeypatch.setattr(render.console, "_width", 200)
    s2ft_adapter().save(tmp_path / "s")
    result = run("inspect", tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert "mlp.down_proj" in result.output and "self_attn.q_proj" in result.output
    assert "4/40 cols: 3,7-8,30" in result.output


def test_inspect_sizes_compresses_each_target_alone(tmp_path, monkeypatch):
    """--sizes adds each target's compressed size: what the payload codec makes of that target alone, i.e.
    the payload file of an adapter holding only it. Without the flag no target is compressed."""
    monkeypatch.setattr(render.console, "_width", 200)
    adapter = s2ft_adapter()
    adapter.save(tmp_path / "s")
    plain = json.loads(run("inspect", tmp_path / "s", "--json").output)
    assert all("compressed_bytes" not in t for t in plain["targets"])
    assert "zstd ┃" not in run("inspect", tmp_path / "s").output
    sized = json.loads(run("inspect", tmp_path / "s", "--json", "--sizes").output)
    for row in sized["targets"]:
        alone = s2reg.S2FTAdapter({row["name"]: adapter.targets[row["name"]]}, adapter.base)
        stored = alone.save(tmp_path / row["name"])
        assert row["compressed_bytes"] == stored.payload_bytes, row["name"]
    table = run("inspect", tmp_path / "s", "--sizes").output
    assert "zstd ┃" in table and render.human_bytes(sized["targets"][0]["compressed_bytes"]) in table


def test_text_from_users_is_never_read_as_markup(tmp_path, monkeypatch):
    """Names and paths with brackets print as they are: ``[v2]`` does not vanish into a style and ``[/]``
    does not crash the print (inspect's header, ls's table, validate's line, push's line)."""
    monkeypatch.setattr(render.console, "_width", 200)
    base = {"model.layers.0.mlp.down_proj.weight": torch.zeros(8, 16)}
    slices = {"model.layers.0.mlp.down_proj.weight": ("columns", [1, 2], torch.ones(8, 2))}
    name = "org/model[v2][/]"
    folder = tmp_path / "[bold]adapter[/]"
    s2reg.S2FTAdapter.from_slices(base, slices, base_name=name).save(folder)
    runner = CliRunner(env={"S2REG_HOME": str(tmp_path / "home")})
    for args, expected in ((["inspect", folder], name), (["validate", folder], str(folder)),
                           (["push", folder, "t:v1"], str(folder)), (["ls"], name)):
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, (args, result.output)
        assert expected in result.output, (args, result.output)


def test_inspect_table_fits_a_narrow_terminal_and_lists_layers_in_model_order(tmp_path, monkeypatch):
    """At 80 columns the long selection column is cut short with an ellipsis (its whole text is in --json);
    no other cell is folded, and layer 2 comes before layer 10."""
    monkeypatch.setattr(render.console, "_width", 80)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (10, 2)]
    base = {name: torch.zeros(8, 256) for name in names}
    g = torch.Generator().manual_seed(0)
    slices = {name: ("columns", list(range(0, 256, 3)), torch.randn(8, 86, generator=g)) for name in names}
    s2reg.S2FTAdapter.from_slices(base, slices, base_name="tiny").save(tmp_path / "wide")
    result = run("inspect", tmp_path / "wide")
    assert result.exit_code == 0, result.output
    table = result.output[result.output.index("┏"):]
    assert max(len(line) for line in table.splitlines()) <= 80
    assert "…" in table and "mlp.down_proj" in table
    assert table.index("│ 2 ") < table.index("│ 10 ")


def test_validate_against_the_right_and_the_wrong_base(tmp_path):
    base = tiny_base()
    s2ft_adapter(base).save(tmp_path / "a")
    right = save_state_dict(tmp_path / "right", base)
    ok = run("validate", tmp_path / "a", "--base", right, "--json")
    assert ok.exit_code == 0 and json.loads(ok.output)["base_checked"] is True
    wrong = save_state_dict(tmp_path / "wrong", tiny_base(seed=9))
    bad = run("validate", tmp_path / "a", "--base", wrong)
    assert bad.exit_code == 1 and bad.output.startswith("Error: ") and "differs from the one this adapter was made for" in bad.output
    reshaped = dict(base, **{DOWN: torch.zeros(16, 41, dtype=torch.bfloat16)})
    shape = run("validate", tmp_path / "a", "--base", save_state_dict(tmp_path / "shape", reshaped))
    assert shape.exit_code == 1 and "[16, 41] BF16, adapter expects [16, 40]" in shape.output


def test_inspect_of_a_missing_adapter_is_one_clean_line(tmp_path):
    result = run("inspect", tmp_path / "nope")
    assert result.exit_code != 0 and "Traceback" not in result.output


@pytest.mark.slow  # over 20 s on 2 cores: outside the quick subset (README)
@pytest.mark.filterwarnings("error::s2reg.train.change.LargeStepWarning")  # the tour trains as we advise
def test_demo_runs_end_to_end(tmp_path):
    result = run("demo", "--workdir", tmp_path / "demo", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["adapters"]) == {"s2ft", "pisa"}
    assert report["surgery"] == {"s2ft_tensors_bit_identical_after_unmerge": True, "in_place_round_trip_bit_identical": True}
    story = report["story"]
    assert story["fused_merge_equals_merging_both"] is True
    assert story["registry"] == ["demo/fused:v1", "demo/known:v1", "demo/trained:v1"]
    assert story["eval_loss_after"] < story["eval_loss_before"]
    s2ft = s2reg.load(tmp_path / "demo" / "s2ft-adapter")
    heads = {tuple(t.groups) for n, t in s2ft.targets.items() if "q_proj" in n}
    assert heads == {(0, 2)}
    assert report["adapters"]["pisa"]["summary"]["params"] == s2reg.load(tmp_path / "demo" / "pisa-adapter").num_params


def test_inspect_plot_writes_a_png(tmp_path):
    s2ft_adapter().save(tmp_path / "s")
    pisa_adapter().save(tmp_path / "p")
    for name in ("s", "p"):
        result = run("inspect", tmp_path / name, "--plot", tmp_path / f"{name}.png")
        assert result.exit_code == 0, result.output
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
