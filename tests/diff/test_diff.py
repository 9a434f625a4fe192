"""``s2reg diff`` on adapters and on checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.format.arrays import to_torch
from s2reg import PISAAdapter, S2FTAdapter
from s2reg.cli import main
from s2reg.format import S2FTTarget
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
    down = next(r for r in report.tensors if r.tensor == DOWN)
    assert down.jaccard == 2 / 6
    da, db = to_torch(a.to_dense(DOWN)).double(), to_torch(b.to_dense(DOWN)).double()
    both = (da != 0) & (db != 0)
    x, y = da[both], db[both]
    assert abs(down.cosine - float(x @ y / (x.norm() * y.norm()))) < 1e-9
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


def _dense_reference(ta, tb) -> dict:
    """The comparison computed the obvious way: full masks and dense deltas (fine on tiny tensors)."""
    masks = []
    for t in (ta, tb):
        mask = torch.ones(t.shape, dtype=torch.bool)
        if isinstance(t, S2FTTarget):
            mask = torch.zeros(t.shape, dtype=torch.bool)
            index = to_torch(t.indices).long()
            mask.index_fill_(0 if t.axis == "rows" else 1, index, True)
        masks.append(mask)
    common = masks[0] & masks[1]
    x, y = to_torch(ta.to_dense()).double()[common], to_torch(tb.to_dense()).double()[common]
    return {
        "jaccard": float(common.sum()) / float((masks[0] | masks[1]).sum()),
        "common": int(common.sum()),
        "cosine": float(x @ y / (x.norm() * y.norm())),
        "relative_l2": float((x - y).norm() / x.norm()),
        "equal": torch.equal(masks[0], masks[1]) and torch.equal(to_torch(ta.to_dense()).double(), to_torch(tb.to_dense()).double()),
    }


@pytest.mark.parametrize("axes", [("rows", "rows"), ("rows", "columns"), ("columns", "rows"), ("columns", "columns"),
                                  ("pisa", "rows"), ("columns", "pisa"), ("pisa", "pisa"), ("pisa", "pisa-wide"),
                                  ("pisa-wide", "pisa-wide")])
def test_adapter_diff_from_payloads_matches_dense_masks(axes):
    """Adapters are compared from their payloads (S2FT slices, PISA coefficients and the blocks on an
    S2FT slice); the numbers equal the dense-mask definition, computed here from full dense deltas."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(12, 10, generator=g)}

    def make(kind, chosen):
        if kind.startswith("pisa"):  # 12 x 10 in 4 x 4 blocks (cropped columns) or 5 x 8 (cropped rows), k = 3 or 9
            block, k = ((4, 4), 3) if kind == "pisa" else ((5, 8), 9)
            blocks = -(-12 // block[0]) * -(-10 // block[1])
            idx = torch.stack([torch.randperm(block[0] * (block[1] // 2 + 1), generator=g)[:k] for _ in range(blocks)])
            values = torch.complex(torch.randn(blocks, k, generator=g), torch.randn(blocks, k, generator=g))
            return PISAAdapter.from_coefficients(base, {"w": (block, idx, values)}, base_name="b", scale=0.7)
        shape = (len(chosen), 10) if kind == "rows" else (12, len(chosen))
        return S2FTAdapter.from_slices(base, {"w": (kind, chosen, torch.randn(*shape, generator=g))}, base_name="b")

    a, b = make(axes[0], [1, 3, 4, 8]), make(axes[1], [3, 5, 8, 9])
    row = diff_adapters(a, b).tensors[0]
    expected = _dense_reference(a.targets["w"], b.targets["w"])
    for key in ("jaccard", "cosine", "relative_l2"):
        assert getattr(row, key) == pytest.approx(expected[key], rel=1e-6 if any(kind.startswith("pisa") for kind in axes) else 1e-12), key
    assert (row.common, row.equal) == (expected["common"], expected["equal"])
    assert diff_adapters(a, a).tensors[0].equal is True
