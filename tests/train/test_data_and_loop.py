"""Training data parsing, the loop's resumable state, and data-parallel training (gloo, 2 processes)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from s2reg.errors import S2RegError
from s2reg.train import S2FTConfig, prepare_s2ft
from s2reg.train.data import IGNORE, Example, collate, read_jsonl, tokenize
from s2reg.train.loop import TrainConfig, train
from s2reg.train.settings import TrainOptions

from .helpers import tiny_model


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"prompt": "x"}, "prompt and completion must both be strings"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
    ({"messages": "hello"}, "list of {role, content}"),
    ({"input_ids": [1, -2]}, "non-negative integers"),
    ({"input_ids": [1, 2], "labels": [1]}, "as long as input_ids"),
    ({"other": 1}, "expected one of text"),
])
def test_malformed_lines_are_reported_with_their_number(tmp_path, line, message):
    path = write(tmp_path / "d.jsonl", [{"text": "fine"}, line])
    with pytest.raises(S2RegError, match=rf"d.jsonl:2: .*{message}"):
        read_jsonl(path)


def test_pretokenised_data_needs_no_tokenizer_but_text_does(tmp_path):
    records = read_jsonl(write(tmp_path / "d.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]))
    examples = tokenize(records, None, max_length=2)
    assert examples == [Example([5, 6], [5, 6]), Example([8, 9], [IGNORE, 9])]
    with pytest.raises(S2RegError, match="no tokenizer"):
        tokenize(read_jsonl(write(tmp_path / "t.jsonl", [{"text": "hello"}])), None, 16)
    batch = collate(examples + [Example([1], [1])], pad_id=0)
    assert batch["input_ids"].tolist()[2] == [1, 0] and batch["labels"].tolist()[2] == [1, IGNORE]
    assert batch["attention_mask"].tolist()[2] == [1, 0]


@pytest.mark.smollm2
def test_prompt_and_chat_losses_cover_only_the_answer(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    records = read_jsonl(write(tmp_path / "d.jsonl", [
        {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
    ]))
    prompt, chat = tokenize(records, tokenizer, 128)
    answer = tokenizer(" 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for t in prompt.labels if t != IGNORE] == answer
    learned = tokenizer.decode([t for t in chat.labels if t != IGNORE])
    assert learned.startswith("hi") and "Say hi" not in learned


def _examples(count=16, length=9, vocab=250):
    g = torch.Generator().manual_seed(0)
    return [Example(ids, ids) for ids in torch.randint(3, vocab, (count, length), generator=g).tolist()]


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    model, _ = tiny_model(tmp_path / "m", dtype=torch.float32)
    prepare_s2ft(model, S2FTConfig(channels=4, heads=1, seed=0))
    reference = copy.deepcopy(model)
    config = TrainConfig(max_steps=6, batch_size=2, lr=1e-2, save_every=2, warmup_steps=1, schedule="cosine")
    train(reference, _examples(), config)

    def crash(progress):
        if progress.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, _examples(), config, state_dir=tmp_path / "state", on_step=crash)
    assert (tmp_path / "state" / "state.safetensors").is_file()
    result = train(model, _examples(), config, state_dir=tmp_path / "state", resume=True)
    assert result.resumed_from == 4 and result.steps == 6
    assert not (tmp_path / "state").exists()
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


class _CountingDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that counts the gradient buckets it all-reduces, per bucket (a comm hook around the default one)."""

    reduced: dict[int, int] = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def count(state, bucket):
            _CountingDDP.reduced[bucket.index()] = _CountingDDP.reduced.get(bucket.index(), 0) + 1
            return allreduce_hook(state, bucket)

        self.register_comm_hook(None, count)


def _ddp_worker(rank, world, init_file, model_dir, out, grad_accum):
    import torch.distributed as dist
    import transformers

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.nn.parallel.DistributedDataParallel = _CountingDDP  # the loop wraps the model in whatever this names
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    prepare_s2ft(model, S2FTConfig(channels=4, heads=1, seed=0))
    train(model, _examples(), TrainConfig(max_steps=3, batch_size=2, grad_accum=grad_accum, lr=1e-2))
    if rank == 0:
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        from safetensors.torch import save_file

        save_file(state, out)
        (out.parent / "reduced.json").write_text(json.dumps(_CountingDDP.reduced))
    dist.destroy_process_group()


@pytest.mark.slow  # over 20 s on 2 cores: outside the quick subset (README)
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_ddp_with_two_processes_equals_one_process_with_the_same_global_batch(tmp_path, grad_accum):
    """Two ranks of batch 2 train what one process of batch 4 trains, with or without accumulation; with
    accumulation only the last micro-batch of a step all-reduces (``no_sync`` on the others): every
    gradient bucket is reduced once per optimizer step."""
    model, model_dir = tiny_model(tmp_path / "m", dtype=torch.float64)
    prepare_s2ft(model, S2FTConfig(channels=4, heads=1, seed=0))
    steps = train(model, _examples(), TrainConfig(max_steps=3, batch_size=4, grad_accum=grad_accum, lr=1e-2)).steps
    out = tmp_path / "ddp.safetensors"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(model_dir), out, grad_accum), nprocs=2, join=True)
    from safetensors.torch import load_file

    ddp = load_file(out)
    single = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert ddp.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-10, atol=1e-12, msg=name)
    reduced = json.loads((tmp_path / "reduced.json").read_text())
    assert steps >= 2 and reduced and set(reduced.values()) == {steps}, reduced  # each bucket once per optimizer step


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny checkpoint and 10 pre-tokenised examples (no tokenizer needed)."""
    root = tmp_path_factory.mktemp("steps")
    _, base = tiny_model(root / "base", dtype=torch.float32)
    data = write(root / "d.jsonl", [{"input_ids": e.input_ids} for e in _examples(count=10, length=5)])
    return base, data


@pytest.mark.parametrize(("max_steps", "epochs", "grad_accum", "eval_fraction", "steps"), [
    # 10 examples, batch 2; eval holds out int(10 * fraction); steps per epoch = batches // grad_accum
    (None, 1, 1, 0.0, 5),
    (None, 3, 1, 0.0, 15),
    (None, 2, 2, 0.0, 4),   # 2 steps of 2 x 2 per epoch
    (None, 1, 1, 0.2, 4),   # 8 left: 4 steps
    (None, 2, 3, 0.2, 2),   # 4 batches // 3 = 1 step per epoch
    (3, 1, 1, 0.0, 3),      # max_steps inside one epoch
    (6, 1, 1, 0.2, 6),      # issue 24: was capped at one epoch (4); max_steps overrides epochs
    (12, 1, 1, 0.0, 12),    # 2.4 epochs
    (3, 5, 2, 0.2, 3),      # fewer than epochs x steps per epoch: max_steps still wins
    (4, 1, 3, 0.2, 4),      # 1 step per epoch: four passes
])
def test_max_steps_overrides_epochs(tiny_run, max_steps, epochs, grad_accum, eval_fraction, steps):
    from s2reg.train.session import run_training

    base, data = tiny_run
    config = TrainConfig(max_steps=max_steps, epochs=epochs, batch_size=2, grad_accum=grad_accum, lr=1e-4)
    seen = []
    options = TrainOptions(S2FTConfig(channels=2, heads=0), loop=config, eval_fraction=eval_fraction, device="cpu")
    run = run_training(base, data, options, on_step=lambda p: seen.append((p.step, p.total)))
    assert run.result.steps == steps and seen == [(i, steps) for i in range(1, steps + 1)]


def test_a_run_longer_than_an_epoch_resumes_to_the_same_result(tmp_path):
    """--max-steps past the data: the interrupted run picks up in its second pass, in the same seeded order."""
    model, _ = tiny_model(tmp_path / "m", dtype=torch.float32)
    prepare_s2ft(model, S2FTConfig(channels=4, heads=1, seed=0))
    reference = copy.deepcopy(model)
    config = TrainConfig(max_steps=7, batch_size=2, lr=1e-3, save_every=2)
    train(reference, _examples(count=8), config)

    def crash(progress):
        if progress.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, _examples(count=8), config, state_dir=tmp_path / "state", on_step=crash)
    result = train(model, _examples(count=8), config, state_dir=tmp_path / "state", resume=True)
    assert result.resumed_from == 6 and result.steps == 7
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
