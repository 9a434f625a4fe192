"""Encoders never get a causal loss: masked-LM from ``text``, sequence classification from ``label``,
chosen from the data and reported; checkpoints saved by ``BertModel`` (no ``bert.`` prefix, the
all-MiniLM-L6-v2 layout) and by ``BertForMaskedLM`` both train and export onto their own names."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import s2reg
from s2reg.cli import main
from s2reg.errors import S2RegError
from s2reg.train.data import IGNORE, MASK_SHARE, collate, tokenize
from s2reg.train.objective import CAUSAL, CLASSIFY, MASKED, Objective, choose
from s2reg.train.session import load_base

from ..families import zoo


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    built = {}
    for name in ("bert", "bert_model"):
        built[name] = zoo.build(name, root / name)
        zoo.word_tokenizer(built[name])
    rng = random.Random(0)
    sentences = [" ".join(f"w{rng.randrange(5, zoo.VOCAB)}" for _ in range(rng.randrange(6, 12))) for _ in range(24)]
    (root / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    (root / "labelled.jsonl").write_text("".join(json.dumps({"text": s, "label": ["neg", "pos"][i % 2]}) + "\n"
                                                 for i, s in enumerate(sentences)))
    return built, root / "text.jsonl", root / "labelled.jsonl"


def _names(directory) -> set[str]:
    with safe_open(directory / "model.safetensors", "pt") as handle:
        return set(handle.keys())


def test_the_objective_follows_the_model_and_the_data():
    bert, llama = {"model_type": "bert"}, {"model_type": "llama"}
    assert choose(bert, [{"text": "a"}]) == Objective(MASKED)
    assert choose(bert, [{"text": "a", "label": 1}, {"text": "b", "label": 0}]) == Objective(CLASSIFY, ("0", "1"))
    assert choose(llama, [{"text": "a"}]) == Objective(CAUSAL)
    for config, records, match in [
        (llama, [{"text": "a", "label": 1}, {"text": "b", "label": 2}], "decoder"),
        (bert, [{"prompt": "a", "completion": "b"}], "encoder"),
        (bert, [{"text": "a", "label": 1}, {"text": "b"}], "label all of them"),
        (bert, [{"text": "a", "label": 1}], "two distinct labels"),
        ({"model_type": "vit"}, [{"text": "a"}], "prepare_s2ft"),
    ]:
        with pytest.raises(S2RegError, match=match):
            choose(config, records)


def test_masked_lm_examples_mask_a_seeded_share_of_ordinary_tokens(encoders):
    from transformers import AutoTokenizer

    built, text, _ = encoders
    tokenizer = AutoTokenizer.from_pretrained(built["bert_model"])
    records = [json.loads(line) for line in text.read_text().splitlines()]
    examples = tokenize(records, tokenizer, 64, Objective(MASKED), seed=3)
    assert examples == tokenize(records, tokenizer, 64, Objective(MASKED), seed=3)
    assert examples != tokenize(records, tokenizer, 64, Objective(MASKED), seed=4)
    masked = kept = 0
    for record, example in zip(records, examples, strict=True):
        original = tokenizer(record["text"])["input_ids"]
        chosen = [i for i, label in enumerate(example.labels) if label != IGNORE]
        assert len(chosen) == max(1, round((len(original) - 2) * MASK_SHARE))
        assert 0 not in chosen and len(original) - 1 not in chosen  # [CLS] and [SEP] are never chosen
        assert all(example.labels[i] == original[i] for i in chosen)
        assert all(example.input_ids[i] == original[i] for i in range(len(original)) if i not in chosen)
        masked += sum(example.input_ids[i] == tokenizer.mask_token_id for i in chosen)
        kept += len(chosen)
    assert masked >= kept // 2  # most chosen tokens become [MASK] (80% rule)
    batch = collate(examples[:4], tokenizer.pad_token_id)
    model, _ = load_base(built["bert_model"], "fp32", "cpu", Objective(MASKED))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    picked = batch["labels"] != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[picked], batch["labels"][picked])
    torch.testing.assert_close(model(**batch).loss, expected)


@pytest.mark.parametrize("name", ["bert", "bert_model"])
def test_an_encoder_checkpoint_loads_its_own_weights_under_every_objective(encoders, name):
    built, _, _ = encoders
    with safe_open(built[name] / "model.safetensors", "pt") as handle:
        key = next(k for k in handle.keys() if k.endswith("encoder.layer.0.attention.self.query.weight"))
        stored = handle.get_tensor(key)
    for objective in (Objective(MASKED), Objective(CLASSIFY, ("a", "b", "c"))):
        model, tokenizer = load_base(built[name], "fp32", "cpu", objective)
        assert type(model).__name__ == {MASKED: "BertForMaskedLM", CLASSIFY: "BertForSequenceClassification"}[objective.kind]
        assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, stored)
        assert tokenizer is not None and tokenizer.mask_token_id == 4


@pytest.mark.parametrize("name", ["bert", "bert_model"])
@pytest.mark.parametrize("data", ["text", "labelled"])
def test_train_an_encoder_reports_its_objective_and_exports_onto_the_checkpoint_names(encoders, tmp_path, name, data):
    built, text, labelled = encoders
    base = built[name]
    result = CliRunner().invoke(main, [
        "train", "--base", str(base), "--data", str(text if data == "text" else labelled), "--method", "s2ft",
        "--heads", "1", "--channels", "4", "--roles", "q,k,v,o,up,down", "--max-steps", "3", "--batch-size", "4",
        "--lr", "0.05", "-o", str(tmp_path / "adapter"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["objective"]["kind"] == ("masked-lm" if data == "text" else "sequence-classification")
    if data == "labelled":
        assert summary["objective"]["labels"] == ["neg", "pos"]
    adapter = s2reg.load(tmp_path / "adapter")
    assert adapter.provenance["training"]["objective"] == summary["objective"]
    assert adapter.targets and set(adapter.targets) <= _names(base)  # no invented bert. prefix (all-MiniLM layout)
    assert {n.startswith("bert.") for n in adapter.targets} == {name == "bert"}
    s2reg.merge(base, [adapter], tmp_path / "merged")
    merged = zoo.load(name, tmp_path / "merged")
    trained = {n for n, t in merged.state_dict().items() if not torch.equal(t, zoo.load(name, base).state_dict()[n])}
    assert trained and all(n in adapter.targets for n in trained)


def test_train_refuses_roles_the_family_lacks_in_one_line(encoders, tmp_path):
    built, text, _ = encoders
    result = CliRunner().invoke(main, ["train", "--base", str(built["bert_model"]), "--data", str(text), "--method", "s2ft",
                                       "--roles", "up,gate", "-o", str(tmp_path / "adapter")])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no 'gate' projection" in errors[0]
    assert result.output.rstrip().endswith(errors[0])
    assert not (tmp_path / "adapter").exists()
