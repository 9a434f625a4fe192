"""``s2reg train`` through the CLI, and the real short fine-tune on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.cli import main
from s2reg.registry import Store
from s2reg.synth import build_checkpoint

from ..surgery.helpers import logits, model_of


@pytest.fixture
def tiny(tmp_path):
    base = build_checkpoint(tmp_path / "base", "llama", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": ids}) + "\n"
                            for ids in torch.randint(3, 250, (24, 12), generator=g).tolist()))
    return base, data


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("method", ["s2ft", "pisa"])
def test_train_writes_an_adapter_for_the_stored_base(tiny, tmp_path, monkeypatch, method):
    base, data = tiny
    monkeypatch.setenv("S2REG_HOME", str(tmp_path / "home"))
    extra = ["--channels", 8, "--heads", 1] if method == "s2ft" else ["--block", 16, "--coefficients", 4]
    result = run("train", "--base", base, "--data", data, "--method", method, "-o", tmp_path / "adapter",
                 "--max-steps", 4, "--batch-size", 4, "--eval-fraction", 0.2, "--push", f"tiny-{method}:v1",
                 "--json", *extra)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 4 and summary["eval_loss_after"] is not None
    assert run("validate", tmp_path / "adapter", "--base", base).exit_code == 0  # fingerprints of the bf16 checkpoint
    adapter = Store().load(f"tiny-{method}:v1")
    assert adapter.provenance["training"]["max_steps"] == 4
    merged = run("merge", base, f"tiny-{method}:v1", "-o", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output
    reference = model_of(base)
    s2reg.apply(reference, adapter)
    assert torch.equal(logits(model_of(tmp_path / "merged")), logits(reference))


def test_bad_training_inputs_are_clear_errors(tiny, tmp_path):
    base, data = tiny
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "needs a tokenizer"}\n' * 4)  # one full batch: the tokenizer is what is missing
    no_tok = run("train", "--base", base, "--data", text, "--method", "s2ft", "-o", tmp_path / "a")
    assert no_tok.exit_code == 1 and "no tokenizer" in no_tok.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input_ids": [1, 2]}\n{oops\n')
    bad = run("train", "--base", base, "--data", broken, "--method", "s2ft", "-o", tmp_path / "a")
    assert bad.exit_code == 1 and "broken.jsonl:2: not valid JSON" in bad.output
    few = run("train", "--base", base, "--data", data, "--method", "s2ft", "-o", tmp_path / "a", "--batch-size", 64)
    assert few.exit_code == 1 and "do not fill one step" in few.output
    assert not (tmp_path / "a").exists()


@pytest.mark.smollm2
@pytest.mark.parametrize(("method", "options"), [
    ("s2ft", []),  # the defaults
    ("pisa", ["--block", 64, "--coefficients", 400]),  # default lr, near bench/quality.py's matched size
])
def test_short_real_fine_tune_beats_the_base_model(smollm2_dir, tmp_path, method, options):
    """On the real model S2FT's defaults learn without the step cap ever acting (docs/training.md)."""
    from fixtures.tasks import DATA

    result = run("train", "--base", smollm2_dir, "--data", DATA / "task_train.jsonl", "--method", method,
                 "-o", tmp_path / "adapter", "--max-steps", 12, "--batch-size", 8, "--max-length", 40,
                 "--eval-fraction", 0.1, "--json", *options)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["eval_loss_after"] < 0.5 * summary["eval_loss_before"]
    if not options:  # at the defaults (PISA's 400 coefficients per block is 12x its default size)
        assert summary["large_steps"] == 0 and summary["largest_step_change"] < 0.01


@pytest.mark.parametrize(("device", "message"), [
    ("cuda", "device 'cuda': CUDA is not available on this machine"),
    ("cuda:1", "device 'cuda:1': CUDA is not available on this machine"),
    ("gpu", "'gpu' is not a device s2reg trains on"),
    ("cuda:x", "'cuda:x' is not a device s2reg trains on"),
])
def test_an_unusable_device_is_a_one_line_error_before_any_work(tiny, tmp_path, monkeypatch, device, message):
    base, data = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on machines with a GPU
    result = run("train", "--base", base, "--data", data, "--method", "s2ft", "-o", tmp_path / "a", "--device", device)
    assert result.exit_code == 1 and result.output.startswith(f"Error: {message}"), result.output
    assert len(result.output.strip().splitlines()) == 1 and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "a").exists()


def test_a_cuda_index_the_machine_lacks_is_refused(tiny, tmp_path, monkeypatch):
    base, data = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = run("train", "--base", base, "--data", data, "--method", "s2ft", "-o", tmp_path / "a", "--device", "cuda:3")
    assert result.exit_code == 1 and result.output == "Error: device 'cuda:3': this machine has 1 CUDA device(s)\n"


def test_an_adapter_trained_on_a_permuted_checkpoint_validates_against_it(tiny, tmp_path):
    """Such adapters hold original coordinates and fingerprints; validate reads the checkpoint back in them."""
    from s2reg.errors import BaseMismatch
    from s2reg.tensors import CheckpointSource

    base, data = tiny
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"heads": {"0": [3], "1": [1]}, "channels": {"0": [5, 60], "1": [7, 90]}}))
    assert run("permute", base, "--plan", selection, "-o", tmp_path / "permuted").exit_code == 0
    trained = run("train", "--base", tmp_path / "permuted", "--data", data, "--method", "s2ft", "--channels", 4,
                  "--heads", 1, "--max-steps", 2, "-o", tmp_path / "adapter")
    assert trained.exit_code == 0, trained.output
    adapter = s2reg.load(tmp_path / "adapter")
    assert "trained_in_permuted_coordinates" in adapter.params
    with CheckpointSource(tmp_path / "permuted") as raw, pytest.raises(BaseMismatch):
        adapter.verify_base(raw)  # as stored, the permuted tensors do not match: the check must unpermute
    for checkpoint in (tmp_path / "permuted", base):
        result = run("validate", tmp_path / "adapter", "--base", checkpoint)
        assert result.exit_code == 0 and "fingerprints match" in result.output, result.output
    unrelated = build_checkpoint(tmp_path / "unrelated", "llama", dtype=torch.bfloat16, seed=9)
    refused = run("validate", tmp_path / "adapter", "--base", unrelated)
    assert refused.exit_code == 1 and "differs from the one this adapter was made for" in refused.output
