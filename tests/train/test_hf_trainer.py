"""S2FT and PISA inside the real transformers ``Trainer`` and TRL ``SFTTrainer`` (from PyPI).

The reference is s2reg's own loop (``s2reg.train.loop.train``) on the same model, data order and
hyper-parameters: the batches it feeds the model are recorded by a forward hook, and the Trainer gets
exactly those, in that order (a sequential sampler), with the same AdamW (betas, eps, weight decay),
linear schedule without warm-up, gradient clipping and accumulation. The loop's per-step cap
(``max_step_change``) is off: it is s2reg's own guard, which the Trainer does not have.

Tolerance: the relative L2 of the dense deltas at most 1e-4 (fp32). The two losses are the same sum
over the same tokens, formed differently (TRL's fused log-probabilities over the label tokens, divided
by the accumulated batch's token count; the loop's model loss per micro-batch, divided by the
accumulation steps), so the gradients differ in the last float32 bits, and AdamW's normalisation
carries that into the last bits of each update: measured differences are ~1e-6.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, models
from trl import SFTConfig, SFTTrainer

import s2reg
from s2reg.errors import S2RegError
from s2reg.registry import Store
from s2reg.synth import build_checkpoint
from s2reg.train import PISAConfig, S2FTConfig, export_adapter, prepare_pisa, prepare_s2ft
from s2reg.train.data import Example
from s2reg.train.hf_trainer import ADAPTER_DIR, TRAINABLE_FILE, S2RegTrainerMixin
from s2reg.train.loop import TrainConfig, train

STEPS, BATCH, ACCUM, LR, DECAY = 4, 2, 2, 2e-3, 0.01
S2FT = S2FTConfig(heads=1, channels=4, roles=("q", "o", "up", "down"), seed=3)
PISA = PISAConfig(coefficients=8, block=32, roles=("q", "down"), seed=3)
# a model whose slices are a few percent of it, so that "a checkpoint is the size of the slices" can be told
# from "a checkpoint is the model" (3.8 MB of float32; the S2FT slices are 74 kB, a checkpoint 0.32 MB)
SHAPE = dict(hidden_size=128, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


class S2RegSFTTrainer(S2RegTrainerMixin, SFTTrainer):
    pass


class S2RegTrainer(S2RegTrainerMixin, transformers.Trainer):
    pass


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("base") / "tiny", "llama", dtype=torch.float32, seed=0, **SHAPE)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the tiny vocabulary: SFTTrainer wants one for its pad and eos ids."""
    vocab = {f"t{i}": i for i in range(256)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                                pad_token="t0", bos_token="t1", eos_token="t2")


def prepared(base: Path, method: str):
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    (prepare_s2ft if method == "s2ft" else prepare_pisa)(model, S2FT if method == "s2ft" else PISA)
    return model


def examples(count: int = 12, length: int = 12) -> list[Example]:
    g = torch.Generator().manual_seed(1)
    return [Example(ids, ids) for ids in torch.randint(3, 256, (count, length), generator=g).tolist()]


def loop_run(base: Path, method: str):
    """s2reg's own loop: the adapter, and the input ids of every micro-batch in the order the model saw them."""
    model = prepared(base, method)
    seen: list[list[int]] = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.extend(kwargs["input_ids"].tolist()),
                                    with_kwargs=True)
    config = TrainConfig(max_steps=STEPS, batch_size=BATCH, grad_accum=ACCUM, lr=LR, weight_decay=DECAY,
                         schedule="linear", warmup_steps=0, max_grad_norm=1.0, max_step_change=0, seed=0, save_every=0)
    train(model, examples(), config)
    assert len(seen) == STEPS * BATCH * ACCUM
    with s2reg.CheckpointSource(base) as source:
        return export_adapter(model, base=source), seen


@pytest.fixture(scope="module")
def reference(base):
    return {method: loop_run(base, method) for method in ("s2ft", "pisa")}


def arguments(output: Path, **overrides) -> dict:
    """TrainingArguments for the loop's run: its optimizer, schedule, clipping, batches in the given order."""
    return dict(output_dir=str(output), max_steps=STEPS, per_device_train_batch_size=BATCH,
                gradient_accumulation_steps=ACCUM, learning_rate=LR, weight_decay=DECAY, lr_scheduler_type="linear",
                warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999,
                adam_epsilon=1e-8, train_sampling_strategy="sequential", seed=0, use_cpu=True, report_to=[],
                save_strategy="no", logging_steps=1, bf16=False, gradient_checkpointing=False,
                disable_tqdm=True) | overrides


def sft(base, tokenizer, rows, output, *, model=None, **overrides) -> S2RegSFTTrainer:
    model = model if model is not None else prepared(base, "s2ft")
    extra = {k: overrides.pop(k) for k in [k for k in overrides if k.startswith("s2reg_")]}
    return S2RegSFTTrainer(model=model, args=SFTConfig(**arguments(output, **overrides)), processing_class=tokenizer,
                           train_dataset=Dataset.from_dict({"input_ids": rows}), **extra)


def relative_difference(a, b) -> float:
    assert set(a.targets) == set(b.targets) and a.targets
    num = sum(float(((torch.as_tensor(a.to_dense(n)).double() - torch.as_tensor(b.to_dense(n)).double()) ** 2).sum())
              for n in a.targets)
    den = sum(float((torch.as_tensor(a.to_dense(n)).double() ** 2).sum()) for n in a.targets)
    return (num / den) ** 0.5


def test_sft_trainer_gives_the_adapter_of_s2regs_own_loop(base, tokenizer, reference, tmp_path):
    expected, rows = reference["s2ft"]
    trainer = sft(base, tokenizer, rows, tmp_path / "out")
    trainer.train()
    trainer.save_model()
    written = s2reg.load(tmp_path / "out" / ADAPTER_DIR)
    assert written.kind == "s2ft" and written.params["selection"] == expected.params["selection"]
    difference = relative_difference(expected, written)
    assert difference < 1e-4, difference
    # the adapter fits the checkpoint it was loaded from (its fingerprints), and is what the model computes with
    with s2reg.CheckpointSource(base) as source:
        written.verify_base(source)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_trainer_trains_pisa_as_s2regs_own_loop_does(base, reference, tmp_path):
    expected, rows = reference["pisa"]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    trainer = S2RegTrainer(model=prepared(base, "pisa"), args=transformers.TrainingArguments(**arguments(tmp_path)),
                           train_dataset=dataset)
    trainer.train()
    difference = relative_difference(expected, trainer.export_adapter())
    assert difference < 1e-4, difference


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_checkpoint_holds_the_slices_and_resuming_it_gives_the_uninterrupted_adapter(base, tokenizer, reference,
                                                                                       tmp_path):
    _, rows = reference["s2ft"]
    whole = sft(base, tokenizer, rows, tmp_path / "whole", save_strategy="steps", save_steps=2)
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    # the checkpoint: the trainable values, the adapter, the optimizer's moments, the Trainer's small files
    slices = sum(p.numel() * p.element_size() for p in whole.model.parameters() if p.requires_grad)
    model_bytes = directory_bytes(base)
    size = directory_bytes(checkpoint)
    assert (checkpoint / TRAINABLE_FILE).stat().st_size < slices + 4096
    assert (checkpoint / "optimizer.pt").stat().st_size < 2 * slices + 16384  # exp_avg, exp_avg_sq of the slices
    assert size < 4 * slices + 65536 and size < model_bytes / 10, (size, slices, model_bytes)
    assert not list(checkpoint.glob("model*.safetensors"))
    # resume in a fresh process's state: a fresh model, a fresh trainer, the checkpoint's slices and optimizer
    resumed = sft(base, tokenizer, rows, tmp_path / "resumed", save_strategy="steps", save_steps=2)
    before = {n: p.detach().clone() for n, p in resumed.model.named_parameters() if p.requires_grad}
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert any(not torch.equal(before[n], p) for n, p in resumed.model.named_parameters() if p.requires_grad)
    expected, got = whole.export_adapter(), resumed.export_adapter()
    assert got.targets.keys() == expected.targets.keys()
    for name in expected.targets:
        assert torch.equal(torch.as_tensor(got.to_dense(name)), torch.as_tensor(expected.to_dense(name))), name


def test_gradient_checkpointing_and_bf16_train_the_same_slices(base, tokenizer, reference, tmp_path):
    expected, rows = reference["s2ft"]
    checkpointed = sft(base, tokenizer, rows, tmp_path / "gc", gradient_checkpointing=True)
    checkpointed.train()
    assert relative_difference(expected, checkpointed.export_adapter()) < 1e-4
    # bf16 autocast (the Trainer's AMP): the matmuls, forward and backward, in bf16 (8-bit mantissas), the
    # slices and AdamW in float32. AdamW's first steps move each element by about lr * sign(gradient), so an
    # element whose gradient is near zero can move the other way: measured 6.4% relative L2 from float32
    # (a broken backward gives 100% or more: no update, or another one)
    bf16 = sft(base, tokenizer, rows, tmp_path / "bf16", bf16=True, gradient_checkpointing=True)
    bf16.train()
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters() if p.requires_grad)
    difference = relative_difference(expected, bf16.export_adapter())
    assert 0 < difference < 0.15, difference


def test_save_model_pushes_the_adapter_to_the_registry(base, tokenizer, reference, tmp_path):
    _, rows = reference["s2ft"]
    trainer = sft(base, tokenizer, rows[:BATCH * ACCUM], tmp_path / "out", max_steps=1, s2reg_push="tiny-sft:v1",
                  s2reg_store=tmp_path / "store")
    trainer.train()
    trainer.save_model()
    stored = Store(tmp_path / "store").load("tiny-sft:v1")
    written = s2reg.load(tmp_path / "out" / ADAPTER_DIR)
    assert stored.targets.keys() == written.targets.keys()
    assert all(torch.equal(torch.as_tensor(stored.to_dense(n)), torch.as_tensor(written.to_dense(n)))
               for n in written.targets)


def test_a_checkpoint_of_other_slices_or_an_unprepared_model_is_refused(base, tokenizer, reference, tmp_path):
    _, rows = reference["s2ft"]
    first = sft(base, tokenizer, rows[:BATCH * ACCUM], tmp_path / "a", max_steps=1, save_strategy="steps",
                save_steps=1)
    first.train()
    # the same shapes, other channels and heads: the values would load without complaint and mean nothing
    other = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    prepare_s2ft(other, dataclasses.replace(S2FT, seed=S2FT.seed + 1))
    assert {n: p.shape for n, p in other.named_parameters() if p.requires_grad} == {
        n: p.shape for n, p in first.model.named_parameters() if p.requires_grad}
    with pytest.raises(S2RegError, match="other slices or positions"):
        sft(base, tokenizer, rows, tmp_path / "b", model=other).train(
            resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    plain = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    with pytest.raises(S2RegError, match="prepare_s2ft / prepare_pisa"):
        sft(base, tokenizer, rows, tmp_path / "c", model=plain)


def documented_example() -> str:
    """The SFTTrainer example of docs/training.md, as written."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    section = text.split("## Inside transformers' Trainer and TRL", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.+?)\n```", section, flags=re.DOTALL)
    return code


@pytest.mark.smollm2
def test_the_documented_sft_example_runs_as_written(smollm2_dir, tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "fixtures").symlink_to(root / "fixtures")  # the example runs from the repository root
    monkeypatch.chdir(tmp_path)
    exec(compile(documented_example(), "docs/training.md", "exec"), {"__name__": "__docs__"})  # noqa: S102
    adapter = s2reg.load(tmp_path / "sft-s2ft" / ADAPTER_DIR)
    with s2reg.CheckpointSource(smollm2_dir) as source:
        adapter.verify_base(source)
    assert adapter.params["selection"]["0"]["heads"] and adapter.targets
    stored = Store().load("reverse-sft:v1")
    assert stored.targets.keys() == adapter.targets.keys()
    # the trainable values (fp32: 1.66 M of them), AdamW's two moments, the adapter (bf16, compressed), and the
    # tokenizer the Trainer saves with every checkpoint: 25 MB, against the 273 MB bf16 model (540 MB as trained)
    checkpoint = tmp_path / "sft-s2ft" / "checkpoint-2"
    trainable = (checkpoint / TRAINABLE_FILE).stat().st_size
    tokenizer_files = sum(f.stat().st_size for f in checkpoint.iterdir() if f.name in ("tokenizer.json",
                                                                                       "tokenizer_config.json"))
    assert directory_bytes(checkpoint) - tokenizer_files < 4 * trainable + 65536
    assert directory_bytes(checkpoint) < directory_bytes(smollm2_dir) / 10
