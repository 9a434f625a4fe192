"""S2FT and PISA inside transformers' ``Trainer`` and the TRL trainers built on it (SFT, DPO, GRPO, ...).

The model is prepared by s2reg (``prepare_s2ft`` / ``prepare_pisa``): its trainable parameters are the
slices or coefficients, ordinary ``nn.Parameter`` objects, so the Trainer's optimizer, schedule,
gradient accumulation, gradient checkpointing, autocast and DDP need nothing from us. What the
Trainer gets wrong for such a model is what it saves and loads: a checkpoint of a model that is not a
PEFT model is the whole model (``save_pretrained``), and resuming loads the whole model back.
``S2RegTrainerMixin`` changes exactly that, and nothing else:

- a checkpoint (``save_steps``) and ``save_model`` hold the trainable values (``TRAINABLE_FILE``,
  safetensors, full precision: the optimizer's masters) and the s2reg adapter (``ADAPTER_DIR``)
  beside the Trainer's own optimizer, scheduler and RNG files: the size of the slices, not the model;
- ``resume_from_checkpoint`` and ``load_best_model_at_end`` load the trainable values back exactly,
  after checking that the checkpoint trained the same slices or positions;
- ``save_model`` (the user's, not a checkpoint's) pushes the adapter to the local registry when
  ``s2reg_push="NAME[:TAG]"`` was given, as the Trainer pushes to the Hub.

docs/training.md says why a mixin rather than a callback or a PEFT method.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..errors import S2RegError
from ..format import Adapter
from ..fsatomic import write_file
from ..tensors import CheckpointSource
from .export import export_adapter
from .fsdp import like, whole
from .pisa import layer as pisa_layer
from .s2ft.model import PreparedS2FT

TRAINABLE_FILE = "s2reg-trainable.safetensors"  # the trainable values, by parameter name
ADAPTER_DIR = "adapter"                         # the s2reg adapter, a format-v1 directory
_SELECTION_KEY = "s2reg.selection"              # TRAINABLE_FILE metadata: digest of what the values train


def selection_digest(model: nn.Module) -> str:
    """The sha256 of what each trainable value trains: the tensors, axes and indices of the S2FT slices, or
    the PISA layers' blocks and frequency positions. Two runs share it only if their values mean the same."""
    prepared = getattr(model, "s2reg_prepared", None)
    if isinstance(prepared, PreparedS2FT):
        layout = {name: [s.parameter, s.axis, s.indices.tolist(), s.offset] for name, s in prepared.slices.items()}
    else:
        layout = {name: [list(m.pisa_block), m.pisa_indices.tolist(), m.pisa_scale]
                  for name, m in model.named_modules() if pisa_layer.is_attached(m)}
    if not layout:
        raise S2RegError("the model has no S2FT slices or PISA coefficients (call prepare_s2ft / prepare_pisa first)")
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()


def trainable_file(model: nn.Module) -> bytes:
    """``TRAINABLE_FILE``'s bytes: the trainable values by parameter name, whole (gathered from FSDP shards:
    every rank calls this), and the selection's digest."""
    state = {name: whole(p.detach()).cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    return safetensors_bytes(state, metadata={_SELECTION_KEY: selection_digest(model)})


def load_trainable(model: nn.Module, directory: str | os.PathLike) -> None:
    """Put the values of ``directory/TRAINABLE_FILE`` into ``model``'s trainable parameters, exactly.

    Refused, naming the first difference, when the file trained other slices or positions (another
    seed, selection or method), lacks a parameter or has another shape.
    """
    path = Path(directory) / TRAINABLE_FILE
    if not path.is_file():
        raise S2RegError(f"{directory}: no {TRAINABLE_FILE}; not a checkpoint of an s2reg-prepared model")
    with safe_open(path, "pt") as f:
        saved_digest = (f.metadata() or {}).get(_SELECTION_KEY)
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    if saved_digest != selection_digest(model):
        raise S2RegError(f"{path}: trained other slices or positions than this model's (selection digest "
                         f"{str(saved_digest)[:12]}, this model {selection_digest(model)[:12]}): prepare the model "
                         "with the same config and seed")
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, p in parameters.items():
        if name not in tensors or tuple(tensors[name].shape) != tuple(p.shape):
            found = "missing" if name not in tensors else f"shape {list(tensors[name].shape)}"
            raise S2RegError(f"{path}: {name} is {found}, the model's is {list(p.shape)}")
    extra = sorted(set(tensors) - set(parameters))
    if extra:
        raise S2RegError(f"{path}: holds {extra[0]}, which this model does not train")
    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(like(tensors[name], p))


class S2RegTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass, first: ``class S2FTSFTTrainer(S2RegTrainerMixin, SFTTrainer)``.

    ``model`` must be prepared (``prepare_s2ft`` / ``prepare_pisa``). ``s2reg_base`` is the checkpoint
    directory the model was loaded from (default: the model's ``name_or_path`` when that is a local
    directory): the adapter then fits the checkpoint as stored (its dtypes and fingerprints), as
    ``s2reg train``'s does. ``s2reg_base_name`` names the base in the adapter's manifest.
    ``s2reg_push``: ``NAME[:TAG]`` under which ``save_model`` stores the adapter in the registry
    (``s2reg_store``: a ``Store`` root; default the user's store).
    """

    # the Trainer's own attributes, which the mixin reads (it comes first in a Trainer subclass)
    model: nn.Module
    args: Any
    state: Any
    processing_class: Any

    def __init__(self, *args: Any, s2reg_base: str | os.PathLike | None = None, s2reg_base_name: str | None = None,
                 s2reg_push: str | None = None, s2reg_store: str | os.PathLike | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        selection_digest(self.model)  # refuse an unprepared model now, not at the first save
        if s2reg_base is None:
            guess = Path(str(getattr(self.model.config, "_name_or_path", "") or ""))
            s2reg_base = guess if (guess / "config.json").is_file() else None
        self.s2reg_base, self.s2reg_base_name = s2reg_base, s2reg_base_name
        self.s2reg_push, self.s2reg_store = s2reg_push, s2reg_store

    def export_adapter(self) -> Adapter:
        """The adapter of what the model has learned so far (every rank calls this under FSDP)."""
        args = self.args
        training = {"trainer": type(self).__name__, "global_step": self.state.global_step,
                    "learning_rate": args.learning_rate,
                    "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
                    "per_device_train_batch_size": args.per_device_train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "weight_decay": args.weight_decay, "seed": args.seed, "bf16": bool(args.bf16)}
        if self.s2reg_base is None:
            return export_adapter(self.model, base_name=self.s2reg_base_name, training=training)
        with CheckpointSource(self.s2reg_base) as base:
            return export_adapter(self.model, base=base, base_name=self.s2reg_base_name or str(Path(self.s2reg_base).resolve()),
                                  training=training)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The trainable values and the adapter, in place of the whole model (``state_dict`` is the whole
        model's, which the Trainer computed for ``save_pretrained``: not needed)."""
        directory = Path(output_dir if output_dir is not None else self.args.output_dir)
        trainable = trainable_file(self.model)  # collectives first: every rank takes part, one writes
        adapter = self.export_adapter()
        if not self.args.should_save:
            return
        directory.mkdir(parents=True, exist_ok=True)
        write_file(directory / TRAINABLE_FILE, trainable)
        adapter.save(directory / ADAPTER_DIR, overwrite=True)
        if self.processing_class is not None:  # as the Trainer does: a checkpoint directory is usable as it is
            self.processing_class.save_pretrained(str(directory))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)  # type: ignore[misc]  # the Trainer's, after this mixin
        if self.s2reg_push and not _internal_call and self.args.should_save:
            from ..registry import Store

            Store(self.s2reg_store).push(Path(output_dir or self.args.output_dir) / ADAPTER_DIR, self.s2reg_push)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # ``model`` may be a wrapper (FSDP's ``model_wrapped``) that shares the parameters under other names
        load_trainable(self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_trainable(self.model, self.state.best_model_checkpoint)
