"""``inspect --base``: S2FT selections shown as heads and channels of the base's family."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from s2reg.cli import main, render

from .helpers import selection_adapter


def inspect(*args):
    result = CliRunner().invoke(main, ["inspect", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(("name", "tensor", "units", "expert"), [
    ("phi3", "model.layers.1.self_attn.qkv_proj.weight", {"q": [2], "k": [1], "v": [1]}, None),  # fused rows
    ("gpt2", "transformer.h.1.attn.c_attn.weight", {"q": [2], "k": [2], "v": [2]}, None),  # transposed columns
    ("gpt_neox", "gpt_neox.layers.1.attention.query_key_value.weight", {"q": [2], "k": [2], "v": [2]}, None),
    ("phi3", "model.layers.1.mlp.gate_up_proj.weight", {"gate": [2, 5], "up": [2, 5]}, None),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight", {"down": [2, 5]}, "3"),
    ("qwen2_moe", "model.layers.1.mlp.shared_expert.up_proj.weight", {"up": [2, 5]}, "shared"),
])
def test_inspect_with_the_base_shows_heads_and_channels(name, tensor, units, expert, zoo_checkpoint, tmp_path,
                                                       monkeypatch):
    monkeypatch.setattr(render.console, "_width", 250)
    base = zoo_checkpoint(name)
    selection_adapter(base, heads=(2,), layers=[1]).save(tmp_path / "a")
    rows = {r["name"]: r for r in json.loads(inspect(tmp_path / "a", "--base", base, "--json"))["targets"]}
    assert rows[tensor]["units"] == units and rows[tensor]["expert"] == expert and rows[tensor]["layer"] == 1
    plain = {r["name"]: r for r in json.loads(inspect(tmp_path / "a", "--json"))["targets"]}
    assert "units" not in plain[tensor]
    table = inspect(tmp_path / "a", "--base", base)
    role, picked = next(iter(units.items()))
    kind = "heads" if role == "q" else "channels"
    prefix = f"expert {expert}: " if expert is not None else ""
    assert f"{prefix}{role} {kind} {','.join(map(str, picked))} of" in table


def test_inspect_shows_the_channels_of_each_expert_of_a_stacked_tensor(zoo_checkpoint, tmp_path, monkeypatch):
    """gpt-oss: one target per stacked tensor (FORMAT §4.5) reads as channels per expert, one row per expert."""
    monkeypatch.setattr(render.console, "_width", 250)
    base = zoo_checkpoint("gpt_oss")
    selection_adapter(base, heads=(2,), channels=(2, 5), layers=[1]).save(tmp_path / "a")
    rows = json.loads(inspect(tmp_path / "a", "--base", base, "--json"))["targets"]
    gate_up = [r for r in rows if r["name"] == "model.layers.1.mlp.experts.gate_up_proj"]
    assert [r["expert"] for r in gate_up] == ["0", "1", "2", "3"]
    assert all(r["units"] == {"gate": [2, 5], "up": [2, 5]} and r["axis"] == "expert_columns" for r in gate_up)
    down = [r for r in rows if r["name"] == "model.layers.1.mlp.experts.down_proj"]
    assert [(r["expert"], r["units"], r["axis"]) for r in down] == [(e, {"down": [2, 5]}, "expert_rows") for e in "0123"]
    assert "expert 3: down channels 2,5 of 48" in inspect(tmp_path / "a", "--base", base)


def test_inspect_plot_by_head_and_channel(zoo_checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    base = zoo_checkpoint("phi3")
    selection_adapter(base, heads=(2,), layers=[1]).save(tmp_path / "a")
    inspect(tmp_path / "a", "--base", base, "--plot", tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
