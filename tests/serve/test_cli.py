"""``s2reg generate`` (CliRunner): continuations equal the merged checkpoints' greedy continuations.

The model is a tiny random Llama that speaks SmolLM2's tokenizer (copied from the SmolLM2 fixture), so
prompts are real text; the references are transformers' own ``generate`` on checkpoints written by
``s2reg merge``, fed by the tokenizer directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

import s2reg
from s2reg.cli import main
from s2reg.registry import Store

from .builders import build_pisa, build_s2ft

pytestmark = pytest.mark.smollm2
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]
NEW = 5


@pytest.fixture(scope="module")
def chatty(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, two adapters and their merges."""
    root = tmp_path_factory.mktemp("chatty")
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / file, root / "base" / file)
    for key, adapter in {"s2ft": build_s2ft("llama", root / "base", 7, None), "pisa": build_pisa("llama", root / "base", 3)}.items():
        adapter.save(root / key)
        s2reg.merge(root / "base", [adapter], root / f"merged-{key}")
    return root


def run(*args, code: int = 0) -> str:
    """stdout of a run that exits ``code``, or, for a failing one, the last line of stderr (transformers may
    draw its loading bar above it)."""
    result = CliRunner().invoke(main, ["generate", *map(str, args)])
    assert result.exit_code == code, f"{result.output}{result.exception!r}"
    return result.stdout if code == 0 else result.stderr.splitlines(keepends=True)[-1]


def reference(directory: Path, prompts: list[str], *, chat: bool = False) -> list[str]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts] if chat else prompts
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    out = model.generate(**batch, max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def test_json_lists_every_prompt_under_every_adapter(chatty, tmp_path, monkeypatch):
    monkeypatch.setenv("S2REG_HOME", str(tmp_path / "store"))
    Store().push(chatty / "s2ft", "chatty-s2ft:v1")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[1]}) + "\n\n")
    out = json.loads(run(chatty / "base", "--adapter", "chatty-s2ft:v1", "--adapter", chatty / "pisa", "--with-base",
                         "--prompt", PROMPTS[0], "--prompts", prompts, "--max-new-tokens", NEW, "--json"))
    expected = {None: reference(chatty / "base", PROMPTS), "chatty-s2ft:v1": reference(chatty / "merged-s2ft", PROMPTS),
                str(chatty / "pisa"): reference(chatty / "merged-pisa", PROMPTS)}
    assert [(o["prompt"], o["adapter"]) for o in out] == [(p, a) for p in PROMPTS for a in expected]
    for o in out:
        assert o["text"] == expected[o["adapter"]][PROMPTS.index(o["prompt"])], o
    assert len({o["text"] for o in out}) > len(PROMPTS), "the adapters changed no continuation"


def test_one_prompt_and_one_adapter_streams_the_continuation(chatty):
    streamed = run(chatty / "base", "--adapter", chatty / "s2ft", "--prompt", PROMPTS[0], "--max-new-tokens", NEW)
    (text,) = reference(chatty / "merged-s2ft", PROMPTS[:1])
    assert streamed == text + "\n"


def test_several_adapters_print_side_by_side(chatty):
    table = run(chatty / "base", "--adapter", chatty / "s2ft", "--with-base", "--prompt", "Hi", "--max-new-tokens", 2)
    header = table.splitlines()[1]
    assert "prompt" in header and "base" in header and "s2ft" in header and "┃" in header


def test_chat_applies_the_tokenizer_template(chatty):
    out = json.loads(run(chatty / "base", "--adapter", chatty / "pisa", "--prompt", PROMPTS[0], "--chat",
                         "--max-new-tokens", NEW, "--json"))
    assert [o["text"] for o in out] == reference(chatty / "merged-pisa", PROMPTS[:1], chat=True)


@pytest.mark.parametrize("case", ["no prompt", "no adapter", "bad line", "wrong base", "no template"])
def test_bad_input_is_one_line(case, chatty, tmp_path):
    base, args = chatty / "base", ["--adapter", chatty / "s2ft", "--prompt", "Hi"]
    if case == "no prompt":
        args, expected = ["--adapter", chatty / "s2ft"], "give a prompt"
    elif case == "no adapter":
        args, expected = ["--prompt", "Hi"], "give an adapter"
    elif case == "bad line":
        (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
        args, expected = ["--adapter", chatty / "s2ft", "--prompts", tmp_path / "p.jsonl"], "p.jsonl:2: not JSON"
    elif case == "wrong base":  # the merged checkpoint is not the base the adapter was made for
        base, expected = chatty / "merged-s2ft", "does not fit"
    else:
        base = tmp_path / "plain"
        shutil.copytree(chatty / "base", base)
        (base / "chat_template.jinja").unlink()
        args, expected = [*args, "--chat"], "no chat template"
    output = run(base, *args, code=1)
    assert output.startswith("Error: ") and output.count("\n") == 1 and expected in output, output
