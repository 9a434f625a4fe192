"""The real SmolLM2-135M (bf16, dequantised from GGUF, signed zeros included) served in fp32 with a mixed batch."""

from __future__ import annotations

import pytest
import torch
import transformers

import s2reg
from s2reg.format.pisa import pisa_top_k
from s2reg.serve import AdapterServer
from s2reg.tensors import CheckpointSource

from ..families.test_invariants import assert_same_logits

pytestmark = pytest.mark.smollm2
ROUTING = ["pisa", "s2ft", None, "s2ft"]


def adapters(base):
    g = torch.Generator().manual_seed(0)
    with CheckpointSource(base) as source:
        down, q = "model.layers.3.mlp.down_proj.weight", "model.layers.5.self_attn.q_proj.weight"
        s2ft = s2reg.S2FTAdapter.from_slices(source, {
            down: ("columns", torch.randperm(1536, generator=g)[:16].sort().values, torch.randn(576, 16, generator=g) * 3e-2),
            q: ("rows", torch.arange(128, 192), torch.randn(64, 576, generator=g) * 3e-2),
        }, base_name=str(base))
        v = "model.layers.1.self_attn.v_proj.weight"
        indices, values = pisa_top_k(torch.randn(source.shape(v), generator=g), (64, 64), 8)
        pisa = s2reg.PISAAdapter.from_coefficients(source, {v: ((64, 64), indices, values)}, base_name=str(base), scale=0.5)
    return {"s2ft": s2ft, "pisa": pisa}


def load(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_mixed_batch_on_smollm2_equals_merged_checkpoints(smollm2_dir, tmp_path):
    built = adapters(smollm2_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer(["The quick brown fox jumps over the lazy dog and"] * len(ROUTING), return_tensors="pt")["input_ids"]
    expected, continuations = {}, {}
    for key in (None, *built):
        if key is not None:
            s2reg.merge(smollm2_dir, [built[key]], tmp_path / key)
        model = load(smollm2_dir if key is None else tmp_path / key)
        with torch.no_grad():
            expected[key] = model(input_ids=ids[:1]).logits[0]
            continuations[key] = model.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False)[0].tolist()
        del model
    for key in built:
        assert float((expected[key] - expected[None]).abs().max()) > 1e-3 * float(expected[None].abs().max())

    with AdapterServer.from_pretrained(smollm2_dir) as server:
        for key, adapter in built.items():
            server.attach(key, adapter)
        logits = server.forward(ROUTING, input_ids=ids).logits
        generated = server.generate(ids, adapters=ROUTING, max_new_tokens=6)
    for row, key in enumerate(ROUTING):
        assert_same_logits(logits[row], expected[key])
        assert generated[row].tolist() == continuations[key], f"row {row} ({key})"
