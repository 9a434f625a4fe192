"""A whole fine-tuning run from a checkpoint directory and a JSONL file: what ``s2reg train`` does."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arch import ARCH_FILE
from ..errors import S2RegError
from ..format import Adapter
from ..tensors import CheckpointSource
from ..tensors.reader import read_config
from ..tensors.reader import refuse_leftovers
from .data import read_jsonl, tokenize
from .objective import CAUSAL, CLASSIFY, Objective
from .objective import choose as choose_objective
from .budget import fit_budget
from .export import export_adapter
from .fsdp import agree, shard
from .loop import Progress, TrainResult, train
from .pisa.config import PISAConfig
from .pisa.model import prepare_pisa
from .s2ft.config import S2FTConfig
from .s2ft.model import prepare_s2ft
from .settings import TrainConfig, default_lr

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Run:
    adapter: Adapter
    result: TrainResult
    trainable: int
    device: str
    objective: Objective
    method_config: S2FTConfig | PISAConfig  # as trained (with the heads and channels a budget chose)


def default_device() -> str:
    """The device of every command that loads a model when none is named (train, generate): CUDA when available."""
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE_TYPES = {  # device type -> whether this machine has one (asked when needed, not at import)
    "cpu": lambda: True,
    "cuda": lambda: torch.cuda.is_available(),
    "mps": lambda: torch.backends.mps.is_available(),
}


def check_device(device: str) -> str:
    """``device`` if this machine has it; a one-line S2RegError otherwise (before any model is loaded)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise S2RegError(f"{device!r} is not a device s2reg trains on ({', '.join(DEVICE_TYPES)}, or cuda:N)")
    if not DEVICE_TYPES[parsed.type]():
        raise S2RegError(f"device {device!r}: {parsed.type.upper()} is not available on this machine (try cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise S2RegError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_base(base: str | os.PathLike, dtype: str, device: str, objective: Objective = Objective(CAUSAL), *,
              seed: int = 0):
    """The model (for ``objective``) and tokenizer (None when the checkpoint has none) of a checkpoint directory.

    A head the checkpoint lacks (a classifier; the masked-LM head of a bare ``BertModel`` checkpoint) is
    created from ``seed``, so the same head can be built again beside the adapter.
    """
    import transformers

    base = Path(base)
    if not (base / "config.json").is_file():
        raise S2RegError(f"{base}: not a Hugging Face checkpoint directory (no config.json)")
    refuse_leftovers(base)  # transformers would read a half-patched checkpoint
    if dtype not in DTYPES:
        raise S2RegError(f"unknown dtype {dtype!r} (fp32 or bf16)")
    auto = getattr(transformers, objective.auto_class)
    extra = {"num_labels": len(objective.labels)} if objective.kind == CLASSIFY else {}
    torch.manual_seed(seed)
    model = auto.from_pretrained(base, dtype=DTYPES[dtype], **extra).to(device)
    return model, read_tokenizer(base)


def read_tokenizer(base: Path):
    from transformers import AutoTokenizer

    has_tokenizer = any((base / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return AutoTokenizer.from_pretrained(base) if has_tokenizer else None


def run_training(
    base: str | os.PathLike,
    data: str | os.PathLike,
    method: str,
    *,
    method_config: S2FTConfig | PISAConfig | None = None,
    train_config: TrainConfig | None = None,
    max_length: int = 512,
    dtype: str = "fp32",
    device: str | None = None,
    eval_fraction: float = 0.0,
    base_name: str | None = None,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[Progress], None] = lambda _: None,
    on_warning: Callable[[str], None] | None = None,
    arch_file: str | os.PathLike | None = None,
    budget: int | None = None,
    fsdp: bool = False,
    cpu_offload: bool = False,
    gradient_checkpointing: bool = False,
    records: list[dict[str, Any]] | None = None,
) -> Run:
    """Load ``base``, tokenise ``data``, prepare ``method`` ("s2ft" | "pisa"), train, export the adapter.

    The objective follows the model and the data (``train/objective.py``); ``arch_file`` is a family
    description for a layout s2reg does not know (docs/families.md; default: ``s2reg-arch.json`` beside
    the checkpoint, when there is one). ``budget`` (S2FT) replaces the config's heads and channels by the
    most that train at most that many parameters (``train/budget.py``).

    ``fsdp`` (under ``torchrun``): every rank loads the base on the CPU, prepares it, and shards it with
    FSDP2 (``fsdp.shard``: bf16 compute with fp32 reductions for ``dtype="bf16"``; ``cpu_offload`` keeps
    the shards in CPU memory); the adapter is gathered on every rank (write it from rank 0).
    ``gradient_checkpointing`` recomputes each decoder layer's activations in the backward.
    ``records`` are ``data`` already read with ``read_jsonl`` (the CLI reads them before importing torch).
    """
    train_config = train_config or TrainConfig(lr=default_lr(method))
    device = check_device(device) if device else default_device()
    if not 0 <= eval_fraction < 1:
        raise S2RegError("--eval-fraction must be in [0, 1)")
    if budget is not None and method != "s2ft":
        raise S2RegError("--budget sizes S2FT selections; PISA's size is --coefficients per --block")
    if cpu_offload and not fsdp:
        raise S2RegError("--cpu-offload offloads FSDP shards; give --fsdp too")
    if cpu_offload and torch.device(device).type != "cuda":
        raise S2RegError("--cpu-offload keeps CUDA shards in CPU memory; on the CPU there is nothing to offload")
    records = records if records is not None else read_jsonl(data)
    checkpoint_config = read_config(Path(base))
    if checkpoint_config is None:
        raise S2RegError(f"{base}: not a Hugging Face checkpoint directory (no config.json)")
    refuse_leftovers(Path(base))
    # before any model is loaded (the process group is not joined yet: torchrun's WORLD_SIZE says how many)
    train_config.check_fills_a_step(len(records) - int(len(records) * eval_fraction),
                                    int(os.environ.get("WORLD_SIZE", "1")))
    objective = choose_objective(checkpoint_config, records)
    if arch_file is None and (Path(base) / ARCH_FILE).is_file():  # a description saved beside the checkpoint
        arch_file = Path(base) / ARCH_FILE
    # FSDP loads on the CPU and moves each rank's shards to the device (the whole model never goes there)
    load_device = "cpu" if fsdp else device
    model, tokenizer = load_base(base, dtype, load_device, objective, seed=train_config.seed)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    examples = tokenize(records, tokenizer, max_length, objective, seed=train_config.seed)
    random.Random(train_config.seed).shuffle(examples)
    held = int(len(examples) * eval_fraction)
    eval_examples, train_examples = examples[:held], examples[held:]
    calibration = None
    if method == "s2ft":
        config = method_config or S2FTConfig()
        if budget is not None:
            config = fit_budget(model, budget, config, arch_file=arch_file)
        if config.strategy in ("activation", "weight_activation", "gradient"):
            from .data import collate

            pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
            calibration = [{k: v.to(load_device) for k, v in collate(train_examples[i:i + 4], pad).items()}
                           for i in range(0, min(len(train_examples), 32), 4)]
        prepared = prepare_s2ft(model, config, calibration=calibration, arch_file=arch_file)
        agree(prepared.selection, "S2FT slices")
    elif method == "pisa":
        prepared = prepare_pisa(model, method_config or PISAConfig(), arch_file=arch_file)
    else:
        raise S2RegError(f"unknown method {method!r} (s2ft or pisa)")
    if fsdp:
        shard(model, device=device, mixed_precision=dtype == "bf16", cpu_offload=cpu_offload)
    pad_id = 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    result = train(model, train_examples, train_config, pad_id=pad_id, eval_examples=eval_examples or None,
                   state_dir=state_dir, resume=resume, on_step=on_step, on_warning=on_warning)
    training: dict[str, Any] = {
        "method": method, "objective": objective.as_json(), "data": str(data), "examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "dtype": dtype, "device": device, "max_length": max_length, **vars(train_config), **result.summary(),
        "processes": int(os.environ.get("WORLD_SIZE", "1")), **({"fsdp": True} if fsdp else {}),
    }
    with CheckpointSource(base) as stored:  # the adapter fits the checkpoint as stored (its dtypes)
        adapter = export_adapter(model, base=stored, base_name=base_name or str(Path(base).resolve()), training=training)
    return Run(adapter, result, prepared.num_trainable, device, objective, prepared.config)
