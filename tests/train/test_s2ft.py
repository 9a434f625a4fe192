"""S2FT training: partial back-propagation against full autograd, exactness, export, selection."""

from __future__ import annotations

import copy

import pytest
import torch

import s2reg
from s2reg.errors import S2RegError
from s2reg.train import S2FTConfig, export_adapter, prepare_s2ft
from s2reg.train.select import choose

from .helpers import batch, tiny_model

ALL_ROLES = ("q", "k", "v", "o", "up", "gate", "down")


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_slice_gradients_equal_full_autograd_restricted_to_the_slice(tmp_path, family, micro_batches):
    model, _ = tiny_model(tmp_path / "m", family)
    reference = copy.deepcopy(model)
    roles = ALL_ROLES if family == "llama" else tuple(r for r in ALL_ROLES if r != "gate")  # BERT has no gate
    prepared = prepare_s2ft(model, S2FTConfig(channels=5, heads=1, roles=roles, seed=3))
    for p in reference.parameters():
        p.requires_grad_(True)
    data = batch(model, size=4)
    for part in torch.chunk(torch.arange(4), micro_batches):
        sub = {k: v[part] for k, v in data.items()}
        (model(**sub).loss / micro_batches).backward()
    reference(**data).loss.backward()
    modules = dict(reference.named_modules())
    checked = 0
    for name, param in prepared.parameters.items():
        module_name = name.removesuffix(".s2ft_slice")
        ours = dict(model.named_modules())[module_name]
        full = modules[module_name].weight.grad
        expected = full.index_select(0 if ours.s2ft_axis == "rows" else 1, ours.s2ft_indices)
        torch.testing.assert_close(param.grad.double(), expected, rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked == len(roles) * model.config.num_hidden_layers
    assert all(p.grad is None for n, p in model.named_parameters() if "s2ft_slice" not in n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_training_changes_nothing_outside_the_slices_and_export_reproduces_the_model(tmp_path, dtype):
    model, base_dir = tiny_model(tmp_path / "m", dtype=dtype)
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    prepared = prepare_s2ft(model, S2FTConfig(channels=6, heads=1, roles=("q", "o", "down"), seed=1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(5):
        model(**batch(model, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = model(**batch(model, seed=99)).logits.detach()
    # the frozen weights never change (the forward puts the slice in a copy: FSDP-safe); every slice moved
    # (the parameters themselves: state_dict() reports the trained weights, tests/train/test_ways_out.py)
    for name, tensor in before.items():  # (the wrapped layers' weights, read by their own names)
        assert torch.equal(model.get_parameter(name).detach().view(torch.uint8), tensor.view(torch.uint8)), name
    originals = {n: m.s2ft_original for n, m in model.named_modules() if hasattr(m, "s2ft_slice")}
    moved = [n for n, o in originals.items() if not torch.equal(o, dict(model.named_modules())[n].s2ft_slice.detach().to(o.dtype))]
    assert len(moved) == len(prepared.parameters)
    adapter = export_adapter(model, training={"steps": 5})
    adapter.save(tmp_path / "adapter")
    loaded = s2reg.load(tmp_path / "adapter")
    assert loaded.provenance["training"] == {"steps": 5}
    assert all(float(abs(t.delta).max()) > 0 for t in loaded.targets.values())
    fresh, _ = tiny_model(tmp_path / "fresh", dtype=dtype)
    with s2reg.applied(fresh, loaded):
        assert torch.equal(fresh(**batch(fresh, seed=99)).logits, trained)
    s2reg.merge(base_dir, [loaded], tmp_path / "merged")
    merged = type(model).from_pretrained(tmp_path / "merged", dtype=dtype)
    assert torch.equal(merged(**batch(merged, seed=99)).logits, trained)


def _with_column_norms(model, norms):
    down = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        down.copy_(down / down.norm(dim=0, keepdim=True) * torch.tensor(norms, dtype=down.dtype))


def test_weight_strategy_picks_the_documented_extremes_and_respects_exclude(tmp_path):
    model, _ = tiny_model(tmp_path / "m", dtype=torch.float32, num_hidden_layers=1)
    norms = torch.linspace(1, 2, model.config.intermediate_size).flip(0).tolist()  # channel 0 is largest
    _with_column_norms(model, norms)
    largest = prepare_s2ft(copy.deepcopy(model), S2FTConfig(channels=4, strategy="weight"))
    assert largest.selection[0]["channels"] == [0, 1, 2, 3]
    smallest = prepare_s2ft(copy.deepcopy(model), S2FTConfig(channels=4, strategy="weight", order="smallest"))
    n = model.config.intermediate_size
    assert smallest.selection[0]["channels"] == [n - 4, n - 3, n - 2, n - 1]
    first = export_adapter(_trained_copy(model, largest))
    disjoint = prepare_s2ft(copy.deepcopy(model), S2FTConfig(channels=4, strategy="weight", exclude=[first]))
    assert disjoint.selection[0]["channels"] == [4, 5, 6, 7]


def _trained_copy(model, prepared):
    clone = copy.deepcopy(model)
    prepare_s2ft(clone, prepared.config)
    with torch.no_grad():
        for p in clone.parameters():
            if p.requires_grad:
                p.add_(0.5)
    return clone


def test_activation_strategies_follow_the_calibration_inputs(tmp_path):
    model, _ = tiny_model(tmp_path / "m", num_hidden_layers=1)
    up = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        up[7] *= 50  # channel 7 carries by far the largest activations
        up[9] *= 0  # channel 9 carries none
    calibration = [batch(model, seed=s) for s in range(2)]
    for strategy in ("activation", "weight_activation", "gradient"):
        top = prepare_s2ft(copy.deepcopy(model), S2FTConfig(channels=1, strategy=strategy), calibration=calibration)
        assert top.selection[0]["channels"] == [7], strategy
    low = prepare_s2ft(copy.deepcopy(model), S2FTConfig(channels=1, strategy="activation", order="smallest"),
                       calibration=calibration)
    assert low.selection[0]["channels"] == [9]
    with pytest.raises(S2RegError, match="calibration data"):
        prepare_s2ft(copy.deepcopy(model), S2FTConfig(channels=1, strategy="activation"))
    for strategy in ("activation", "gradient"):  # data given, but no batch in it: one line, not a crash
        with pytest.raises(S2RegError, match=f"the {strategy} strategy saw no calibration batch reach .*down_proj"):
            prepare_s2ft(copy.deepcopy(model), S2FTConfig(channels=1, strategy=strategy), calibration=[])


def test_random_selection_is_seeded_and_counts_are_exact(tmp_path):
    model, _ = tiny_model(tmp_path / "m")
    a = prepare_s2ft(copy.deepcopy(model), S2FTConfig(channels=7, heads=2, seed=5))
    b = prepare_s2ft(copy.deepcopy(model), S2FTConfig(channels=7, heads=2, seed=5))
    assert a.selection == b.selection
    assert all(len(s["channels"]) == 7 and len(s["heads"]) == 2 for s in a.selection.values())
    g = torch.Generator().manual_seed(0)
    assert choose(3, 10, scores=None, order="largest", excluded={0, 1, 2, 3, 4, 5, 6}, generator=g) == [7, 8, 9]
    with pytest.raises(S2RegError, match="only 2 of 10 are free"):
        choose(3, 10, scores=None, order="largest", excluded=set(range(8)), generator=g)


def test_gqa_heads_train_their_kv_group(tmp_path):
    model, _ = tiny_model(tmp_path / "m", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    prepared = prepare_s2ft(model, S2FTConfig(channels=0, heads=1, roles=("q", "k", "o"), seed=0))
    head = prepared.selection[0]["heads"][0]
    k = model.model.layers[0].self_attn.k_proj
    assert k.s2ft_indices.tolist() == list(range((head // 2) * 16, (head // 2 + 1) * 16))


def test_unknown_architecture_names_the_targets_option(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(S2RegError, match="--targets"):
        prepare_s2ft(model)


def test_training_on_a_permuted_checkpoint_exports_original_coordinates(tmp_path):
    """Train where the selection is contiguous (s2reg permute), store the adapter in original order."""
    import transformers

    from s2reg.surgery import merge, permute_checkpoint, unpermute_checkpoint
    from s2reg.synth import build_checkpoint
    from s2reg.tensors import CheckpointSource

    base = build_checkpoint(tmp_path / "base", "llama", dtype=torch.float32)
    selection = {"heads": {"0": [3], "1": [1]}, "channels": {"0": [5, 60], "1": [7, 90]}}
    permute_checkpoint(base, selection, tmp_path / "permuted")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "permuted")
    prepare_s2ft(model, S2FTConfig(channels=2, heads=1, roles=("q", "o", "down"), seed=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model(**batch(model, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = model(**batch(model, seed=7)).logits.detach()
    with CheckpointSource(tmp_path / "permuted") as source:
        adapter = export_adapter(model, base=source)
    assert "trained_in_permuted_coordinates" in adapter.params
    merge(base, [adapter], tmp_path / "merged")  # original coordinates, original fingerprints
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(**batch(merged, seed=7)).logits, trained, rtol=1e-5, atol=1e-5)
    merge(tmp_path / "permuted", [adapter], tmp_path / "merged-permuted")  # and back onto the permuted layout
    unpermute_checkpoint(tmp_path / "merged-permuted", tmp_path / "merged-back")
    with CheckpointSource(tmp_path / "merged") as a, CheckpointSource(tmp_path / "merged-back") as b:
        assert all(a.sha256_of(n) == b.sha256_of(n) for n in a.names())


@pytest.mark.parametrize("strategy,roles", [("random", "o,down"), ("weight", "q,k,v,o,up,gate,down")])
def test_cli_train_on_a_base_with_negative_zeros_merges_and_unmerges_exactly(tmp_path, strategy, roles):
    """The issue's Gemma case in small: -0.0 in the trained slices (FORMAT §4.3 restore lists)."""
    import json

    from click.testing import CliRunner

    from s2reg.cli import main
    from s2reg.synth import build_checkpoint
    from s2reg.tensors import CheckpointSource

    from ..surgery.helpers import logits, model_of

    base = build_checkpoint(tmp_path / "base", "llama", dtype=torch.bfloat16, negative_zeros=0.05)
    data = tmp_path / "data.jsonl"
    g = torch.Generator().manual_seed(0)
    data.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in torch.randint(3, 250, (16, 12), generator=g).tolist()))

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    trained = run("train", "--base", base, "--data", data, "--method", "s2ft", "--strategy", strategy, "--roles", roles,
                  "--channels", 8, "--heads", 1, "--max-steps", 3, "--batch-size", 4, "--lr", 1e-2,
                  "-o", tmp_path / "a")
    assert trained.exit_code == 0, trained.output
    adapter = s2reg.load(tmp_path / "a")
    assert any(t.restore is not None for t in adapter.targets.values())
    assert run("merge", base, tmp_path / "a", "-o", tmp_path / "m").exit_code == 0
    reference = model_of(base)
    s2reg.apply(reference, adapter)
    assert torch.equal(logits(model_of(tmp_path / "m")), logits(reference))
    assert run("unmerge", tmp_path / "m", tmp_path / "a", "-o", tmp_path / "b").exit_code == 0
    with CheckpointSource(base) as a, CheckpointSource(tmp_path / "b") as b:
        assert {n: b.sha256_of(n) for n in b.names()} == {n: a.sha256_of(n) for n in a.names()}


def _saved_bytes(model, data) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for the backward during the forward, and the loss."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**data).loss
    return total, loss


def test_gradient_checkpointing_keeps_the_slice_gradients_and_saves_less(tmp_path):
    """transformers' activation checkpointing over partial back-propagation: the recomputed forward puts
    the same slices in, so the slice gradients equal full autograd's (float64), with less kept for the backward."""
    model, _ = tiny_model(tmp_path / "m", num_hidden_layers=3)
    reference = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    config = S2FTConfig(channels=5, heads=1, roles=ALL_ROLES, seed=3)
    prepared = prepare_s2ft(model, config)
    prepare_s2ft(plain, config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(), plain.train(), reference.train()
    for p in reference.parameters():
        p.requires_grad_(True)
    data = batch(model, size=4, length=16)
    checkpointed, loss = _saved_bytes(model, data)
    loss.backward()
    kept, plain_loss = _saved_bytes(plain, data)
    assert checkpointed < kept / 2
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    reference(**data).loss.backward()
    modules = dict(reference.named_modules())
    for name, param in prepared.parameters.items():
        module_name = name.removesuffix(".s2ft_slice")
        ours = dict(model.named_modules())[module_name]
        expected = modules[module_name].weight.grad.index_select(0 if ours.s2ft_axis == "rows" else 1, ours.s2ft_indices)
        torch.testing.assert_close(param.grad.double(), expected, rtol=1e-9, atol=1e-12, msg=name)
