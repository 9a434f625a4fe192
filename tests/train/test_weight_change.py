"""The per-step weight-change warning and the run's relative weight change (``train/change.py``).

The reference for the relative change is the exported adapter applied to a fresh copy of the base
(``s2reg.apply``, the format's own merge), differences summed in float64: a path that shares nothing with the
trainer's bookkeeping but the trained values.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.cli import main
from s2reg.synth import build_checkpoint
from s2reg.train.change import STEP_LIMIT
from s2reg.train.loop import TrainConfig
from s2reg.train.settings import TrainOptions
from s2reg.train.pisa.config import PISAConfig
from s2reg.train.s2ft.config import S2FTConfig
from s2reg.train.session import run_training

from ..surgery.helpers import model_of


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("change")
    base = build_checkpoint(root / "base", "llama", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": ids}) + "\n"
                            for ids in torch.randint(3, 250, (16, 12), generator=g).tolist()))
    return base, data


def applied_change(base, adapter) -> float:
    """||W' - W|| / ||W|| over the adapter's targets, W' the base with the adapter applied."""
    before = dict(model_of(base, torch.float32).named_parameters())
    after_model = model_of(base, torch.float32)
    s2reg.apply(after_model, adapter)
    after = dict(after_model.named_parameters())
    changed = total = 0.0
    for name in adapter.targets:
        changed += float((after[name].detach().double() - before[name].detach().double()).pow(2).sum())
        total += float(before[name].detach().double().pow(2).sum())
    return math.sqrt(changed / total)


@pytest.mark.parametrize(("method", "config"), [
    ("s2ft", S2FTConfig(channels=16, heads=1, roles=("o", "down"))),
    ("pisa", PISAConfig(block=16, coefficients=8)),
])
def test_the_summary_reports_the_relative_change_of_the_trained_weights(tiny, method, config):
    base, data = tiny
    seen = []
    run = run_training(base, data, TrainOptions(config, loop=TrainConfig(max_steps=3, batch_size=4, lr=1e-4), device="cpu"),
                       on_warning=seen.append)
    assert seen == [] and run.result.large_steps == 0
    assert run.result.weight_change > 0
    assert run.result.weight_change == pytest.approx(applied_change(base, run.adapter), rel=1e-3)
    assert 0 < run.result.largest_step_change < STEP_LIMIT


@pytest.mark.parametrize("method", ["s2ft", "pisa"])
def test_a_huge_learning_rate_is_capped_and_reported_once_in_one_line(tiny, method):
    base, data = tiny
    config = S2FTConfig(channels=16) if method == "s2ft" else PISAConfig(block=16, coefficients=8)
    seen = []
    loop = TrainConfig(max_steps=3, batch_size=4, lr=30.0)
    run = run_training(base, data, TrainOptions(config, loop=loop, device="cpu"), on_warning=seen.append)
    assert len(seen) == 1 and "\n" not in seen[0]
    assert seen[0].startswith("step 1 would have moved model.layers.") and "capped at 1.0% (--max-step-change)" in seen[0]
    assert run.result.large_steps == 3 and run.result.largest_step_change == pytest.approx(loop.max_step_change)
    # the adapter itself, applied to the base: three capped steps move no target by more than three caps
    assert 0 < applied_change(base, run.adapter) <= 3 * loop.max_step_change * (1 + 1e-6)


@pytest.mark.parametrize("method", ["s2ft", "pisa"])
def test_without_the_cap_a_huge_learning_rate_is_only_reported(tiny, method):
    base, data = tiny
    config = S2FTConfig(channels=16) if method == "s2ft" else PISAConfig(block=16, coefficients=8)
    seen = []
    loop = TrainConfig(max_steps=3, batch_size=4, lr=30.0, max_step_change=0)
    run = run_training(base, data, TrainOptions(config, loop=loop, device="cpu"), on_warning=seen.append)
    assert len(seen) == 1 and "of its norm (more than 2% in one step)" in seen[0]
    assert run.result.large_steps == 3 and run.result.largest_step_change > STEP_LIMIT
    assert applied_change(base, run.adapter) > 3 * 0.01


def test_every_step_of_a_slice_stays_within_the_cap(tmp_path):
    """Measured outside the watch: the slice's own change per step against its weight's norm (S2FT moves the
    weight by exactly the slice's change)."""
    from s2reg.train import prepare_s2ft
    from s2reg.train.data import Example
    from s2reg.train.loop import train

    from .helpers import tiny_model

    model, _ = tiny_model(tmp_path / "m", dtype=torch.float32)
    prepare_s2ft(model, S2FTConfig(channels=8, heads=1, roles=("o", "down", "v")))
    slices = {n: p for n, p in model.named_parameters() if p.requires_grad}
    norms = {n: float(model.get_submodule(n.rpartition(".")[0]).weight.double().norm()) for n in slices}
    before = {n: p.detach().clone() for n, p in slices.items()}
    moved = []

    def measure(progress):
        for n, p in slices.items():
            moved.append(float((p.detach() - before[n]).double().norm()) / norms[n])
            before[n] = p.detach().clone()

    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, ids) for ids in torch.randint(3, 250, (16, 9), generator=g).tolist()]
    train(model, examples, TrainConfig(max_steps=4, batch_size=4, lr=1.0, max_step_change=0.005), on_step=measure,
          on_warning=lambda _: None)
    assert max(moved) == pytest.approx(0.005, rel=1e-5) and all(m <= 0.005 * (1 + 1e-5) for m in moved)


def test_parameters_of_other_methods_are_watched_not_capped(tmp_path):
    """Full fine-tuning (or a PEFT model's factors) trained by the same loop: reported, never rewritten."""
    from s2reg.train.data import Example
    from s2reg.train.loop import train

    from .helpers import tiny_model

    model, _ = tiny_model(tmp_path / "m", dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, ids) for ids in torch.randint(3, 250, (8, 9), generator=g).tolist()]
    result = train(model, examples, TrainConfig(max_steps=1, batch_size=4, lr=0.5, max_grad_norm=0), on_warning=seen.append)
    assert len(seen) == 1 and "more than 2% in one step" in seen[0]
    moved = max(float((p.detach() - before[n]).double().norm() / before[n].double().norm())
                for n, p in model.named_parameters() if before[n].norm() > 0)
    assert moved > 0.05 and result.largest_step_change == pytest.approx(moved, rel=1e-6)


def test_the_cli_prints_the_warning_and_the_change(tiny, tmp_path):
    base, data = tiny
    result = CliRunner().invoke(main, ["train", "--base", str(base), "--data", str(data), "--method", "pisa",
                                       "--block", "16", "--coefficients", "8", "--lr", "30", "--max-steps", "2",
                                       "--batch-size", "4", "-o", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "step 1 would have moved" in warnings[0]
    summary = json.loads(result.stdout)
    assert summary["large_steps"] == 2 and summary["weight_change"] > 0
    assert summary["largest_step_change"] == pytest.approx(0.01)
    table = CliRunner().invoke(main, ["train", "--base", str(base), "--data", str(data), "--method", "s2ft",
                                      "--lr", "1e-4", "--max-steps", "2", "--batch-size", "4", "-o", str(tmp_path / "b")])
    assert table.exit_code == 0, table.output
    assert "weight change" in table.stdout and "of the trained weights' norm (largest step" in table.stdout
    assert "32 channels, 0 heads per layer" in table.stdout and "warning" not in table.stderr
