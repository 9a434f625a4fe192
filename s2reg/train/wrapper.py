"""Training layers wrap modules, peft's way.

Preparing a model for S2FT or PISA replaces each trained module (an ``nn.Linear``, GPT-2's ``Conv1D``,
a transformers fused-experts container) in its parent by a small wrapper module: the original module
as ``base_layer`` (frozen, never written) and the trainable values beside it, with a forward that
computes with the effective weights. The original module keeps its class, parameters and forward, so
``unwrap`` gives the very module back, and nothing is patched onto an instance.

The model around it sees the module it knew: attribute reads the wrapper does not answer go to
``base_layer`` (``q_proj.weight``, ``experts.num_experts``; ``model.get_parameter`` with the
original names), the trainable parameters keep the names they always had (``<module>.s2ft_slice``,
``<module>.s2ft_<parameter>``, ``<module>.pisa_coefficients``), and ``state_dict()`` spells the base
layer's tensors under their own names (``ways_out.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import S2RegError
from .ways_out import report_trained_weights

Delta = Callable[[torch.Tensor], torch.Tensor]  # a change of trainable values -> the change of the weight (linear)


class TrainingWrapper(nn.Module):
    """A frozen ``base_layer`` and trainable values standing in for some of its weights.

    Subclasses say which weight each trainable parameter trains (``trained_weights``), what a weight
    is with the trained values put in (``trained``), how a trained weight splits back (``split``), and
    how a change of the values moves the weight (``moves``).
    """

    base_layer: Any  # an nn.Module whose own attributes (weight, bias, num_experts...) the subclasses read

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        report_trained_weights(self)

    def __getattr__(self, name: str) -> Any:  # whatever the base layer holds
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":  # not set yet (inside __init__): no recursion
                raise
            return getattr(self.base_layer, name)

    def trained_weights(self) -> dict[str, str]:
        """``{base layer weight name: trainable parameter name}``."""
        raise NotImplementedError

    def trained(self, weight: str, frozen: torch.Tensor) -> torch.Tensor:
        """The base layer's ``weight`` (whole value ``frozen``) with the trained values put in."""
        raise NotImplementedError

    def split(self, weight: str, trained: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A trained ``weight`` split into the frozen weight and the trainable values (an S2RegError where
        the values cannot be read back from the weight)."""
        raise NotImplementedError

    def moves(self, trainable: str) -> tuple[str, Delta]:
        """The base layer weight the parameter ``trainable`` trains, and the change it makes of a value change."""
        raise NotImplementedError


def unchanged(change: torch.Tensor) -> torch.Tensor:
    """The ``Delta`` of trainable values that are a part of the weight (or the weight itself)."""
    return change


def refuse_prepared(model: nn.Module) -> None:
    """Refuse a model that holds training wrappers already: its layers are not the model's own any more."""
    wrapped = next((n for n, m in model.named_modules() if isinstance(m, TrainingWrapper)), None)
    if wrapped is not None:
        kind = type(model.get_submodule(wrapped)).__name__
        raise S2RegError(f"the model is already prepared for training ({wrapped} is a {kind}): "
                         "s2reg.train.wrapper.unwrap(model) gives its own layers back")


Wrapper = TypeVar("Wrapper", bound=TrainingWrapper)


def wrap(model: nn.Module, name: str, build: Callable[[nn.Module], Wrapper]) -> Wrapper:
    """Replace the submodule ``name`` of ``model`` by ``build(submodule)``; return the wrapper."""
    current = model.get_submodule(name)
    if isinstance(current, TrainingWrapper):
        raise S2RegError(f"{name} is already prepared for training ({type(current).__name__})")
    wrapper = build(current)
    _put(model, name, wrapper)
    return wrapper


def unwrap(model: nn.Module) -> None:
    """Put every wrapped module back in its parent: the model holds its original modules again (their
    weights were never written) and no trainable values; ``model.s2reg_prepared`` is dropped."""
    wrapped = [name for name, module in model.named_modules() if isinstance(module, TrainingWrapper)]
    for name in wrapped:
        wrapper = model.get_submodule(name)
        assert isinstance(wrapper, TrainingWrapper)
        _put(model, name, wrapper.base_layer)
    if "s2reg_prepared" in vars(model):
        del model.s2reg_prepared


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    if not child:
        raise S2RegError("the model itself is a single layer: wrap the model that holds it")
    setattr(model.get_submodule(parent_name), child, module)
