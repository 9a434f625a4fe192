"""S2FT on every kind of stored layout: separate projections with GQA and biases (qwen2), fused
``qkv_proj``/``gate_up_proj`` (phi3), per-head interleaved ``query_key_value`` (gpt_neox), GPT-2's
transposed ``Conv1D``, MoE experts that transformers fuses into 3-D parameters (mixtral, qwen2_moe),
and encoders saved with and without the ``bert.`` prefix.

References are independent of the code under test: float64 full autograd of an untouched copy of the
model (restricted to the trained slices through transformers' own reverse conversion, i.e. the
coordinates ``save_pretrained`` writes), and transformers loading the merged checkpoint.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import s2reg
from s2reg.errors import S2RegError
from s2reg.tensors import CheckpointSource
from s2reg.train import PISAConfig, S2FTConfig, export_adapter, prepare_pisa, prepare_s2ft
from s2reg.arch.layout import placements
from s2reg.train.targets import map_model

from ..families import zoo
from .helpers import trained_zoo_adapter, zoo_base, zoo_loss

LAYOUTS = ["qwen2", "phi3", "gpt_neox", "gpt2", "mixtral", "qwen2_moe", "bert", "bert_model", "vit"]


def _slice_of_full_gradient(reference: torch.nn.Module, trained) -> torch.Tensor:
    """The reference model's full gradient at a trained slice, in checkpoint coordinates."""
    full = dict(reference.named_parameters())[trained.placement.parameter].grad
    positions = trained.placement.slice_positions(trained.axis, trained.indices).reshape(-1)
    return full.reshape(-1)[positions].reshape(trained.shape)


def _trained_gradient(model: torch.nn.Module, trained) -> torch.Tensor:
    grad = model.get_parameter(trained.parameter).grad
    if trained.offset is None:
        return grad
    count = int(torch.Size(trained.shape).numel())
    return grad[trained.offset:trained.offset + count].reshape(trained.shape)


@pytest.mark.parametrize("name", LAYOUTS)
def test_slice_gradients_equal_float64_autograd_restricted_to_the_slices(name):
    species = zoo.SPECIES[name]
    model = zoo.build_model(species).double()
    if any(n.endswith(".experts") for n, _ in model.named_modules()):
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    reference = copy.deepcopy(model)
    roles = map_model(model).info.roles
    prepared = prepare_s2ft(model, S2FTConfig(heads=2, channels=3, roles=roles, seed=1))
    assert {r for s in prepared.slices.values() for r in s.roles} == set(roles)  # every role of the family trains
    for p in reference.parameters():
        p.requires_grad_(True)
    inputs = zoo.example_inputs(species)
    zoo_loss(reference, inputs).backward()
    zoo_loss(model, inputs).backward()
    assert len(prepared.slices) >= len(roles) * model.config.num_hidden_layers // 3
    for trained in prepared.slices.values():
        expected = _slice_of_full_gradient(reference, trained)
        assert float(expected.abs().max()) > 0, trained.name
        torch.testing.assert_close(_trained_gradient(model, trained), expected, rtol=1e-10, atol=1e-13)
    frozen = [n for n, p in model.named_parameters() if p.grad is not None and n not in prepared.parameters]
    assert frozen == []


def _checkpoint_names(directory) -> set[str]:
    names = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            names.update(handle.keys())
    return names


@pytest.mark.parametrize("name", LAYOUTS)
def test_export_names_checkpoint_tensors_and_the_merge_reproduces_the_trained_model(tmp_path, name):
    species = zoo.SPECIES[name]
    base = zoo_base(name, tmp_path / "base")
    adapter, model = trained_zoo_adapter(name, base)
    inputs = zoo.example_inputs(species, seed=9)
    with torch.no_grad():
        trained = zoo.outputs(model, inputs)
    assert set(adapter.targets) <= _checkpoint_names(base)  # per-expert names, the checkpoint's own prefix
    assert all(float(abs(t.delta).max()) > 0 for t in adapter.targets.values())
    s2reg.merge(base, [adapter], tmp_path / "merged")
    merged = zoo.load(species, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(zoo.outputs(merged, inputs), trained, rtol=1e-5, atol=1e-6)
        assert not torch.equal(zoo.outputs(zoo.load(species, base), inputs), trained)


def test_moe_placements_match_what_save_pretrained_writes(tmp_path):
    species = zoo.SPECIES["mixtral"]
    base = zoo.build(species, tmp_path / "base")
    model = zoo.load(species, base)
    found = placements(model)
    with CheckpointSource(base) as source:
        assert set(found) == set(source.names())
        for name, placement in found.items():
            assert torch.equal(placement.stored_value(model), source.get(name)), name
    fused = {p.parameter for n, p in found.items() if ".experts." in n}
    assert fused == {f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")}


def test_roles_a_family_lacks_are_refused_in_one_line():
    bert = zoo.build_model(zoo.SPECIES["bert"])
    with pytest.raises(S2RegError, match="no 'gate' projection") as info:
        prepare_s2ft(bert, S2FTConfig(channels=2, roles=("up", "gate")))
    assert "\n" not in str(info.value)
    deepseek = zoo.build_model(zoo.SPECIES["deepseek_v3"])
    with pytest.raises(S2RegError, match="no 'o' projection") as info:
        prepare_s2ft(deepseek, S2FTConfig(heads=1, channels=2))
    assert "\n" not in str(info.value)
    prepared = prepare_s2ft(deepseek, S2FTConfig(heads=0, channels=2, roles=("up", "gate", "down")))
    assert {r for s in prepared.slices.values() for r in s.roles} == {"up", "gate", "down"}
    assert any(".experts." in n for n in prepared.slices) and any(".shared_experts." in n for n in prepared.slices)


def test_gpt_oss_trains_channels_of_every_expert_in_its_stacked_down_proj():
    """gpt-oss keeps its experts stacked in memory as on disk: one trained slice per stacked tensor, on an expert
    axis (FORMAT §4.5), covering the selected channels of every expert."""
    gpt_oss = zoo.build_model(zoo.SPECIES["gpt_oss"])
    prepared = prepare_s2ft(gpt_oss, S2FTConfig(heads=1, channels=2, layers=[0]))
    down = prepared.slices["model.layers.0.mlp.experts.down_proj"]
    assert {r for s in prepared.slices.values() for r in s.roles} == {"o", "down"}
    assert down.axis == "expert_rows" and down.shape == (8, 64)  # 2 channels x 4 experts, hidden 64
    intermediate = gpt_oss.config.intermediate_size
    chosen = prepared.selection[0]["channels"]
    assert down.indices.tolist() == sorted(int(e) * intermediate + k for e, ks in chosen.items() for k in ks)


@pytest.mark.parametrize(("name", "targets", "modules"), [
    ("llama", ("q_proj", "v_proj"), 4),
    ("llama", ("model.layers.1.self_attn.q_proj", "mlp.down_proj"), 3),
    ("gpt2", ("c_attn",), 2),
    ("vit", ("q_proj", "v_proj"), 4),  # transformers renames ViT in memory; the adapter keeps the checkpoint's names
])
def test_pisa_targets_take_short_or_full_module_names_and_merge_exactly(tmp_path, name, targets, modules):
    species = zoo.SPECIES[name]
    base = zoo.build(species, tmp_path / "base")
    model = zoo.load(species, base)
    prepared = prepare_pisa(model, PISAConfig(block=16, coefficients=3, targets=targets))
    assert len(prepared.parameters) == modules
    with torch.no_grad():
        for p in prepared.parameters.values():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    inputs = zoo.example_inputs(species)
    with torch.no_grad():
        trained = zoo.outputs(model, inputs)
    with CheckpointSource(base) as source:
        adapter = export_adapter(model, base=source)
    s2reg.merge(base, [adapter], tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(zoo.outputs(zoo.load(species, tmp_path / "merged"), inputs), trained,
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(S2RegError, match="no linear module named 'nope_proj'"):
        prepare_pisa(zoo.load(species, base), PISAConfig(targets=("nope_proj",)))


def test_weight_strategy_scores_units_on_the_stored_tensors(tmp_path):
    """S2FT-W on a transposed layout (GPT-2: a head is ``head_dim`` stored ROWS of ``attn.c_proj``) and on
    per-expert MoE channels (Mixtral: channel c of expert e is column c of ``experts.{e}.w2``), against norms
    read straight from the saved checkpoint."""
    for name, heads in (("gpt2", 2), ("mixtral", 0)):
        base = zoo.build(name, tmp_path / name)
        model = zoo.load(name, base)
        prepared = prepare_s2ft(model, S2FTConfig(heads=heads, channels=3, strategy="weight", layers=[1]))
        with CheckpointSource(base) as source:
            if name == "gpt2":
                hd = model.config.n_embd // model.config.n_head
                c_proj = source.get("transformer.h.1.attn.c_proj.weight")
                norms = c_proj.reshape(model.config.n_head, hd, -1).double().pow(2).sum((1, 2))
                assert prepared.selection[1]["heads"] == sorted(norms.argsort(descending=True)[:heads].tolist())
                c_proj = source.get("transformer.h.1.mlp.c_proj.weight").double()
                expected = sorted(c_proj.pow(2).sum(1).argsort(descending=True)[:3].tolist())
                assert prepared.selection[1]["channels"] == expected
            else:
                for expert, chosen in prepared.selection[1]["channels"].items():
                    w2 = source.get(f"model.layers.1.block_sparse_moe.experts.{expert}.w2.weight").double()
                    assert chosen == sorted(w2.pow(2).sum(0).argsort(descending=True)[:3].tolist())
                assert sorted(prepared.selection[1]["channels"]) == [str(e) for e in range(model.config.num_local_experts)]
        if name == "mixtral":
            with pytest.raises(S2RegError, match="activation strategy needs .* linear layer of its own"):
                prepare_s2ft(zoo.load(name, base), S2FTConfig(channels=3, strategy="activation"), calibration=[])


@pytest.mark.parametrize("name", ["mixtral", "gpt2"])
def test_train_cli_on_moe_and_conv1d_checkpoints_writes_checkpoint_names(tmp_path, name):
    from click.testing import CliRunner

    from s2reg.cli import main

    base = zoo_base(name, tmp_path / "base")
    rows = torch.randint(3, zoo.VOCAB - 3, (16, zoo.SEQ), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in rows))
    result = CliRunner().invoke(main, ["train", "--base", str(base), "--data", str(tmp_path / "data.jsonl"), "--method",
                                       "s2ft", "--heads", "1", "--channels", "2", "--roles", "q,v,o,up,down",
                                       "--max-steps", "2", "--lr", "0.05", "-o", str(tmp_path / "adapter"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["objective"] == {"kind": "causal-lm"}
    adapter = s2reg.load(tmp_path / "adapter")
    assert set(adapter.targets) <= _checkpoint_names(base)
    if name == "mixtral":  # every expert of every layer trains its own channels, in per-expert tensors
        experts = {n.split(".experts.")[1].split(".")[0] for n in adapter.targets if ".experts." in n}
        assert experts == {str(e) for e in range(zoo.SPECIES[name].make_config().num_local_experts)}
    s2reg.merge(base, [adapter], tmp_path / "merged")
    assert not torch.equal(zoo.outputs(zoo.load(name, tmp_path / "merged"), zoo.example_inputs(name)),
                           zoo.outputs(zoo.load(name, base), zoo.example_inputs(name)))


@pytest.mark.parametrize("name", ["mixtral", "phi3", "gpt2"])
def test_exclude_keeps_heads_and_per_expert_channels_disjoint(tmp_path, name):
    base = zoo_base(name, tmp_path / "base")
    # no k/v: a trained key/value head takes its whole GQA group of query heads
    first, _ = trained_zoo_adapter(name, base, heads=2, channels=3, seed=5, roles=("q", "o", "up", "down"))
    taken = first.params["selection"]
    prepared = prepare_s2ft(zoo.load(name, base), S2FTConfig(heads=2, channels=3, seed=5, exclude=[first]))
    for layer, chosen in prepared.selection.items():
        before = taken[str(layer)]
        assert not set(chosen["heads"]) & set(before["heads"])
        if isinstance(chosen["channels"], dict):
            assert chosen["channels"].keys() == before["channels"].keys()
            for expert, channels in chosen["channels"].items():
                assert not set(channels) & set(before["channels"][expert]), (layer, expert)
        else:
            assert not set(chosen["channels"]) & set(before["channels"])


@pytest.mark.parametrize(("name", "expected"), [
    ("llama", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"}),
    ("gpt2", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),  # fused q/k/v: the whole c_attn
    ("gpt_oss", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}),  # experts are 3-D
    # MLA attention has no roles (no head-aligned projections): --targets names it; layer 0 is a dense FFN
    ("deepseek_v3", {"mlp.up_proj", "mlp.gate_proj", "mlp.down_proj",
                     "mlp.shared_experts.up_proj", "mlp.shared_experts.gate_proj", "mlp.shared_experts.down_proj"}),
])
def test_pisa_trains_every_projection_that_is_a_matmul_layer_by_default(name, expected):
    """PISA's default targets (docs/training.md): every role's module that is a 2-D matmul layer of its own."""
    model = zoo.build_model(zoo.SPECIES[name])
    prepared = prepare_pisa(model, PISAConfig(block=16, coefficients=3))
    modules = {n.removesuffix(".pisa_coefficients") for n in prepared.parameters}
    layers = model.config.num_hidden_layers
    assert {m.split(".", 3)[-1] for m in modules} == expected
    assert len({m.split(".")[2] for m in modules}) == layers


def test_pisa_refuses_a_named_role_that_is_not_a_matmul_layer():
    with pytest.raises(S2RegError, match="not a matmul layer of its own"):
        prepare_pisa(zoo.build_model(zoo.SPECIES["gpt_oss"]), PISAConfig(block=16, coefficients=3, roles=("down",)))
