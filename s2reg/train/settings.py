"""Every setting of a training run, in one frozen object: its default, its check and its help.

``TrainOptions`` nests the loop's ``TrainConfig`` and the method's config (``S2FTConfig`` or
``PISAConfig``, each in its method's folder). Each field is declared with ``setting``: its default and
its help live there and nowhere else. ``s2reg train``'s flags are generated from these fields
(``cli/options.py``), ``run_training`` reads nothing else, and a run's state records them, so a resume
with other options is refused by name. Importable without torch: ``s2reg train`` checks its options
before torch is imported (tests/cli/test_no_torch.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import S2RegError
from ..kinds import KINDS, kind_named

SCHEDULES = ("linear", "cosine", "constant")
DTYPES = ("fp32", "bf16")


def setting(default: Any, help: str | None, *, flag: str | None = None, type: Any = None,  # noqa: A002
            choices: tuple[str, ...] | None = None, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, record: Callable[[Any], Any] | None = None,
            cli: bool = True) -> Any:
    """A dataclass field that is also a command-line option.

    ``flag`` defaults to the field's name with dashes; fields of several configs that share a flag (the
    seed, the roles) take one value, and their helps are joined. ``type`` is needed when the default does
    not tell it: ``int``, ``float``, ``str``, ``"names"`` (comma-separated, a tuple), ``"ints"``,
    ``"adapters"`` (repeatable, loaded adapters) or ``"file"`` (an existing file). ``record`` turns the
    value into what a run's state keeps (default: the value itself). ``cli=False``: Python API only.
    """
    metadata = {"help": help, "flag": flag, "type": type, "choices": choices, "low": low, "high": high,
                "low_open": low_open, "high_open": high_open, "record": record, "cli": cli}
    if isinstance(default, (list, dict, set)):
        raise TypeError("a mutable default would be shared by every instance: use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options, with their metadata."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def record_of(config: Any) -> dict[str, Any]:
    """``config`` as a run's state keeps it: every field, nested configs as dicts (JSON-ready)."""
    recorded: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            recorded[f.name] = {"kind": type(value).__name__, **record_of(value)}
        elif f.metadata.get("record") is not None:
            recorded[f.name] = f.metadata["record"](value)
        else:
            recorded[f.name] = list(value) if isinstance(value, tuple) else value
    return recorded


def first_difference(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first ``(dotted name, saved value, current value)`` that differs between two records."""
    for key in dict.fromkeys([*saved, *now]):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


@dataclass(frozen=True)
class TrainConfig:
    """The loop's settings: ``max_steps`` optimizer steps when given (more than ``epochs`` passes over the
    data if need be, as in transformers' Trainer); else ``epochs`` passes. ``lr`` None means the method's
    default (``default_lr``); the loop itself needs a number."""

    epochs: int = setting(1, "Passes over the data.", low=1)
    max_steps: int | None = setting(None, "Train this many optimizer steps, passing over the data as often as "
                                          "needed (overrides --epochs).", type=int, low=1)
    batch_size: int = setting(4, "Examples per micro-batch, per process.", low=1)
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", low=1)
    lr: float | None = setting(None, "Learning rate [default: the method's, docs/training.md].", type=float,
                               low=0, low_open=True)
    warmup_steps: int = setting(0, "Steps of linear warm-up.", low=0)
    schedule: str = setting("linear", "Learning-rate schedule after the warm-up.", choices=SCHEDULES)
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay.", low=0)
    max_grad_norm: float = setting(1.0, "Clip the gradients' global norm to this (0: no clipping).", low=0)
    max_step_change: float = setting(0.01, "Cap every optimizer step's change of a weight an S2FT slice or PISA "
                                           "coefficients train at this share of the weight's norm (0: no cap); a "
                                           "capped step is reported.", low=0)
    seed: int = setting(0, "Seed of the data order, the selection and any new head.")
    save_every: int = setting(50, "Keep a resumable state beside OUTPUT every N steps (0: never).", low=0)

    def check(self) -> None:
        if self.schedule not in SCHEDULES:
            raise S2RegError(f"unknown schedule {self.schedule!r} ({', '.join(SCHEDULES)})")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise S2RegError("batch size, gradient accumulation and epochs must be at least 1")
        if self.peak_lr <= 0:
            raise S2RegError("the learning rate must be positive")

    @property
    def peak_lr(self) -> float:
        """``lr``, which the loop needs as a number (the schedule scales it)."""
        if self.lr is None:
            raise S2RegError("no learning rate: give lr (s2reg train uses the method's default, default_lr)")
        return self.lr

    def check_fills_a_step(self, examples: int, processes: int) -> None:
        """Refuse ``examples`` that cannot give every process one whole optimizer step."""
        needed = self.batch_size * self.grad_accum * processes
        if examples < needed:
            raise S2RegError(f"{examples} training examples do not fill one step of batch {self.batch_size} x "
                             f"{self.grad_accum} accumulation x {processes} processes ({needed} needed)")

    def total_steps(self, per_epoch: int) -> int:
        """Optimizer steps of the run, at ``per_epoch`` steps per pass over the data: ``max_steps`` wins."""
        return self.max_steps or per_epoch * self.epochs


def method_config_class(method: str) -> Any:
    """The config class of ``s2reg train --method`` ``method``: the ``train_config`` its kind registers."""
    configs = {name: kind.train_config for name, kind in KINDS.items() if kind.train_config is not None}
    if method not in configs:
        raise S2RegError(f"unknown method {method!r} ({' or '.join(configs)})")
    return configs[method]


def default_lr(method: str) -> float:
    """The learning rate a method trains at unless told (bench/quality.py and docs/training.md give the evidence)."""
    return method_config_class(method).default_lr


@dataclass(frozen=True)
class TrainOptions:
    """A whole run: the method's config, the loop's settings, and how the model is loaded and placed.

    ``method_config`` is an ``S2FTConfig`` or a ``PISAConfig`` (which method is trained follows from it).
    """

    method_config: Any
    loop: TrainConfig = TrainConfig()
    max_length: int = setting(512, "Tokens per example (longer examples are cut).", low=2)
    dtype: str = setting("fp32", "Dtype the base is loaded and trained in (bf16: bf16 compute, fp32 slices).",
                         choices=DTYPES)
    device: str | None = setting(None, "cpu, cuda, cuda:1 ... [default: CUDA when available].", type=str)
    eval_fraction: float = setting(0.0, "Hold out this share of the data and report its loss before and after.",
                                   low=0, high=1, high_open=True)
    budget: int | None = setting(None, "s2ft: choose --channels and --heads (in --roles) for at most this many "
                                       "trainable parameters.", type=int, low=1)
    arch_file: str | None = setting(None, "A family description (JSON, docs/families.md) for a layout s2reg does "
                                          "not know.", flag="--arch", type="file")
    fsdp: bool = setting(False, "Shard the model over the torchrun processes with FSDP2 (fully_shard on every "
                                "decoder layer and the root): for bases that do not fit one device. bf16 computes "
                                "in bf16 and reduces in fp32.")
    cpu_offload: bool = setting(False, "With --fsdp on CUDA: keep the shards in CPU memory between uses.")
    gradient_checkpointing: bool = setting(False, "Recompute each decoder layer's activations in the backward "
                                                  "(less memory, about a third more time).")
    base_name: str | None = setting(None, "The base's name the adapter records (ORG/NAME on the Hub) [default: "
                                          "the checkpoint's own Hub id, else its directory's name].", type=str)

    @property
    def method(self) -> str:
        return self.method_config.method

    def resolved(self) -> TrainOptions:
        """These options with the method's default learning rate filled in."""
        if self.loop.lr is not None:
            return self
        return dataclasses.replace(self, loop=dataclasses.replace(self.loop, lr=self.method_config.default_lr))

    def check(self) -> None:
        """Everything that can be refused before torch is imported or a model is loaded."""
        self.method_config.check()
        self.resolved().loop.check()
        if not 0 <= self.eval_fraction < 1:
            raise S2RegError("--eval-fraction must be in [0, 1)")
        if self.dtype not in DTYPES:
            raise S2RegError(f"unknown dtype {self.dtype!r} ({' or '.join(DTYPES)})")
        kind = kind_named(self.method)
        if self.budget is not None and kind.size_options is not None:
            raise S2RegError(f"--budget sizes S2FT selections; {self.method.upper()}'s size is {kind.size_options}")
        if self.cpu_offload and not self.fsdp:
            raise S2RegError("--cpu-offload offloads FSDP shards; give --fsdp too")
        if self.fsdp and "WORLD_SIZE" not in os.environ:
            raise S2RegError("--fsdp shards over the processes torchrun starts: "
                             "torchrun --nproc-per-node N -m s2reg train --fsdp ...")

    def record(self) -> dict[str, Any]:
        """What must stay the same for a saved run to be resumed with these options.

        Left out: where and how it computes (device, sharding, checkpointing: a run resumes on another
        number of processes, see ``loop``), the per-process batch (the loop compares the global batch),
        how often it saves, and the name it records.
        """
        recorded = record_of(self.resolved())
        for where in ("device", "fsdp", "cpu_offload", "gradient_checkpointing", "base_name"):
            recorded.pop(where)
        for where in ("batch_size", "save_every"):
            recorded["loop"].pop(where)
        return recorded
