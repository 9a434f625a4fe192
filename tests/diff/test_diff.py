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


def test_exit_status_is_0_same_1_different_2_trouble(tmp_path):
    """As diff(1) and cmp(1): a difference (1) is never confused with an error (2)."""
    base = tiny(tmp_path / "base")
    s2ft(base, seed=1).save(tmp_path / "a")
    s2ft(base, seed=2).save(tmp_path / "b")
    s2reg.merge(base, [s2reg.load(tmp_path / "a")], tmp_path / "merged")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in (tmp_path / "a").iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    payload = next(p for p in corrupt.iterdir() if p.name.startswith("payload"))
    payload.write_bytes(payload.read_bytes()[:-7])
    cases = [
        ((tmp_path / "a", tmp_path / "a"), 0),
        ((base, base), 0),
        ((tmp_path / "a", tmp_path / "b"), 1),
        ((base, tmp_path / "merged"), 1),
        ((tmp_path / "a", tmp_path / "missing"), 2),
        ((tmp_path / "a", corrupt), 2),
        ((base, tmp_path / "missing-checkpoint" / "x.safetensors"), 2),
        ((base, tmp_path / "a" / "s2reg.json"), 2),
    ]
    for args, status in cases:
        result = run("diff", *args)
        assert result.exit_code == status, (args, result.output)
        if status == 2:
            assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert run("diff", tmp_path / "a").exit_code == 2  # usage errors too
    assert "2  trouble" in run("diff", "--help").output
