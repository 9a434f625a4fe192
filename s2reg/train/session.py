"""A whole fine-tuning run from a checkpoint directory and a JSONL file: what ``s2reg train`` does."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import S2RegError
from ..format import Adapter
from ..tensors import CheckpointSource
from ..tensors.reader import refuse_leftovers
from .data import read_jsonl, tokenize
from .export import export_adapter
from .loop import Progress, TrainConfig, TrainResult, train
from .pisa.config import PISAConfig
from .pisa.model import prepare_pisa
from .s2ft.config import S2FTConfig
from .s2ft.model import prepare_s2ft

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Run:
    adapter: Adapter
    result: TrainResult
    trainable: int
    device: str


def default_device() -> str:
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


def load_base(base: str | os.PathLike, dtype: str, device: str):
    """The model (causal LM) and tokenizer (None when the checkpoint has none) of a checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(base)
    if not (base / "config.json").is_file():
        raise S2RegError(f"{base}: not a Hugging Face checkpoint directory (no config.json)")
    refuse_leftovers(base)  # transformers would read a half-patched checkpoint
    if dtype not in DTYPES:
        raise S2RegError(f"unknown dtype {dtype!r} (fp32 or bf16)")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype]).to(device)
    has_tokenizer = any((base / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(base) if has_tokenizer else None
    return model, tokenizer


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
) -> Run:
    """Load ``base``, tokenise ``data``, prepare ``method`` ("s2ft" | "pisa"), train, export the adapter."""
    train_config = train_config or TrainConfig()
    device = check_device(device) if device else default_device()
    if not 0 <= eval_fraction < 1:
        raise S2RegError("--eval-fraction must be in [0, 1)")
    records = read_jsonl(data)
    model, tokenizer = load_base(base, dtype, device)
    examples = tokenize(records, tokenizer, max_length)
    random.Random(train_config.seed).shuffle(examples)
    held = int(len(examples) * eval_fraction)
    eval_examples, train_examples = examples[:held], examples[held:]
    calibration = None
    if method == "s2ft":
        config = method_config or S2FTConfig()
        if config.strategy in ("activation", "weight_activation", "gradient"):
            from .data import collate

            pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
            calibration = [{k: v.to(device) for k, v in collate(train_examples[i:i + 4], pad).items()}
                           for i in range(0, min(len(train_examples), 32), 4)]
        prepared = prepare_s2ft(model, config, calibration=calibration)
    elif method == "pisa":
        prepared = prepare_pisa(model, method_config or PISAConfig())
    else:
        raise S2RegError(f"unknown method {method!r} (s2ft or pisa)")
    pad_id = 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    result = train(model, train_examples, train_config, pad_id=pad_id, eval_examples=eval_examples or None,
                   state_dir=state_dir, resume=resume, on_step=on_step)
    training: dict[str, Any] = {
        "method": method, "data": str(data), "examples": len(train_examples), "eval_examples": len(eval_examples),
        "dtype": dtype, "device": device, "max_length": max_length, **vars(train_config), **result.summary(),
    }
    with CheckpointSource(base) as stored:  # the adapter fits the checkpoint as stored (its dtypes)
        adapter = export_adapter(model, base=stored, base_name=base_name or str(Path(base).resolve()), training=training)
    return Run(adapter, result, prepared.num_trainable, device)
