"""A training run's settings, importable without torch: ``s2reg train`` parses and checks its options (and
shows these defaults in ``--help``) before torch is imported (tests/cli/test_no_torch.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import S2RegError

# Learning rates at which each method learns without wrecking the base (bench/quality.py;
# docs/training.md gives the evidence). PISA's lr is on the isometric scale (PISAConfig.scale_for).
DEFAULT_LR = {"s2ft": 1e-3, "pisa": 1.25e-3}


def default_lr(method: str) -> float:
    if method not in DEFAULT_LR:
        raise S2RegError(f"unknown method {method!r} (s2ft or pisa)")
    return DEFAULT_LR[method]


@dataclass
class TrainConfig:
    """``max_steps`` optimizer steps when given (more than ``epochs`` passes over the data if need be, as in
    transformers' Trainer); else ``epochs`` passes."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 50

    def check(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise S2RegError(f"unknown schedule {self.schedule!r} (linear, cosine or constant)")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise S2RegError("batch size, gradient accumulation and epochs must be at least 1")
        if self.lr <= 0:
            raise S2RegError("the learning rate must be positive")

    def check_fills_a_step(self, examples: int, processes: int) -> None:
        """Refuse ``examples`` that cannot give every process one whole optimizer step."""
        needed = self.batch_size * self.grad_accum * processes
        if examples < needed:
            raise S2RegError(f"{examples} training examples do not fill one step of batch {self.batch_size} x "
                             f"{self.grad_accum} accumulation x {processes} processes ({needed} needed)")

    def total_steps(self, per_epoch: int) -> int:
        """Optimizer steps of the run, at ``per_epoch`` steps per pass over the data: ``max_steps`` wins."""
        return self.max_steps or per_epoch * self.epochs
