"""The real SmolLM2-135M fixture: a valid sharded bf16 HF checkpoint, faithful to its GGUF source,
built once under a lock and rebuilt when damaged.

References are independent of the builder: the GGUF's own metadata and the ``gguf`` package's
dequantiser for dims and weights, transformers' in-memory GGUF model for logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures import smollm2
from s2reg.arch import resolve
from s2reg.format import dtypes
from s2reg.format.digest import sha256_file
from s2reg.tensors import CheckpointSource, save_state_dict

pytestmark = pytest.mark.smollm2

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gguf():
    from gguf import GGUFReader

    reader = GGUFReader(smollm2.gguf_path())
    fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith("llama.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def reloaded(smollm2_dir):
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16, output_loading_info=True)
    return model.eval(), info


def test_shards_and_index_are_consistent(smollm2_dir, gguf):
    index = json.loads((smollm2_dir / "model.safetensors.index.json").read_text())
    record = smollm2.read_record(smollm2_dir)
    with CheckpointSource(smollm2_dir) as source:  # checks the index against every shard header
        assert len(source.files) > 1
        assert set(index["weight_map"]) == set(source.names())
        nbytes = {n: source.dtype(n).itemsize * torch.Size(source.shape(n)).numel() for n in source.names()}
        assert index["metadata"]["total_size"] == sum(nbytes.values())
        for file, names in source.shard_names().items():
            assert sum(nbytes[n] for n in names) <= record["max_shard_bytes"]
            assert source.metadata(file).get("format") == "pt"
        _, tensors = gguf
        assert len(source.names()) == len(tensors)  # one HF tensor per GGUF tensor: nothing lost or added


def test_config_has_the_gguf_dims_and_gqa(smollm2_dir, gguf):
    fields, _ = gguf
    with CheckpointSource(smollm2_dir) as source:
        config = source.config()
        info = resolve(config, {n: source.shape(n) for n in source.names()})
        assert info.family.name == "llama" and config["model_type"] == "llama" and info.note is None
        dims = info.dims
        assert dims.layers == fields["llama.block_count"]
        assert dims.heads == fields["llama.attention.head_count"]
        assert dims.kv_heads == fields["llama.attention.head_count_kv"] < dims.heads
        assert dims.hidden == fields["llama.embedding_length"]
        assert dims.intermediate == fields["llama.feed_forward_length"]
        assert dims.head_dim == fields["llama.rope.dimension_count"] == dims.hidden // dims.heads
        assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == fields["llama.rope.freq_base"]
        assert config["vocab_size"] == fields["llama.vocab_size"]
        for layer in range(dims.layers):
            assert source.shape(info.tensors("q", layer)[0]) == (dims.heads * dims.head_dim, dims.hidden)
            assert source.shape(info.tensors("k", layer)[0]) == (dims.kv_heads * dims.head_dim, dims.hidden)
            assert source.shape(info.tensors("v", layer)[0]) == (dims.kv_heads * dims.head_dim, dims.hidden)
            assert source.shape(info.tensors("down", layer)[0]) == (dims.hidden, dims.intermediate)


def test_every_tensor_is_bf16_and_embeddings_are_tied(smollm2_dir, gguf):
    _, tensors = gguf
    with CheckpointSource(smollm2_dir) as source:
        assert {dtypes.name_of(source.dtype(n)) for n in source.names()} == {"BF16"}
        # The GGUF has no separate output matrix, so lm_head is the embedding and is not stored.
        assert "output.weight" not in tensors
        assert source.config()["tie_word_embeddings"] is True
        assert "lm_head.weight" not in source.names()


def test_weights_equal_the_gguf_dequantised_independently(smollm2_dir, gguf):
    """Unpermuted tensors of each GGUF encoding (Q8_0, Q4_1, F32) against gguf's own dequantiser."""
    from gguf.quants import dequantize

    _, tensors = gguf
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight",
             "blk.7.attn_v.weight": "model.layers.7.self_attn.v_proj.weight", "blk.7.attn_norm.weight": "model.layers.7.input_layernorm.weight",
             "output_norm.weight": "model.norm.weight"}
    assert {tensors[g].tensor_type.name for g in pairs} == {"Q8_0", "Q4_1", "F32"}
    with CheckpointSource(smollm2_dir) as source:
        for gguf_name, hf_name in pairs.items():
            t = tensors[gguf_name]
            expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(source.shape(hf_name))
            assert torch.equal(source.get(hf_name), expected.to(torch.bfloat16)), hf_name


def test_loads_with_llama_without_missing_keys_and_shares_lm_head(reloaded):
    model, info = reloaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_logits_equal_the_in_memory_dequantised_model_and_text_is_sensible(smollm2_dir, reloaded):
    from transformers import AutoTokenizer

    model, _ = reloaded
    reference, gguf_tokenizer = smollm2.dequantised_model(dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer(PROMPT, return_tensors="pt")
    assert torch.equal(ids["input_ids"], gguf_tokenizer(PROMPT, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        got, want = model(**ids).logits, reference(**ids).logits
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.equal(got, want)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_fixture_record_matches_the_files(smollm2_dir):
    record = smollm2.read_record(smollm2_dir)
    source = smollm2.gguf_path()
    assert record["fixture"] == smollm2.VERSION and record["dtype"] == "bfloat16"
    assert record["source"]["gguf"] == source.name
    assert record["source"]["gguf_bytes"] == source.stat().st_size
    assert record["source"]["gguf_sha256"] == sha256_file(source)
    on_disk = {p.name for p in smollm2_dir.iterdir()} - {smollm2.RECORD_NAME}
    assert set(record["files"]) == on_disk
    for name, entry in record["files"].items():
        assert (smollm2_dir / name).stat().st_size == entry["bytes"]
        assert sha256_file(smollm2_dir / name) == entry["sha256"], name
    assert record["total_bytes"] == sum(e["bytes"] for e in record["files"].values())
    assert smollm2.is_complete(smollm2_dir, source)
    before = (smollm2_dir / smollm2.RECORD_NAME).stat().st_mtime_ns
    assert smollm2.build_smollm2(smollm2_dir.parent) == smollm2_dir  # reused, not rebuilt
    assert (smollm2_dir / smollm2.RECORD_NAME).stat().st_mtime_ns == before


# The locking and rebuild logic, with the heavy model writer replaced by a tiny one that logs each
# build: three processes racing must build once, and a damaged copy must be rebuilt.
_RACER = """
import sys, time
import torch
import fixtures.smollm2 as fx
from s2reg.tensors import save_state_dict

def tiny_writer(out, gguf):
    with open(sys.argv[2], "a") as log:
        log.write("build\\n")
    time.sleep(1.0)  # long enough for the other racers to reach the lock
    save_state_dict(out, {"w": torch.zeros(2, 2, dtype=torch.bfloat16)})

fx._write_model = tiny_writer
print(fx.build_smollm2(sys.argv[1]))
"""


def test_parallel_builders_build_once_and_damage_triggers_a_rebuild(tmp_path, monkeypatch):
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(cache), str(log)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [racer.communicate(timeout=300) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0, 0], [err for _, err in results]
    path = cache / smollm2.VERSION
    assert {out.strip() for out, _ in results} == {str(path)}
    assert log.read_text().count("build") == 1
    assert smollm2.is_complete(path, smollm2.gguf_path())
    assert sorted(p.name for p in cache.iterdir()) == sorted([smollm2.VERSION, f".{smollm2.VERSION}.lock"])  # no staging left

    (path / "model.safetensors").write_bytes(b"truncated")
    assert not smollm2.is_complete(path, smollm2.gguf_path())
    rebuilt = []

    def ones_writer(out: Path, gguf: Path) -> None:
        rebuilt.append(out)
        save_state_dict(out, {"w": torch.ones(2, 2, dtype=torch.bfloat16)})

    monkeypatch.setattr(smollm2, "_write_model", ones_writer)
    assert smollm2.build_smollm2(cache) == path
    assert len(rebuilt) == 1 and smollm2.is_complete(path, smollm2.gguf_path())
    with CheckpointSource(path) as source:
        assert torch.equal(source.get("w"), torch.ones(2, 2, dtype=torch.bfloat16))
