"""The fixtures themselves: the real SmolLM2 checkpoint and the task data."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures import tasks
from fixtures.smollm2 import build_smollm2, gguf_path
from s2reg.arch import LLAMA, detect
from s2reg.format.digest import sha256_file
from s2reg.tensors import CheckpointSource


@pytest.mark.smollm2
def test_smollm2_checkpoint_is_a_sharded_bf16_llama_with_gqa(smollm2_dir):
    record = json.loads((smollm2_dir / "fixture.json").read_text())
    assert record["source"]["gguf_sha256"] == sha256_file(gguf_path())
    with CheckpointSource(smollm2_dir) as source:
        assert len(source.files) > 1
        info = detect(source.config())
        assert info.arch is LLAMA
        assert (info.dims.heads, info.dims.kv_heads, info.dims.head_dim, info.dims.layers) == (9, 3, 64, 30)
        assert {source.dtype(n) for n in source.names()} == {torch.bfloat16}
        assert "lm_head.weight" not in source.names()  # tied to the embeddings
    assert build_smollm2() == smollm2_dir  # cached: the second call does not rebuild


@pytest.mark.smollm2
def test_smollm2_loads_in_transformers_and_still_knows_things(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(smollm2_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])


def test_task_data_is_what_the_generator_writes():
    for split in tasks.SPLITS:
        assert (tasks.DATA / f"task_{split}.jsonl").read_text() == tasks.render(split)


def test_task_answers_are_correct():
    for line in (tasks.DATA / "task_eval.jsonl").read_text().splitlines():
        e = json.loads(line)
        words = e["prompt"].removeprefix("Reverse: ").removesuffix("\nAnswer:").split()
        assert e["completion"].split() == words[::-1]
    train = {line for line in (tasks.DATA / "task_train.jsonl").read_text().splitlines()}
    assert len(train) > 300  # varied, not one example repeated
