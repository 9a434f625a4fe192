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
from .settings import TrainConfig, first_difference


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
    large_steps: int = 0              # steps capped, or (uncapped) past change.STEP_LIMIT

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
    compute = getattr(model, "s2reg_compute_device", None)
    if isinstance(compute, torch.device):
        return compute
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
               "max_grad_norm", "max_step_change", "seed")


def _run_record(config: TrainConfig, identity: dict[str, Any]) -> dict[str, Any]:
    """The run as the state records it: the caller's identity of it (options, data), the loop's settings, and
    the global batch (what each step consumes: the processes may change, the global batch may not)."""
    _, world = _rank_world()
    return {**identity, **{f: getattr(config, f) for f in _RUN_FIELDS}, "global_batch": config.batch_size * world,
            "batch_size": config.batch_size, "processes": world}


def _rng_state() -> tuple[dict[str, torch.Tensor], Any]:
    """Every random generator the steps draw from (dropout): torch's (and CUDA's), and Python's."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return tensors, random.getstate()


def _set_rng_state(tensors: dict[str, torch.Tensor], python_state: Any) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if python_state is not None:
        version, internal, gauss = python_state
        random.setstate((version, tuple(internal), gauss))


class RunState:
    """The resumable state of a run in ``directory``: whole tensors (gathered from the ranks' shards under
    FSDP: every rank calls ``save``), written by rank 0 as safetensors + JSON, so a run resumes on any number
    of processes that keeps the global batch; the run's record, refused on resume where it differs."""

    def __init__(self, directory: str | os.PathLike, config: TrainConfig, identity: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.config = config
        self.identity = identity or {}

    def exists(self) -> bool:
        return self.directory.is_dir()

    def save(self, step: int, parameters: dict[str, nn.Parameter], optimizer) -> None:
        state = optimizer.state_dict()
        tensors = {f"param.{name}": whole(p.detach()).cpu().contiguous() for name, p in parameters.items()}
        rng, python_rng = _rng_state()
        scalars: dict[str, Any] = {"step": step, "run": _run_record(self.config, self.identity),
                                   "param_groups": state["param_groups"], "state": {}, "python_rng": python_rng}
        for index, entry in state["state"].items():
            scalars["state"][str(index)] = {}
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{index}.{key}"] = whole(value.detach()).cpu().contiguous()
                else:
                    scalars["state"][str(index)][key] = value
        if _rank_world()[0] != 0:
            return
        with building(self.directory, overwrite=True) as staging:
            save_file(tensors | rng, staging / "state.safetensors")
            (staging / "state.json").write_text(json.dumps(scalars))

    def check_same_run(self, saved: dict[str, Any]) -> None:
        now = _run_record(self.config, self.identity)
        compared = {k: v for k, v in now.items() if k not in ("batch_size", "processes")}
        found = first_difference({k: saved.get(k) for k in compared}, compared)
        if found is None:
            return
        key, was, is_now = found
        if key == "global_batch":
            key, was = "global batch", f"{was} ({saved['batch_size']} per process x {saved['processes']})"
        raise S2RegError(f"{self.directory}: the saved run has {key} {was}, this one {is_now}; resume with the same "
                         "options and data (the global batch is --batch-size x processes), or delete it to start over")

    def load(self, parameters: dict[str, nn.Parameter], optimizer) -> int:
        """Restore the parameters, the optimizer and the random generators; the step to continue from."""
        try:
            tensors = load_file(self.directory / "state.safetensors")
            scalars = json.loads((self.directory / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise S2RegError(f"{self.directory}: unreadable training state ({exc}); delete it to start over") from None
        self.check_same_run(scalars.get("run", {}))
        missing = [n for n in parameters if f"param.{n}" not in tensors]
        if missing:
            raise S2RegError(f"{self.directory}: saved state is for another run (no {missing[0]}); delete it to "
                             "start over")
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
        _set_rng_state(tensors, scalars.get("python_rng"))
        return int(scalars["step"])

    def discard(self) -> None:
        if _rank_world()[0] == 0 and self.directory.exists():
            shutil.rmtree(self.directory)


class _Stepper:
    """One optimizer step: its micro-batches forward and backward (one gradient reduction, after the last),
    clipping, the update. DDP wraps the model unless FSDP already shards it."""

    def __init__(self, model: nn.Module, parameters: dict[str, nn.Parameter], config: TrainConfig, pad_id: int):
        _, self.world = _rank_world()
        self.model, self.config, self.pad_id = model, config, pad_id
        self.parameters = parameters
        self.optimizer = torch.optim.AdamW(parameters.values(), lr=config.peak_lr, weight_decay=config.weight_decay)
        self.sharded = is_sharded(model)
        self.ddp = nn.parallel.DistributedDataParallel(model) if self.world > 1 and not self.sharded else None
        self.runner = model if self.ddp is None else self.ddp
        self.device = _input_device(model)

    def __call__(self, micros: list[list[Example]], lr: float) -> tuple[float, int]:
        """The step's loss (summed over its micro-batches) and the tokens all processes read."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, tokens = 0.0, 0
        for index, micro in enumerate(micros):
            batch = {k: v.to(self.device) for k, v in collate(micro, self.pad_id).items()}
            tokens += int(batch["attention_mask"].sum()) * self.world
            accumulating = self.world > 1 and index < len(micros) - 1  # reduce once, after the last micro-batch
            if is_sharded(self.model):
                self.model.set_requires_gradient_sync(not accumulating)
            with self.ddp.no_sync() if accumulating and self.ddp is not None else contextlib.nullcontext():
                loss = self.runner(**batch).loss / self.config.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters.values(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, tokens


def _steps(examples: list[Example], config: TrainConfig, start: int):
    """``(step, its micro-batches)`` for every step from ``start`` on, and the run's total: epochs of whole
    global batches in a seeded order, as many passes as ``max_steps`` needs."""
    per_epoch = len(_batches(examples, config, 0)) // config.grad_accum
    total = config.total_steps(per_epoch)

    def steps():
        epoch, batches = None, []
        for step in range(start, total):
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                batches = _batches(examples, config, epoch)
            first = step % per_epoch * config.grad_accum
            yield step, batches[first:first + config.grad_accum]

    return steps(), total


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not parameters:
        raise S2RegError("nothing to train: call prepare_s2ft or prepare_pisa first")
    return parameters


def train(model: nn.Module, examples: list[Example], config: TrainConfig, *, pad_id: int = 0,
          eval_examples: list[Example] | None = None, state_dir: str | os.PathLike | None = None, resume: bool = False,
          on_step: Callable[[Progress], None] = lambda _: None, on_warning: Callable[[str], None] | None = None,
          run_identity: dict[str, Any] | None = None, keep_state: bool = False) -> TrainResult:
    """Train the parameters that require grad (after ``prepare_s2ft`` / ``prepare_pisa``) on ``examples``.

    Under ``torchrun`` every rank takes ``batch_size`` of each global batch; gradients are reduced once
    per optimizer step (DDP, or FSDP's reduce-scatter for a model sharded with ``fully_shard``).
    ``state_dir`` keeps a resumable state every ``save_every`` steps (``RunState``); ``resume``
    continues it bit for bit, refusing other settings or another ``run_identity`` (what else defines the
    run: ``run_training`` passes its options and the data's sha256); ``keep_state`` leaves the final state
    for the caller to drop once the result is safe. Steps are capped at ``max_step_change`` and the first
    runaway is reported through ``on_warning`` (default: a ``LargeStepWarning``); the result carries the
    run's relative weight change.
    """
    config.check()
    torch.manual_seed(config.seed)
    parameters = _trainable(model)
    config.check_fills_a_step(len(examples), _rank_world()[1])
    stepper = _Stepper(model, parameters, config, pad_id)
    state = RunState(state_dir, config, run_identity) if state_dir else None
    watch, start = _start(model, state, resume, parameters, stepper.optimizer)
    steps, total = _steps(examples, config, start)
    result = TrainResult(steps=start, tokens=0, seconds=0.0, resumed_from=start)
    if eval_examples:
        result.eval_loss_before = evaluate(model, eval_examples, pad_id)
    model.train()
    started = time.perf_counter()
    for step, micros in steps:
        lr = config.peak_lr * _lr_factor(step, total, config)
        loss, tokens = stepper(micros, lr)
        result.steps, result.tokens = step + 1, result.tokens + tokens
        result.losses.append(loss)
        _watch_step(watch, step + 1, result, on_warning, config.max_step_change)
        on_step(Progress(step + 1, total, loss, lr, result.tokens / max(time.perf_counter() - started, 1e-9)))
        if state and config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total:
            state.save(step + 1, parameters, stepper.optimizer)
    result.seconds = time.perf_counter() - started
    result.weight_change, result.largest_step_change = watch.relative_change(), watch.largest_step
    if eval_examples:
        result.eval_loss_after = evaluate(model, eval_examples, pad_id)
    if state:  # kept for a caller who drops it once the result is safe, else dropped now
        state.save(result.steps, parameters, stepper.optimizer) if keep_state else state.discard()
    return result


def _start(model: nn.Module, state: RunState | None, resume: bool, parameters, optimizer) -> tuple[WeightWatch, int]:
    """The weight watch (taken before resuming, so the change is measured from the base weights) and the
    step to start from (the saved one when resuming)."""
    watch = WeightWatch(model)
    start = state.load(parameters, optimizer) if resume and state and state.exists() else 0
    watch.settle()
    return watch, start


def _watch_step(watch: WeightWatch, step: int, result: TrainResult, on_warning: Callable[[str], None] | None,
                cap: float) -> None:
    """Measure how far the step moved each target, capping it at ``cap``; the first runaway step is reported
    once (by rank 0)."""
    large = watch.after_step(step, cap)
    if not large:
        return
    if not result.large_steps and _rank_world()[0] == 0:
        message = max(large, key=lambda w: w.relative).message()
        if on_warning:
            on_warning(message)
        else:
            warnings.warn(message, LargeStepWarning, stacklevel=4)
    result.large_steps += 1
