"""Every way out of a prepared model gives the trained weights.

The training layers never write the frozen weight (``s2ft/layer.py``: FSDP's gathered shards must stay
the truth); they compute with an effective weight, the frozen one plus the trained slice or PISA delta.
Left alone, ``model.state_dict()`` (and everything built on it: ``save_pretrained``, accelerate,
``torch.save(model.state_dict())``) would hold the BASE weights and the trainable extras beside them,
which no plain model loads as the fine-tuned one. A state-dict hook on each trained module puts the
effective weight under the weight's own name and leaves the trainable extras out, so a state dict,
a saved checkpoint and ``export_adapter`` all describe the same trained model (merging the exported
adapter into the base gives the state dict's tensors; tests/train/test_ways_out.py).

Loading such a state dict back into a prepared model splits each trained weight into the frozen
weight and the trainable values where that is exact (an S2FT slice is read back at its indices); a
PISA delta cannot be read back from a dense weight, so that load is refused with the way to resume.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .fsdp import like, whole

Trained = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (module, frozen weight) -> effective weight
Split = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # trained -> (frozen, trainable)


def report_trained_weight(module: nn.Module, weight: str, trainable: str, trained: Trained,
                          split: Split | None) -> None:
    """Make ``module.state_dict()`` hold ``trained(module, <weight>)`` as ``weight`` and no ``trainable``;
    ``load_state_dict`` of such a dict loads ``split(module, trained weight)`` (refused when ``split`` is None)."""
    module.register_state_dict_post_hook(partial(_report, weight=weight, trainable=trainable, trained=trained))
    module.register_load_state_dict_pre_hook(partial(_take_back, weight=weight, trainable=trainable, split=split))


def _report(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *, weight: str, trainable: str,
            trained: Trained) -> None:
    key = prefix + weight
    if key in state_dict:
        frozen = module._parameters[weight]
        with torch.no_grad():  # a sharded (FSDP) weight is gathered, computed whole, and sharded again
            state_dict[key] = like(trained(module, whole(frozen.detach())), frozen)
    state_dict.pop(prefix + trainable, None)


def _take_back(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool, missing: list,
               unexpected: list, errors: list, *, weight: str, trainable: str, split: Split | None) -> None:
    key, values = prefix + weight, prefix + trainable
    if key not in state_dict or values in state_dict:
        return  # nothing of this module, or a dict that carries the trainable values itself
    if split is None:
        errors.append(f"{key} is a trained weight of a PISA layer, whose coefficients cannot be read back from it: "
                      "resume from the trainer's checkpoint (its trainable state) or load the s2reg adapter")
        return
    with torch.no_grad():
        state_dict[key], state_dict[values] = split(module, whole(state_dict[key]))
