"""How far training moves the weights it trains: per optimizer step (capped, and reported) and over the
whole run (the training summary's relative weight change).

A trained parameter stands for a target weight ``W`` (its module's stored weight): an S2FT slice
moves ``W`` by its own change, a PISA coefficient vector by the reconstructed delta of its change
(linear in the coefficients), and any other trainable parameter (full fine-tuning) is its own ``W``.
The relative change of a target is ``||dW|| / ||W||`` (Frobenius norms, ``W`` before training).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .fsdp import like, whole
from .wrapper import TrainingWrapper, unchanged

# One optimizer step that moves a target by more than this share of its norm is a runaway: at the
# trainer's default learning rates a step moves a SmolLM2 target by under 0.6% (bench/quality.py),
# while the old PISA settings that wrecked the base moved a v projection by 44% in its first step, and
# S2FT at its default lr on the real Gemma-3-270M (one KV head: --heads 1 trains all of k and v) by 2.5% a
# step, five of which turned its answers into repetition. Uncapped runs are warned past it.
STEP_LIMIT = 0.02


class LargeStepWarning(UserWarning):
    """A training step moved a target weight by more than ``STEP_LIMIT`` of its norm, or was capped."""


@dataclass(frozen=True)
class StepWarning:
    step: int
    target: str
    relative: float
    cap: float = 0.0  # the share the step was scaled back to (0: it was not)

    def message(self) -> str:
        if self.cap:
            return (f"step {self.step} would have moved {self.target} by {self.relative:.1%} of its norm: capped at "
                    f"{self.cap:.1%} (--max-step-change); the learning rate is likely too high for this method")
        return (f"step {self.step} moved {self.target} by {self.relative:.1%} of its norm (more than "
                f"{STEP_LIMIT:.0%} in one step): the learning rate is likely too high for this method")


@dataclass(frozen=True)
class Tracked:
    target: str                                      # the weight's name in the model
    parameter: nn.Parameter
    weight_norm: float
    delta: Callable[[torch.Tensor], torch.Tensor]    # parameter change -> weight change (linear)
    capped: bool = True                              # s2reg's own (slices, coefficients); others only reported


def tracked(model: nn.Module) -> list[Tracked]:
    """The trainable parameters of ``model`` and the target weights they move."""
    found = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if isinstance(module, TrainingWrapper):  # s2reg's slices and coefficients: the wrapper says what they move
            weight_name, delta = module.moves(attr)
            weight, target = module.base_layer.get_parameter(weight_name), f"{module_name}.{weight_name}"
        else:  # full fine-tuning, another method's factors: watched, not capped
            weight, delta, target = p, unchanged, name
        norm = float(whole(weight.detach()).double().norm())
        if norm > 0:  # a zero-initialised factor (LoRA's B) has no scale to be relative to
            found.append(Tracked(target, p, norm, delta, capped=weight is not p))
    return found


class WeightWatch:
    """Keeps the trained parameters' starting and previous values; measures each step and the total."""

    def __init__(self, model: nn.Module):
        self.targets = tracked(model)
        self.start = [whole(t.parameter.detach()).clone() for t in self.targets]
        self.previous = [s.clone() for s in self.start]
        self.largest_step = 0.0

    def settle(self) -> None:
        """Measure the next step from the current values (after a resumed state was loaded)."""
        for t, previous in zip(self.targets, self.previous, strict=True):
            previous.copy_(whole(t.parameter.detach()))

    def after_step(self, step: int, cap: float = 0.0) -> list[StepWarning]:
        """Targets this step moved too far. With ``cap``, a step that moved a slice's or coefficients' target by
        more than ``cap`` of its norm is scaled back to exactly that (the parameter is rewritten: the change is
        linear in it); other steps past ``STEP_LIMIT`` are only reported."""
        warnings = []
        with torch.no_grad():
            for t, previous in zip(self.targets, self.previous, strict=True):
                current = whole(t.parameter.detach())
                moved = float(t.delta(current - previous).double().norm()) / t.weight_norm
                if cap and t.capped and moved > cap:
                    current = previous + (current - previous) * (cap / moved)
                    t.parameter.copy_(like(current, t.parameter))
                    warnings.append(StepWarning(step, t.target, moved, cap))
                elif moved > STEP_LIMIT and not (cap and t.capped):
                    warnings.append(StepWarning(step, t.target, moved))
                self.largest_step = max(self.largest_step, min(moved, cap) if cap and t.capped else moved)
                previous.copy_(current)
        return warnings

    def relative_change(self) -> float:
        """``||W_end - W_start|| / ||W_start||`` over all trained targets together (0 when nothing is tracked)."""
        changed = total = 0.0
        with torch.no_grad():
            for t, start in zip(self.targets, self.start, strict=True):
                changed += float(t.delta(whole(t.parameter.detach()) - start).double().pow(2).sum())
                total += t.weight_norm ** 2
        return math.sqrt(changed / total) if total else 0.0
