"""Co-permutation: function-preserving, GQA-aware, exactly reversible (spec/SURGERY.md §4)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.arch import resolve_source
from s2reg.cli import main
from s2reg.format.arrays import to_torch
from s2reg.errors import ShapeError
from s2reg.ops.permute import LayerPermutation, plan
from s2reg.surgery import merge, permute_checkpoint, unmerge, unpermute_checkpoint
from s2reg.tensors import CheckpointSource

from .helpers import file_digests, logits, model_of, s2ft, tensor_digests, tiny


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_permute_keeps_outputs_and_unpermute_is_bit_exact(tmp_path, family):
    base = tiny(tmp_path / "base", family, dtype=torch.float32, num_attention_heads=8,
                **({"num_key_value_heads": 4, "head_dim": 8} if family == "llama" else {}))
    adapter = s2ft(base, heads=(3, 6), channels=(5, 77, 100))
    permute_checkpoint(base, adapter, tmp_path / "perm")
    assert tensor_digests(tmp_path / "perm") != tensor_digests(base)
    a, b = logits(model_of(base, torch.float32)), logits(model_of(tmp_path / "perm", torch.float32))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    unpermute_checkpoint(tmp_path / "perm", tmp_path / "back")
    assert file_digests(tmp_path / "back") == file_digests(base)


def test_selection_becomes_contiguous_and_heads_stay_in_their_groups(tmp_path):
    base = tiny(tmp_path / "base", num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    with CheckpointSource(base) as source:
        info = resolve_source(source)
    dims = info.dims
    perm = plan(info, {0: [1, 6]}, {0: [9, 3]}).layers[0]
    assert perm.channels[:2] == [3, 9]
    assert perm.kv_heads == [0, 1]
    assert perm.heads[0] == 1 and perm.heads[4] == 6  # first in their kv group
    for new, old in enumerate(perm.heads):
        assert perm.kv_heads[new // dims.group] == old // dims.group
    with pytest.raises(ShapeError, match="leave its key/value group"):
        LayerPermutation([4, 1, 2, 3, 0, 5, 6, 7], [0, 1], list(range(dims.intermediate))).check(info, 0)


def test_merge_into_a_permuted_checkpoint_maps_original_coordinates(tmp_path):
    base = tiny(tmp_path / "base")
    adapter = s2ft(base, heads=(1,), channels=(70, 71))
    permute_checkpoint(base, adapter, tmp_path / "perm")
    merge(tmp_path / "perm", [adapter], tmp_path / "perm_merged")  # fingerprints checked in original order
    unpermute_checkpoint(tmp_path / "perm_merged", tmp_path / "merged_back")
    merge(base, [adapter], tmp_path / "merged")
    assert tensor_digests(tmp_path / "merged_back") == tensor_digests(tmp_path / "merged")
    unmerge(tmp_path / "perm_merged", [adapter], tmp_path / "perm_again")
    assert tensor_digests(tmp_path / "perm_again") == tensor_digests(tmp_path / "perm")


def test_cli_permute_from_a_selection_file(tmp_path):
    base = tiny(tmp_path / "base")
    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps({"heads": {"1": [2]}, "channels": {"0": [10, 11]}}))
    run = CliRunner().invoke
    out = run(main, ["permute", str(base), "--plan", str(selection), "-o", str(tmp_path / "p"), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["layers_permuted"] == 2
    # layer 1: heads -> q, k, v rows and o columns; layer 0: channels -> gate, up rows and down columns
    assert report["tensors_changed"] == 7
    again = run(main, ["permute", str(tmp_path / "p"), "--plan", str(selection), "-o", str(tmp_path / "pp")])
    assert again.exit_code == 1 and "already permuted" in again.output
    assert run(main, ["unpermute", str(tmp_path / "p"), "-o", str(tmp_path / "b")]).exit_code == 0
    assert file_digests(tmp_path / "b") == file_digests(base)
    plain = run(main, ["unpermute", str(base), "-o", str(tmp_path / "x")])
    assert plain.exit_code == 1 and "not a permuted checkpoint" in plain.output


# -- families (issue 10): MoE experts, encoders without their prefix -------------------------------

def test_moe_channels_are_permuted_per_expert_from_a_selection_file(zoo_checkpoint, tmp_path):
    base = zoo_checkpoint("qwen2_moe")
    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps({"channels": {"1": {"2": [30, 4], "shared": [40]}}}))
    out = CliRunner().invoke(main, ["permute", str(base), "--plan", str(selection), "-o", str(tmp_path / "p"), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    layer = report["permutation"]["layers"]["1"]
    assert layer["experts"]["2"][:2] == [4, 30] and layer["experts"]["shared"][0] == 40 and layer["channels"] == []
    # expert 2's gate, up, down and the shared expert's three tensors; nothing else
    assert report["tensors_changed"] == 6
    with CheckpointSource(base) as before, CheckpointSource(tmp_path / "p") as after:
        w = "model.layers.1.mlp.experts.2.down_proj.weight"
        assert torch.equal(after.get(w)[:, 0], before.get(w)[:, 4])
        other = "model.layers.1.mlp.experts.1.down_proj.weight"
        assert torch.equal(after.get(other), before.get(other))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"channels": {"1": {"9": [1]}}}))
    refused = CliRunner().invoke(main, ["permute", str(base), "--plan", str(bad), "-o", str(tmp_path / "q")])
    assert refused.exit_code == 1 and "no expert '9'" in refused.output


def test_an_encoder_saved_without_its_prefix_is_really_permuted(zoo_checkpoint, tmp_path):
    base = zoo_checkpoint("bert_model")  # encoder.layer.{i}... as BertModel saves it (no "bert.")
    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps({"heads": {"0": [3]}, "channels": {"1": [7]}}))
    out = CliRunner().invoke(main, ["permute", str(base), "--plan", str(selection), "-o", str(tmp_path / "p")])
    assert out.exit_code == 0, out.output
    # layer 0: q, k, v + o weights; layer 1: up + down weights (the zoo's biases are zeros: moving them changes no byte)
    assert "permuted 2 layer(s), 6 tensor(s) changed (bert layout)" in " ".join(out.output.split())


def test_a_permutation_record_with_dense_channels_for_an_moe_layer_is_refused(zoo_checkpoint):
    from s2reg.ops.permute import Permutation

    with CheckpointSource(zoo_checkpoint("mixtral")) as source:
        info = resolve_source(source)
    heads, kv = list(range(info.dims.heads)), list(range(info.dims.kv_heads))
    record = {"layers": {"1": {"heads": heads, "kv_heads": kv, "channels": [1, 0]}}}
    with pytest.raises(ShapeError, match="no dense FFN to reorder"):
        Permutation.from_json(record).check(info)
    expert = list(range(info.channel_count(1, "2")))[::-1]
    ok = {"layers": {"1": {"heads": heads, "kv_heads": kv, "channels": [], "experts": {"2": expert}}}}
    assert Permutation.from_json(ok).check(info).layers[1].order_for("down", "2") == expert


def test_restore_lists_follow_a_permutation(tmp_path):
    """FORMAT §4.3 restore entries move with their slice elements: merging the permuted target into the permuted
    weight equals permuting the merged weight, bit for bit, also for a permutation that reverses the selection."""
    from s2reg.ops.permute import Permutation, permute_s2ft_target, permute_tensor

    from .helpers import signed_zero_changes

    base = tiny(tmp_path / "base", negative_zeros=0.05)
    with CheckpointSource(base) as source:
        info = resolve_source(source)
        dims = info.dims
        slices, _ = signed_zero_changes(source, layers=(0,))
        adapter = s2reg.S2FTAdapter.from_tuned(source, slices, base_name="tiny")
        reverse = Permutation({0: LayerPermutation(list(range(dims.heads))[::-1], list(range(dims.kv_heads))[::-1],
                                                   list(range(dims.intermediate))[::-1])})
        for name, target in adapter.targets.items():
            assert target.restore is not None
            moved = permute_s2ft_target(name, target, reverse, info)
            weight = source.get(name)
            ours = to_torch(moved.merged(permute_tensor(name, weight, reverse, info)))
            expected = permute_tensor(name, to_torch(target.merged(weight)), reverse, info)
            assert torch.equal(ours.view(torch.int16), expected.view(torch.int16)), name
            back = to_torch(moved.merged(ours, subtract=True))
            assert torch.equal(back.view(torch.int16), permute_tensor(name, weight, reverse, info).view(torch.int16))
