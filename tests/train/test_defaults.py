"""The trainer's defaults learn a task without wrecking what the base model knew (issue 14).

A tiny Llama is first taught "prose" (sequences of a fixed random Markov chain) by full fine-tuning,
which also gives its weights the scale of a trained model. Then ``run_training`` at default settings
(default config and learning rate of each method; only the step count and batch are chosen) trains
a new habit (after the marker token 3, answer 10 11 12 13). The task's held-out loss must fall, and the loss on prose the run never saw, measured
on the base with the exported adapter applied (``s2reg.apply``), may rise by at most
``PROSE_RISE_BOUND`` nats. The old PISA convention (scale ``block**2 / 100`` and lr 5e-2, which
wrecked SmolLM2 and Gemma 3) breaks the bound on the same model, so the bound can fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import s2reg
from s2reg.synth import build_checkpoint
from s2reg.train.loop import TrainConfig
from s2reg.train.pisa.config import PISAConfig
from s2reg.train.s2ft.config import S2FTConfig
from s2reg.train.session import run_training
from s2reg.train.settings import TrainOptions, method_config_class

from .. import bench_modules

# nats, the bound docs/training.md states for the defaults (under a third of what PEFT LoRA's defaults cost
# SmolLM2 at their best rate). Measured here: S2FT +0.030 (at 1e-3, the old default: +0.004), PISA +0.0005;
# the old PISA convention +0.54.
PROSE_RISE_BOUND = 0.1
LEARNT = {"s2ft": 0.5, "pisa": 0.2}  # how far the task's held-out loss must fall (measured: 1.79 and 0.49 nats)
VOCAB = 256


def prose(count: int, seed: int, length: int = 24) -> torch.Tensor:
    """Sequences of a fixed Markov chain: each token has four likely successors."""
    table = torch.randint(3, VOCAB, (VOCAB, 4), generator=torch.Generator().manual_seed(14))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        token = int(torch.randint(3, VOCAB, (), generator=g))
        row = [token]
        for _ in range(length - 1):
            token = int(table[token, torch.randint(0, 4, (), generator=g)])
            row.append(token)
        rows.append(row)
    return torch.tensor(rows)


def prose_loss(model) -> float:
    ids = prose(32, seed=999)  # never trained on
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama that has learnt the prose chain (full fine-tuning, saved as a checkpoint)."""
    root = tmp_path_factory.mktemp("defaults")
    model = transformers.LlamaForCausalLM.from_pretrained(build_checkpoint(root / "random", "llama", dtype=torch.float32))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(80):
        ids = prose(16, seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "base")
    data = root / "task.jsonl"
    with data.open("w") as f:  # a new habit: after a run of prose and the marker 3, answer 10 11 12 13
        for row in prose(96, seed=500, length=8).tolist():
            f.write(json.dumps({"input_ids": row + [3, 10, 11, 12, 13], "labels": [-100] * 9 + [10, 11, 12, 13]}) + "\n")
    return root / "base", data


def short_run(base, method, method_config=None, lr=None, **loop):
    directory, data = base
    options = TrainOptions(method_config or method_config_class(method)(),
                           loop=TrainConfig(max_steps=40, epochs=10, batch_size=8, lr=lr, **loop), eval_fraction=0.25,
                           device="cpu")
    run = run_training(directory, data, options, on_warning=lambda _: None)
    tuned = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    before = prose_loss(tuned)
    s2reg.apply(tuned, run.adapter)
    return run.result, prose_loss(tuned) - before


@pytest.mark.slow  # over 20 s on 2 cores: outside the quick subset (README)
@pytest.mark.parametrize("method", ["s2ft", "pisa"])
def test_defaults_learn_the_task_without_wrecking_the_base(base, method):
    result, prose_rise = short_run(base, method)
    assert result.eval_loss_after < result.eval_loss_before - LEARNT[method]
    assert prose_rise <= PROSE_RISE_BOUND
    # This model is small (hidden 64): S2FT's 32 channels are a quarter of down_proj, so at the default rate
    # the step cap acts here (on SmolLM2 the largest step is 0.24%: tests/train/test_cli.py checks the cap
    # never acts there); PISA's steps stay under it.
    assert (result.large_steps > 0) == (method == "s2ft")
    assert result.largest_step_change <= TrainConfig().max_step_change + 1e-6


@pytest.mark.slow  # over 20 s on 2 cores: outside the quick subset (README)
def test_the_bound_catches_the_old_pisa_convention(base):
    """Without the step cap, which since holds any convention's steps to 1%."""
    result, prose_rise = short_run(base, "pisa", method_config=PISAConfig(scale=64 * 64 / 100), lr=5e-2, max_step_change=0.0)
    assert prose_rise > PROSE_RISE_BOUND


# -- the defaults come from the fronts (issue 28) -----------------------------------------------------------
# bench/quality.py's committed points (bench/results/quality/, one JSON per run on SmolLM2-135M, 100 steps):
# the trainer's default rate must be a measured point, with 3 seeds, that beats PEFT LoRA at PEFT's defaults
# on both axes, on both tasks, and that no LoRA-defaults point at any rate dominates.
QUALITY = Path(__file__).resolve().parents[2] / "bench" / "results" / "quality"
TASKS = ("skill", "facts")
SMOLLM2_HIDDEN, SMOLLM2_LAYERS = 576, 30


def measured(method: str, task: str) -> dict[float, list[dict]]:
    """lr -> the 100-step records of ``method`` on ``task`` (one per seed)."""
    by_lr: dict[float, list[dict]] = {}
    for path in QUALITY.glob("*.json"):
        record = json.loads(path.read_text())
        if record.get("method") == method and record.get("task") == task and record.get("steps") == 100:
            by_lr.setdefault(record["lr"], []).append(record)
    return by_lr


def averaged(records: list[dict]) -> tuple[float, float]:
    return (sum(r["accuracy"] for r in records) / len(records), sum(r["prose_rise"] for r in records) / len(records))


def lora_knee(task: str) -> list[dict]:
    """PEFT LoRA (defaults) at its front's knee: the most accuracy for the least forgetting (bench/quality.py)."""
    quality = bench_modules.load("quality")
    front = measured("lora", task)
    seed0 = [next(r for r in front[lr] if r["seed"] == 0) for lr in sorted(front)]
    return front[seed0[quality.knee(seed0)]["lr"]]


@pytest.mark.parametrize("task", TASKS)
def test_the_s2ft_default_rate_beats_peft_loras_defaults_on_both_axes(task):
    ours = measured("s2ft-R", task)[S2FTConfig.default_lr]
    assert sorted(r["seed"] for r in ours) == [0, 1, 2]
    assert {r["trainable"] for r in ours} == {S2FTConfig().channels * SMOLLM2_HIDDEN * SMOLLM2_LAYERS}  # the defaults' size
    accuracy, rise = averaged(ours)
    knee = lora_knee(task)
    assert len(knee) == 3
    lora_accuracy, lora_rise = averaged(knee)
    assert accuracy > lora_accuracy and rise < lora_rise
    for records in measured("lora", task).values():  # no rate of LoRA's defaults is better on both axes
        other_accuracy, other_rise = averaged(records)
        assert not (other_accuracy >= accuracy and other_rise <= rise)


def test_the_documented_defaults_are_the_trainers():
    text = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    for method, config in (("S2FT", S2FTConfig), ("PISA", PISAConfig)):
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        assert float(row.split("|")[2]) == config.default_lr, row
