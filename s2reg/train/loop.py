"""The training loop behind ``s2reg train``: AdamW over the prepared parameters, warm-up and a linear
or cosine schedule, gradient accumulation and clipping, eval loss, resumable state (safetensors and
JSON, never pickle), and data-parallel training when launched by ``torchrun``: DDP, or FSDP when the
model was sharded with ``fully_shard`` (``fsdp.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import S2RegError
from ..fsatomic import building
from .change import LargeStepWarning, WeightWatch
from .data import IGNORE, Example, collate
from .fsdp import is_sharded, like, whole
from .settings import TrainConfig


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    lr: float
    tokens_per_second: float


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    resumed_from: int = 0
    weight_change: float = 0.0        # ||W_end - W_start|| / ||W_start|| over the trained targets (change.py)
    largest_step_change: float = 0.0  # the largest one-step relative change of any target
    large_steps: int = 0              # steps that moved a target by more than change.STEP_LIMIT

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "losses"} | {
            "final_loss": self.losses[-1] if self.losses else None}


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lr_factor(step: int, total: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def _batches(examples: list[Example], config: TrainConfig, epoch: int) -> list[list[Example]]:
    """This rank's micro-batches for an epoch, in a seeded order every rank agrees on."""
    rank, world = _rank_world()
    order = list(range(len(examples)))
    random.Random(config.seed * 1000 + epoch).shuffle(order)
    global_batch = config.batch_size * world
    batches = []
    for start in range(0, len(order) - global_batch + 1, global_batch):  # whole global batches only
        mine = order[start + rank * config.batch_size: start + (rank + 1) * config.batch_size]
        batches.append([examples[i] for i in mine])
    return batches


def _input_device(model: nn.Module) -> torch.device:
    """Where batches go: the parameters' device (a shard's under FSDP; the compute device when the shards
    are offloaded to CPU memory)."""
    if getattr(model, "s2reg_compute_device", None) is not None:
        return model.s2reg_compute_device
    param = next(model.parameters())
    return param.to_local().device if hasattr(param, "to_local") else param.device


def evaluate(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8) -> float:
    """Mean loss per target token (per example for classification) over ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = _input_device(model)
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
            labels = batch["labels"]  # per-token losses (shifted for a causal LM), or one per example
            tokens = len(labels) if labels.dim() == 1 else int((labels[:, 1:] != IGNORE).sum())
            if tokens:
                total += float(model(**batch).loss) * tokens
                count += tokens
    model.train(was_training)
    return total / count if count else float("nan")


# What fixes a run's trajectory: a resumed run must match the saved one on each (save_every does not).
_RUN_FIELDS = ("epochs", "max_steps", "grad_accum", "lr", "warmup_steps", "schedule", "weight_decay",
               "max_grad_norm", "seed")


def _run_record(config: TrainConfig) -> dict[str, Any]:
    """The run as the state records it: its settings, and the global batch (what each step consumes)."""
    _, world = _rank_world()
    return {**{f: getattr(config, f) for f in _RUN_FIELDS}, "global_batch": config.batch_size * world,
            "batch_size": config.batch_size, "processes": world}


def _save_state(directory: Path, step: int, parameters: dict[str, nn.Parameter], optimizer, config: TrainConfig) -> None:
    """Whole tensors (gathered from the ranks' shards under FSDP: every rank calls this), written by rank 0,
    so a run resumes on any number of processes that keeps the global batch."""
    state = optimizer.state_dict()
    tensors = {f"param.{name}": whole(p.detach()).cpu().contiguous() for name, p in parameters.items()}
    scalars: dict[str, Any] = {"step": step, "run": _run_record(config), "param_groups": state["param_groups"],
                               "state": {}}
    for index, entry in state["state"].items():
        scalars["state"][str(index)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = whole(value.detach()).cpu().contiguous()
            else:
                scalars["state"][str(index)][key] = value
    if _rank_world()[0] != 0:
        return
    with building(directory, overwrite=True) as staging:
        save_file(tensors, staging / "state.safetensors")
        (staging / "state.json").write_text(json.dumps(scalars))


def _check_same_run(directory: Path, saved: dict[str, Any], config: TrainConfig) -> None:
    now = _run_record(config)
    for key in (*_RUN_FIELDS, "global_batch"):
        if key in saved and saved[key] != now[key]:
            detail = (f"{saved['batch_size']} per process x {saved['processes']}" if key == "global_batch" else "")
            raise S2RegError(f"{directory}: the saved run has {key.replace('_', ' ')} {saved[key]}"
                             f"{f' ({detail})' if detail else ''}, this one {now[key]}; resume with the same "
                             "settings (the global batch is --batch-size x processes), or delete it to start over")


def _load_state(directory: Path, parameters: dict[str, nn.Parameter], optimizer, config: TrainConfig) -> int:
    try:
        tensors = load_file(directory / "state.safetensors")
        scalars = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise S2RegError(f"{directory}: unreadable training state ({exc}); delete it to start over") from None
    _check_same_run(directory, scalars.get("run", {}), config)
    missing = [n for n in parameters if f"param.{n}" not in tensors]
    if missing:
        raise S2RegError(f"{directory}: saved state is for another run (no {missing[0]}); delete it to start over")
    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(like(tensors[f"param.{name}"], p))
    by_index = list(parameters.values())
    state = {}
    for i, entry in scalars["state"].items():
        param = by_index[int(i)]
        saved = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
        # moments have the parameter's shape and are sharded like it; AdamW keeps "step" a plain scalar
        state[int(i)] = {**entry, **{k: like(v, param) if v.shape == param.shape else v for k, v in saved.items()}}
    optimizer.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
    return int(scalars["step"])


def train(
    model: nn.Module,
    examples: list[Example],
    config: TrainConfig,
    *,
    pad_id: int = 0,
    eval_examples: list[Example] | None = None,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[Progress], None] = lambda _: None,
    on_warning: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train the parameters that require grad (after ``prepare_s2ft`` / ``prepare_pisa``) on ``examples``.

    Under ``torchrun`` (an initialised process group) every rank takes its share of each global batch
    (``batch_size`` per rank); gradients are reduced once per optimizer step, after the last of its
    ``grad_accum`` micro-batches. A model sharded with ``fully_shard`` (``fsdp.shard``) trains as it is
    (FSDP's reduce-scatter, ``set_requires_gradient_sync`` while accumulating); any other is wrapped in DDP. ``state_dir`` keeps a resumable
    state every ``save_every`` steps; ``resume`` continues from it. The first step that moves a trained
    weight by more than ``change.STEP_LIMIT`` of its norm is reported once through ``on_warning``
    (default: a ``LargeStepWarning``); the result carries the run's relative weight change.
    """
    config.check()
    torch.manual_seed(config.seed)
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not parameters:
        raise S2RegError("nothing to train: call prepare_s2ft or prepare_pisa first")
    optimizer = torch.optim.AdamW(parameters.values(), lr=config.lr, weight_decay=config.weight_decay)
    config.check_fills_a_step(len(examples), _rank_world()[1])
    per_epoch = len(_batches(examples, config, 0)) // config.grad_accum
    total = config.total_steps(per_epoch)
    state_dir = Path(state_dir) if state_dir else None
    watch = WeightWatch(model)  # before resuming, so the change is measured from the base weights
    start = _load_state(state_dir, parameters, optimizer, config) if resume and state_dir and state_dir.is_dir() else 0
    watch.settle()
    rank, world = _rank_world()
    warn = on_warning or (lambda message: warnings.warn(message, LargeStepWarning, stacklevel=3))
    sharded = is_sharded(model)
    runner = nn.parallel.DistributedDataParallel(model) if world > 1 and not sharded else model
    device = _input_device(model)
    result = TrainResult(steps=start, tokens=0, seconds=0.0, resumed_from=start)
    if eval_examples:
        result.eval_loss_before = evaluate(model, eval_examples, pad_id)
    model.train()
    started = time.perf_counter()
    step = 0
    for epoch in range(math.ceil(total / per_epoch)):  # --max-steps may need more passes than --epochs
        batches = _batches(examples, config, epoch)
        for first in range(0, per_epoch * config.grad_accum, config.grad_accum):
            if step >= total:
                break
            if step < start:  # resuming: this step's data was already seen
                step += 1
                continue
            factor = _lr_factor(step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * factor
            loss_sum = 0.0
            micros = batches[first:first + config.grad_accum]
            for index, micro in enumerate(micros):
                batch = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
                result.tokens += int(batch["attention_mask"].sum()) * world
                # one reduction per step: the earlier micro-batches only accumulate locally
                accumulating = world > 1 and index < len(micros) - 1
                if sharded:
                    model.set_requires_gradient_sync(not accumulating)
                with runner.no_sync() if accumulating and not sharded else contextlib.nullcontext():
                    loss = runner(**batch).loss / config.grad_accum
                    loss.backward()
                loss_sum += float(loss.detach())
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(parameters.values(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            large = watch.after_step(step)
            if large:
                if not result.large_steps and rank == 0:
                    warn(max(large, key=lambda w: w.relative).message())
                result.large_steps += 1
            result.steps = step
            result.losses.append(loss_sum)
            elapsed = time.perf_counter() - started
            on_step(Progress(step, total, loss_sum, config.lr * factor, result.tokens / max(elapsed, 1e-9)))
            if state_dir and config.save_every and step % config.save_every == 0 and step < total:
                _save_state(state_dir, step, parameters, optimizer, config)
    result.seconds = time.perf_counter() - started
    result.weight_change, result.largest_step_change = watch.relative_change(), watch.largest_step
    if eval_examples:
        result.eval_loss_after = evaluate(model, eval_examples, pad_id)
    if state_dir and rank == 0 and state_dir.exists():
        shutil.rmtree(state_dir)
    return result
