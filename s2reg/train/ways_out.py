"""Every way out of a prepared model gives the trained weights.

The training layers never write the frozen weight (``s2ft/layer.py``: FSDP's gathered shards must stay
the truth); they compute with an effective weight, the frozen one plus the trained slice or PISA delta.
Left alone, ``model.state_dict()`` (and everything built on it: ``save_pretrained``, accelerate,
``torch.save(model.state_dict())``) would hold the BASE weights under the wrapper's names
(``q_proj.base_layer.weight``) and the trainable extras beside them, which no plain model loads as the
fine-tuned one. State-dict hooks on each training wrapper (``wrapper.py``) give the base layer's
tensors their own names back, the effective weight in place of each trained one, and leave the
trainable extras out, so a state dict, a saved checkpoint and ``export_adapter`` all describe the same
trained model (merging the exported adapter into the base gives the state dict's tensors;
tests/train/test_ways_out.py).

Loading such a state dict back into a prepared model splits each trained weight into the frozen
weight and the trainable values where that is exact (an S2FT slice is read back at its indices); a
PISA delta cannot be read back from a dense weight, so that load is refused with the way to resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import S2RegError
from .fsdp import like, whole

if TYPE_CHECKING:
    from .wrapper import TrainingWrapper

_BASE = "base_layer."


def report_trained_weights(wrapper: TrainingWrapper) -> None:
    """Make ``wrapper.state_dict()`` spell its base layer's tensors by their own names, each trained weight
    as ``wrapper.trained`` gives it, and no trainable values; ``load_state_dict`` of such a dict loads
    ``wrapper.split`` of each trained weight (an error of the load where it refuses)."""
    wrapper.register_state_dict_post_hook(_report)
    wrapper.register_load_state_dict_pre_hook(_take_back)


def _report(wrapper: TrainingWrapper, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    trained = wrapper.trained_weights()
    trainables = set(trained.values())
    # the wrapper's entries (its own, then its base layer's) are re-entered in that order, renamed
    own = [(key, state_dict.pop(key)) for key in [k for k in state_dict if k.startswith(prefix)]]
    for key, value in own:
        name = key[len(prefix):]
        if name in trainables:
            continue
        name = name.removeprefix(_BASE)
        if name in trained:
            frozen = wrapper.base_layer._parameters[name]
            with torch.no_grad():  # a sharded (FSDP) weight is gathered, computed whole, and sharded again
                value = like(wrapper.trained(name, whole(frozen.detach())), frozen)
        state_dict[prefix + name] = value


def _take_back(wrapper: TrainingWrapper, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
               missing: list, unexpected: list, errors: list) -> None:
    trained = wrapper.trained_weights()
    for name in wrapper.base_layer.state_dict(keep_vars=True):
        key = prefix + name
        if key not in state_dict:
            continue  # nothing of this module, or a dict in the wrapper's own spelling
        value = state_dict.pop(key)
        state_dict[prefix + _BASE + name] = value
        values = prefix + trained.get(name, "")
        if name not in trained or values in state_dict:
            continue  # an untrained tensor, or a dict that carries the trainable values itself
        try:
            with torch.no_grad():
                state_dict[prefix + _BASE + name], state_dict[values] = wrapper.split(name, whole(value))
        except S2RegError as exc:
            errors.append(f"{key}: {exc}")
