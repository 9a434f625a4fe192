"""A whole fine-tuning run from a checkpoint directory and a JSONL file, as ``TrainOptions`` describe it:
what ``s2reg train`` does. Reads like the run: check, load, prepare, (shard,) train, export, save."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arch import ARCH_FILE
from ..errors import S2RegError
from ..format import Adapter, Stored
from ..kinds import kind_named
from ..fsatomic import check_free
from ..tensors import CheckpointSource
from ..tensors.reader import read_config
from ..tensors.reader import refuse_leftovers
from .data import read_jsonl, tokenize
from .objective import CAUSAL, CLASSIFY, Objective
from .objective import choose as choose_objective
from .export import export_adapter
from .fsdp import shard
from .loop import Progress, TrainResult, train
from .settings import TrainConfig, TrainOptions, default_lr

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


__all__ = ["Run", "TrainConfig", "TrainOptions", "check_device", "default_device", "default_lr", "join_process_group",
           "load_base", "read_tokenizer", "run_training", "state_dir_for"]


@dataclass
class Run:
    adapter: Adapter
    result: TrainResult
    trainable: int
    device: str
    objective: Objective
    options: TrainOptions  # as trained: the method's lr filled in, the heads and channels a budget chose
    stored: Stored | None = None  # where the adapter was saved (rank 0, when an output was given)


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
    with loading_quietly():
        model = auto.from_pretrained(base, dtype=DTYPES[dtype], **extra).to(device)
    return model, read_tokenizer(base)


@contextlib.contextmanager
def loading_quietly() -> Iterator[None]:
    """transformers' own "Loading weights" bar off while it loads: one progress display per command."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def read_tokenizer(base: Path):
    from transformers import AutoTokenizer

    has_tokenizer = any((base / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return AutoTokenizer.from_pretrained(base) if has_tokenizer else None


def join_process_group(fsdp: bool) -> tuple[int, int]:
    """``(rank, world size)``, joining the process group when launched by torchrun / accelerate (WORLD_SIZE > 1,
    or any size for FSDP): NCCL on CUDA, gloo on the CPU."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not fsdp:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _device(options: TrainOptions) -> str:
    """The named device, checked; else CUDA when available (this process's GPU under torchrun)."""
    if options.device:
        return check_device(options.device)
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return default_device()


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end of sequence, else 0."""
    if tokenizer is None:
        return 0
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return token
    return 0


def state_dir_for(output: str | os.PathLike) -> Path:
    """Where the resumable state of a run writing ``output`` is kept: beside it, hidden."""
    output = Path(output)
    return output.parent / f".{output.name}.train-state"


def data_sha256(data: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(data, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_before_loading(base, options: TrainOptions, records: list, device: str) -> tuple[Objective, Any]:
    """Everything that can be refused before the model is loaded; the objective and the family description."""
    options.check()
    if options.cpu_offload and torch.device(device).type != "cuda":
        raise S2RegError("--cpu-offload keeps CUDA shards in CPU memory; on the CPU there is nothing to offload")
    checkpoint_config = read_config(Path(base))
    if checkpoint_config is None:
        raise S2RegError(f"{base}: not a Hugging Face checkpoint directory (no config.json)")
    refuse_leftovers(Path(base))
    # the process group may not be joined yet: torchrun's WORLD_SIZE says how many processes share a step
    examples = len(records) - int(len(records) * options.eval_fraction)
    options.loop.check_fills_a_step(examples, int(os.environ.get("WORLD_SIZE", "1")))
    arch_file: str | Path | None = options.arch_file
    if arch_file is None and (Path(base) / ARCH_FILE).is_file():  # a description saved beside the checkpoint
        arch_file = Path(base) / ARCH_FILE
    return choose_objective(checkpoint_config, records), arch_file


def _split(examples: list, options: TrainOptions) -> tuple[list, list]:
    """``(held out, trained on)``: ``eval_fraction`` of the examples, in a seeded order."""
    random.Random(options.loop.seed).shuffle(examples)
    held = int(len(examples) * options.eval_fraction)
    return examples[:held], examples[held:]


def _prepare(model, options: TrainOptions, train_examples: list, pad: int, arch_file, device: str):
    """The model made trainable by the options' method; the prepared model and the options as chosen."""
    return kind_named(options.method).prepare_training(model, options, train_examples, pad, arch_file, device)


def _training_record(options: TrainOptions, data, objective: Objective, device: str, train_examples: list,
                     eval_examples: list, result: TrainResult) -> dict[str, Any]:
    """What the adapter's manifest says about how it was trained."""
    return {"method": options.method, "objective": objective.as_json(), "data": Path(data).name,
            "data_sha256": data_sha256(data), "examples": len(train_examples), "eval_examples": len(eval_examples),
            "dtype": options.dtype, "device": device, "max_length": options.max_length, **vars(options.loop),
            **result.summary(), "processes": int(os.environ.get("WORLD_SIZE", "1")),
            **({"fsdp": True} if options.fsdp else {})}


def run_training(
    base: str | os.PathLike,
    data: str | os.PathLike,
    options: TrainOptions,
    *,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable[[Progress], None] = lambda _: None,
    on_warning: Callable[[str], None] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> Run:
    """Load ``base``, tokenise ``data``, prepare and train as ``options`` say, export the adapter, and save it
    to ``output`` when given (rank 0; an OUTPUT that exists, or appeared during the run, is replaced only with
    ``overwrite``).

    The objective follows the model and the data (``train/objective.py``). With an ``output``, a resumable
    state is kept beside it (``state_dir_for``) until the adapter is saved; ``resume`` continues it, refusing
    other options or data (``RunState``). Under ``torchrun`` join the process group first
    (``join_process_group``). With ``options.fsdp`` every rank loads the base on the CPU, prepares it, and
    shards it with FSDP2 (``fsdp.shard``); the adapter is gathered on every rank. ``records`` are ``data``
    already read with ``read_jsonl`` (the CLI reads them before importing torch).
    """
    options = options.resolved()
    device = _device(options)
    if output is not None:
        check_free(Path(output), overwrite=overwrite)
    records = records if records is not None else read_jsonl(data)
    objective, arch_file = _check_before_loading(base, options, records, device)
    # FSDP loads on the CPU and moves each rank's shards to the device (the whole model never goes there)
    load_device = "cpu" if options.fsdp else device
    model, tokenizer = load_base(base, options.dtype, load_device, objective, seed=options.loop.seed)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    eval_examples, train_examples = _split(tokenize(records, tokenizer, options.max_length, objective,
                                                    seed=options.loop.seed), options)
    prepared, options = _prepare(model, options, train_examples, pad_id(tokenizer), arch_file, load_device)
    if options.fsdp:
        shard(model, device=device, mixed_precision=options.dtype == "bf16", cpu_offload=options.cpu_offload)
    state = state_dir_for(output) if output is not None else None
    result = train(model, train_examples, options.loop, pad_id=pad_id(tokenizer), eval_examples=eval_examples or None,
                   state_dir=state, resume=resume, on_step=on_step, on_warning=on_warning, keep_state=True,
                   run_identity={"options": options.record(), "data_sha256": data_sha256(data)})
    training = _training_record(options, data, objective, device, train_examples, eval_examples, result)
    with CheckpointSource(base) as stored:  # the adapter fits the checkpoint as stored (its dtypes)
        adapter = export_adapter(model, base=stored, base_name=options.base_name, training=training)
    run = Run(adapter, result, prepared.num_trainable, device, objective, options)
    if output is not None:
        run.stored = _save(adapter, output, overwrite, state_dir_for(output))
    return run


def _save(adapter: Adapter, output, overwrite: bool, state: Path) -> Stored | None:
    """Rank 0 writes the adapter, then drops the run's state (kept while the adapter was not yet safe: a save
    refused because OUTPUT appeared during the run loses no training)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    try:
        stored = adapter.save(output, overwrite=overwrite)
    except FileExistsError:
        raise S2RegError(f"{output} appeared during the run and was not replaced; the trained run is kept in "
                         f"{state}: rerun with --resume (and --overwrite to replace it), or move it away") from None
    if state.exists():
        import shutil

        shutil.rmtree(state)
    return stored
