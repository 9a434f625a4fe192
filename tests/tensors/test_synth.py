"""The synthetic fixture checkpoints: deterministic, streamed, and loadable by transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

from s2reg.arch import resolve_source
from s2reg.format.digest import sha256_file
from s2reg.synth import build_checkpoint
from s2reg.tensors import CheckpointSource


def digests(path):
    return {p.name: sha256_file(p) for p in sorted(path.iterdir())}


def test_same_arguments_same_bytes(tmp_path):
    a = build_checkpoint(tmp_path / "a", "llama", seed=3, dtype=torch.bfloat16, max_shard_bytes=20_000)
    b = build_checkpoint(tmp_path / "b", "llama", seed=3, dtype=torch.bfloat16, max_shard_bytes=20_000)
    c = build_checkpoint(tmp_path / "c", "llama", seed=4, dtype=torch.bfloat16, max_shard_bytes=20_000)
    assert digests(a) == digests(b)
    assert digests(a) != digests(c)
    assert len(list(a.glob("*.safetensors"))) > 1


@pytest.mark.parametrize(
    ("family", "model_class"),
    [("llama", transformers.LlamaForCausalLM), ("bert", transformers.BertForMaskedLM)],
)
def test_transformers_loads_every_tensor(tmp_path, family, model_class):
    path = build_checkpoint(tmp_path / family, family, dtype=torch.float32, num_hidden_layers=3)
    model, info = model_class.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    with CheckpointSource(path) as source:
        detected = resolve_source(source)
        assert detected.family.name == family and detected.dims.layers == 3
        for name in source.names():
            assert torch.equal(state[name], source.get(name)), name
        assert source.shape(detected.tensors("q", 2)[0]) == (detected.dims.heads * detected.dims.head_dim, detected.dims.hidden)


def test_llama_fixture_has_grouped_query_attention(tmp_path):
    with CheckpointSource(build_checkpoint(tmp_path / "m", "llama")) as source:
        info = resolve_source(source)
        dims = info.dims
        assert dims.kv_heads < dims.heads
        assert source.shape(info.tensors("k", 0)[0])[0] == dims.kv_heads * dims.head_dim
