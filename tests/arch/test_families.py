"""Every built-in description against a tiny real model of its family (tests/families/zoo.py).

The layouts are checked against transformers' own forward pass: a random co-permutation of every
head, kv head and channel (per expert) computed from the description must leave the logits unchanged,
which fails for any wrong offset, interleaving, transposition or forgotten per-head norm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.arch import resolve_source
from s2reg.cli import main
from s2reg.ops.permute import permute_tensor
from s2reg.tensors import open_source, save_state_dict
from tests.families import zoo

from .helpers import random_permutation, selection_adapter

FAMILY_OF = {"bert_model": "bert"}


def cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def shas(directory):
    with open_source(directory) as source:
        return {n: source.sha256_of(n) for n in source.names()}


def logits(name, directory):
    with torch.no_grad():
        return zoo.outputs(zoo.load(name, directory), zoo.example_inputs(name))


def same_logits(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def expected_dims(species: zoo.Species) -> dict[str, int]:
    config = species.make_config()
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if species.model_type == "gpt_neox":  # its config carries num_key_value_heads, the model has no GQA
        kv = heads
    if species.model_type == "falcon":
        kv = config.num_kv_heads if config.new_decoder_architecture else 1 if config.multi_query else heads
    return {"layers": config.num_hidden_layers, "heads": heads, "kv_heads": kv, "hidden": config.hidden_size}


@pytest.mark.parametrize("name", zoo.NAMES)
def test_description_fits_the_tiny_model(name, zoo_checkpoint):
    species = zoo.SPECIES[name]
    directory = zoo_checkpoint(name)
    shapes = zoo.saved_tensors(directory)
    with open_source(directory) as source:
        info = resolve_source(source)
    assert info.family.name == FAMILY_OF.get(name, name) and info.note is None
    dims = info.dims
    assert {k: getattr(dims, k) for k in expected_dims(species)} == expected_dims(species)
    for layer in range(dims.layers):
        for role in info.roles:
            assert info.tensors(role, layer, None) or info.experts(layer) != [None], (layer, role)
    for tensor, shape in shapes.items():
        c = info.coupled(tensor)
        if c is None:
            continue
        counts = {r: info.unit_count(tensor, r) for r in c.roles}
        for expert in info.stacked_experts(tensor) or [None]:  # a stacked tensor: every expert's units, in its range
            index = np.concatenate([info.unit_indices(tensor, r, range(n), expert) for r, n in counts.items()])
            first = int(expert or 0) * shape[c.stored_dim]
            assert sorted(index.tolist()) == list(range(first, first + shape[c.stored_dim])), tensor
        for role, n in counts.items():
            if role in ("q", "o"):
                assert n == dims.heads
            elif role in ("k", "v"):
                assert n == dims.kv_heads


@pytest.mark.parametrize("name", zoo.NAMES)
def test_a_random_co_permutation_from_the_description_keeps_logits(name, zoo_checkpoint, tmp_path):
    directory = zoo_checkpoint(name)
    g = torch.Generator().manual_seed(len(name))
    with open_source(directory) as source:
        info = resolve_source(source)
        original = {n: source.get(n) for n in source.names()}
    coupled = {n for n in original if info.coupled(n) is not None}
    # biases, norms and sinks start as zeros/ones: make them distinct per unit, or a per-head norm that the
    # description forgot would not show in the logits
    def follower(n: str) -> bool:  # gpt-oss gate_up_proj_bias is [experts, 2 * intermediate]
        return info.coupled(n) is not None and info.coupled(n).follower

    base = {n: (t + 0.1 * torch.randn(t.shape, generator=g) if (t.dim() == 1 or follower(n)) and t.is_floating_point()
                else t) for n, t in original.items()}
    perm = random_permutation(info, seed=len(name))
    permuted = {n: permute_tensor(n, t, perm, info) for n, t in base.items()}
    assert {n for n in base if not torch.equal(permuted[n], base[n])} == coupled
    metadata = {"model.safetensors": {"format": "pt"}}
    save_state_dict(tmp_path / "base", base, side_files_from=directory, metadata=metadata)
    save_state_dict(tmp_path / "permuted", permuted, side_files_from=directory, metadata=metadata)
    same_logits(logits(name, tmp_path / "permuted"), logits(name, tmp_path / "base"))


@pytest.mark.parametrize("name", zoo.NAMES)
def test_permute_merge_and_detect_permutation_on_every_family(name, zoo_checkpoint, tmp_path):
    base = zoo_checkpoint(name)
    adapter = selection_adapter(base, heads=(2,), layers=[1])
    adapter.save(tmp_path / "adapter")
    report = cli("permute", base, "--plan", tmp_path / "adapter", "-o", tmp_path / "permuted", "--json")
    assert '"tensors_changed": 0' not in report
    same_logits(logits(name, tmp_path / "permuted"), logits(name, base))
    cli("unpermute", tmp_path / "permuted", "-o", tmp_path / "back")
    assert shas(tmp_path / "back") == shas(base)
    cli("merge", base, tmp_path / "adapter", "-o", tmp_path / "merged")
    cli("merge", tmp_path / "permuted", tmp_path / "adapter", "-o", tmp_path / "permuted-merged")
    same_logits(logits(name, tmp_path / "permuted-merged"), logits(name, tmp_path / "merged"))
    # the official S2FT code leaves a co-permuted checkpoint without any record of the order
    (tmp_path / "permuted-merged" / "s2reg-permutation.json").unlink()
    (tmp_path / "permuted-merged" / "s2reg-merges.json").unlink(missing_ok=True)
    cli("extract", base, tmp_path / "permuted-merged", "--detect-permutation", "-o", tmp_path / "extracted")
    cli("merge", base, tmp_path / "extracted", "-o", tmp_path / "remerged")
    assert shas(tmp_path / "remerged") == shas(tmp_path / "merged")
    assert set(s2reg.load(tmp_path / "extracted").targets) == set(adapter.targets)


def test_cohere_qk_norms_of_shape_heads_by_head_dim_move_with_their_heads():
    """Cohere with use_qk_norm keeps a [heads, head_dim] norm per projection: row h belongs to head h."""
    import transformers

    from s2reg.arch import resolve

    config = transformers.AutoConfig.for_model("cohere", **{**zoo.SPECIES["cohere"].config, "use_qk_norm": True})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    state = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if "norm" in k else v.clone())
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    info = resolve(config.to_dict(), {k: tuple(v.shape) for k, v in state.items()})
    assert info.coupled("model.layers.0.self_attn.q_norm.weight").follower
    perm = random_permutation(info, seed=3)
    ids = zoo.example_inputs("cohere")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.load_state_dict({k: permute_tensor(k, v, perm, info) for k, v in state.items()})
        same_logits(model(input_ids=ids).logits, before)
