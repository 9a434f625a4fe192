"""``s2reg diff`` on adapters and on checkpoints."""

from __future__ import annotations

import json

from click.testing import CliRunner

import s2reg
from s2reg.cli import main
from s2reg.ops.diff import diff_adapters

from ..surgery.helpers import s2ft, tiny

DOWN = "model.layers.0.mlp.down_proj.weight"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_adapter_diff_reports_overlap_and_similarity(tmp_path):
    base = tiny(tmp_path / "base")
    a = s2ft(base, seed=1, channels=(1, 2, 3, 4))
    b = s2ft(base, seed=1, channels=(3, 4, 5, 6))
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    report = diff_adapters(a, b)
    down = next(r for r in report["tensors"] if r["tensor"] == DOWN)
    assert down["jaccard"] == 2 / 6
    da, db = a.to_dense(DOWN).double(), b.to_dense(DOWN).double()
    both = (da != 0) & (db != 0)
    x, y = da[both], db[both]
    assert abs(down["cosine"] - float(x @ y / (x.norm() * y.norm()))) < 1e-9
    same = run("diff", tmp_path / "a", tmp_path / "a", "--json")
    assert same.exit_code == 0 and json.loads(same.stdout)["identical"] is True
    different = run("diff", tmp_path / "a", tmp_path / "b")
    assert different.exit_code == 1 and "adapters differ" in different.output


def test_checkpoint_diff_finds_the_changed_rows_and_columns(tmp_path):
    base = tiny(tmp_path / "base")
    adapter = s2ft(base, heads=(1,), channels=(7, 9))
    s2reg.merge(base, [adapter], tmp_path / "merged")
    result = run("diff", base, tmp_path / "merged", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    by_name = {r["tensor"]: r for r in report["tensors"]}
    assert set(by_name) == set(adapter.targets)
    assert by_name[DOWN]["columns"] == 2 and by_name[DOWN]["rows"] == 64
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["rows"] == 16
    assert run("diff", base, base).exit_code == 0
    other = tiny(tmp_path / "wide", hidden_size=32)
    assert "shape_or_dtype_differs" in json.loads(run("diff", base, other, "--json").stdout)["tensors"][0]
