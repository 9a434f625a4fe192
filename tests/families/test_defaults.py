"""The trainer's defaults keep the base, on every family ``s2reg train`` trains (issue 28).

One row per zoo species with a language-model objective (causal, or masked for the encoders): the
user's path, ``run_training`` at the method's default configuration, learning rate and step cap (only
the step count and batch are chosen here), trains a new habit into the tiny random model. Forgetting is
the rise of the NLL of text drawn from the base itself, measured exactly as its expectation, the mean
per-token ``KL(base || tuned)`` on token sequences the run never saw; it may not exceed
``FORGETTING_BOUND`` nats. The zoo's weights are random at ``initializer_range`` 0.1, so the default rate
moves them (relatively) much further per step than it moves a trained model's: the per-step cap
(``--max-step-change``) is what keeps them, and ``test_the_bound_fails_without_the_step_cap`` shows the
bound is broken when it is off. The encoders get the zoo's word tokenizer (masked-LM needs its mask
token); ViT (pixels) and the bare encoder have no objective in ``s2reg train``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import s2reg
from s2reg.train.loop import TrainConfig
from s2reg.train.session import run_training
from s2reg.train.settings import TrainOptions, method_config_class

from ..train.test_defaults import PROSE_RISE_BOUND as FORGETTING_BOUND  # docs/training.md states it
from . import zoo

STEPS = 20
TRAINED = [name for name, species in zoo.SPECIES.items() if species.inputs == "tokens" and species.objective in ("causal", "masked")]
ROWS = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in TRAINED]


def habit_data(path, species: zoo.Species):
    """After a run of random tokens and the marker 3, answer 10 11 12 13 (encoders: the same text, masked-LM)."""
    generator = torch.Generator().manual_seed(28)
    with path.open("w") as f:
        for row in torch.randint(14, zoo.VOCAB, (64, 8), generator=generator).tolist():
            ids = row + [3, 10, 11, 12, 13]
            record = {"input_ids": ids} if species.objective == "masked" else {"input_ids": ids, "labels": [-100] * 9 + ids[9:]}
            f.write(json.dumps(record) + "\n")
    return path


def unseen_tokens() -> torch.Tensor:
    return torch.randint(14, zoo.VOCAB, (8, zoo.SEQ), generator=torch.Generator().manual_seed(999))


def forgetting(base_model, tuned_model) -> float:
    """Mean per-token KL(base || tuned): the expected NLL rise of text sampled from the base."""
    ids = unseen_tokens()
    with torch.no_grad():
        base = torch.log_softmax(base_model(input_ids=ids).logits.double(), dim=-1)
        tuned = torch.log_softmax(tuned_model(input_ids=ids).logits.double(), dim=-1)
    return float((base.exp() * (base - tuned)).sum(-1).mean())


def trainable_copy(name: str, zoo_checkpoint, tmp_path):
    """The species' checkpoint as ``s2reg train`` needs it (encoders: with a tokenizer), and its habit data."""
    species, directory = zoo.SPECIES[name], zoo_checkpoint(name)
    if species.objective == "masked":
        directory = shutil.copytree(directory, tmp_path / name)
        zoo.word_tokenizer(directory)
    return directory, habit_data(tmp_path / "habit.jsonl", species)


def default_run(name: str, directory, data, method: str, **loop) -> float:
    species = zoo.SPECIES[name]
    options = TrainOptions(method_config_class(method)(), device="cpu",
                           loop=TrainConfig(max_steps=STEPS, epochs=100, batch_size=8, **loop))
    run = run_training(directory, data, options, on_warning=lambda _: None)
    base, tuned = zoo.load(species, directory), zoo.load(species, directory)
    s2reg.apply(tuned, run.adapter)
    return forgetting(base, tuned)


@pytest.mark.slow  # 2 methods x 29 families: outside the quick subset (README)
@pytest.mark.parametrize("method", ["s2ft", "pisa"])
@pytest.mark.parametrize("name", ROWS)
def test_the_defaults_keep_the_base(name, method, zoo_checkpoint, tmp_path):
    assert default_run(name, *trainable_copy(name, zoo_checkpoint, tmp_path), method) <= FORGETTING_BOUND


@pytest.mark.slow
def test_the_bound_fails_at_ten_times_the_rate_without_the_step_cap(zoo_checkpoint, tmp_path):
    rate = 10 * method_config_class("s2ft").default_lr
    forgot = default_run("llama", *trainable_copy("llama", zoo_checkpoint, tmp_path), "s2ft", lr=rate, max_step_change=0.0)
    assert forgot > FORGETTING_BOUND
