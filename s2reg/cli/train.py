"""``s2reg train``: fine-tune a checkpoint with S2FT or PISA and write the adapter."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..fsatomic import check_free
from ..train.data import read_jsonl
from ..train.pisa.config import PISAConfig
from ..train.s2ft.config import STRATEGIES, S2FTConfig
from ..train.settings import DEFAULT_LR, TrainConfig, default_lr
from . import render
from .common import AdapterType, json_option, overwrite_option


def _distributed(fsdp: bool) -> tuple[int, int]:
    """Join the process group when launched by torchrun / accelerate (WORLD_SIZE > 1, or any size for FSDP)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or fsdp:
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world
    return 0, 1


class _StepBar:
    """The training progress bar, started by the first optimizer step: a run refused while it loads (bad
    data, bad base) prints no empty bar."""

    def __init__(self, shown: bool):
        self.shown = shown
        self.bar = None
        self.task = None

    def __enter__(self) -> _StepBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, p) -> None:
        if not self.shown:
            return
        if self.bar is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=render.errors)
            self.bar.start()
            self.task = self.bar.add_task("train", total=p.total, loss=p.loss, lr=p.lr, tps=p.tokens_per_second)
        self.bar.update(self.task, completed=p.step, total=p.total, loss=p.loss, lr=p.lr, tps=p.tokens_per_second)


@click.command("train")
@click.option("--base", "base", required=True, type=click.Path(exists=True, file_okay=False), help="Checkpoint directory.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSONL: text, prompt/completion, messages, or input_ids; encoders: text (masked-LM) or text + label "
                   "(classification).")
@click.option("--method", type=click.Choice(["s2ft", "pisa"]), required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Adapter directory to write.")
@click.option("--push", "push_ref", help="Also store the adapter in the local registry as NAME[:TAG].")
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--max-steps", type=click.IntRange(min=1),
              help="Train this many optimizer steps, passing over the data as often as needed (overrides --epochs).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1), help="Per process.")
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help=f"Learning rate (default: {DEFAULT_LR['s2ft']:g} for s2ft, {DEFAULT_LR['pisa']:g} for pisa; docs/training.md).")
@click.option("--warmup-steps", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"]), default="linear", show_default=True)
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option("--max-length", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--eval-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Hold out this share of the data and report its loss before and after.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (state kept beside OUTPUT).")
@click.option("--channels", type=click.IntRange(min=0), help=f"s2ft: FFN channels per layer [default: {S2FTConfig.channels}].")
@click.option("--heads", type=click.IntRange(min=0), help=f"s2ft: attention heads per layer [default: {S2FTConfig.heads}].")
@click.option("--budget", type=click.IntRange(min=1),
              help="s2ft: choose --channels and --heads (in --roles) for at most this many trainable parameters.")
@click.option("--roles", help="Projections to train, among the family's q,k,v,o,up,gate,down (default: s2ft o for "
              "heads and down for channels; pisa every projection that is a matmul layer of its own).")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="random", show_default=True, help="s2ft: selection.")
@click.option("--order", type=click.Choice(["largest", "smallest"]), default="largest", show_default=True)
@click.option("--exclude", "exclude", multiple=True, type=AdapterType(),
              help="s2ft: choose channels/heads disjoint from this adapter (repeatable).")
@click.option("--block", default=64, show_default=True, type=click.IntRange(min=1), help="pisa: block size.")
@click.option("--coefficients", default=32, show_default=True, type=click.IntRange(min=1), help="pisa: per block.")
@click.option("--targets", help="pisa: comma-separated module names, full or short (q_proj,v_proj), instead of --roles.")
@click.option("--fsdp", is_flag=True,
              help="Shard the model over the torchrun processes with FSDP2 (fully_shard on every decoder layer "
                   "and the root): for bases that do not fit one device. bf16 computes in bf16 and reduces in fp32.")
@click.option("--cpu-offload", is_flag=True, help="With --fsdp on CUDA: keep the shards in CPU memory between uses.")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute each decoder layer's activations in the backward (less memory, about a third more time).")
@click.option("--arch", "arch_file", type=click.Path(exists=True, dir_okay=False),
              help="A family description (JSON, docs/families.md) for a layout s2reg does not know.")
@overwrite_option
@json_option
def train_command(base, data, method, output, push_ref, epochs, max_steps, batch_size, grad_accum, lr, warmup_steps,
                  schedule, weight_decay, max_length, dtype, device, seed, eval_fraction, resume, channels, heads, budget, roles,
                  strategy, order, exclude, block, coefficients, targets, fsdp, cpu_offload, gradient_checkpointing, arch_file,
                  overwrite, as_json) -> None:
    """Fine-tune BASE on DATA with S2FT or PISA and write the adapter to OUTPUT.

    Multi-GPU / multi-node: launch with `torchrun --nproc-per-node N -m s2reg train ...`
    (DDP; --batch-size is per process). For a base that does not fit one device, add --fsdp: the
    base, the slices and the optimizer state are sharded over the processes (FSDP2). --resume
    continues on any number of processes that keeps the global batch (--batch-size x processes).

    \b
    Example:
      s2reg train --base ./SmolLM2-135M --data tasks.jsonl --method s2ft --channels 32 -o ./adapter
      s2reg train --base ./SmolLM2-135M --data chat.jsonl --method pisa --block 64 --coefficients 32 \\
                  --max-steps 200 --eval-fraction 0.1 -o ./adapter --push chat-pisa:v1
    """
    if budget is not None and (channels is not None or heads is not None):
        raise click.UsageError("--budget chooses --channels and --heads; give one or the other")
    if cpu_offload and not fsdp:
        raise click.UsageError("--cpu-offload offloads FSDP shards; give --fsdp too")
    if fsdp and "WORLD_SIZE" not in os.environ:
        raise click.UsageError("--fsdp shards over the processes torchrun starts: "
                               "torchrun --nproc-per-node N -m s2reg train --fsdp ...")
    role_list = tuple(r.strip() for r in roles.split(",") if r.strip()) if roles else None
    if method == "s2ft":
        sizes = {k: v for k, v in (("channels", channels), ("heads", heads)) if v is not None}
        method_config = S2FTConfig(**sizes, strategy=strategy, order=order, seed=seed, exclude=list(exclude),
                                   roles=role_list)
    else:
        if roles and targets:
            raise click.UsageError("--roles and --targets both choose what PISA trains; give one")
        method_config = PISAConfig(block=block, coefficients=coefficients, seed=seed, roles=role_list,
                                   targets=tuple(t.strip() for t in targets.split(",")) if targets else ())
    train_config = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                               lr=lr or default_lr(method), warmup_steps=warmup_steps, schedule=schedule,
                               weight_decay=weight_decay, seed=seed)
    check_free(output, overwrite=overwrite or resume)
    records = read_jsonl(data)  # a bad line is reported before torch is imported or a model loads
    from ..train.session import check_device, run_training  # torch and transformers: every option is good

    if device:
        check_device(device)
    rank, world = _distributed(fsdp)
    if (world > 1 or fsdp) and device is None:
        import torch

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    state_dir = output.parent / f".{output.name}.train-state"
    with _StepBar(shown=rank == 0) as bar:
        run = run_training(base, data, method, method_config=method_config, train_config=train_config,
                           max_length=max_length, dtype=dtype, device=device, eval_fraction=eval_fraction,
                           state_dir=state_dir, resume=resume, on_step=bar.update, arch_file=arch_file, budget=budget,
                           fsdp=fsdp, cpu_offload=cpu_offload, gradient_checkpointing=gradient_checkpointing,
                           records=records,
                           on_warning=lambda message: render.line(("warning", "yellow"), f": {message}", stderr=True))
    if rank != 0:
        return
    stored = run.adapter.save(output, overwrite=True)
    summary = {"output": str(output), "method": method, "objective": run.objective.as_json(),
               "trainable_parameters": run.trainable, "device": run.device,
               "digest": stored.digest, "bytes": stored.payload_bytes, **run.result.summary()}
    if method == "s2ft":
        summary |= {"channels": run.method_config.channels, "heads": run.method_config.heads}
    if push_ref:
        from ..registry import Store

        summary["pushed"] = push_ref
        Store().push(output, push_ref)
    if as_json:
        render.emit_json(summary)
        return
    objective = run.objective.kind + (f" ({len(run.objective.labels)} labels)" if run.objective.labels else "")
    rows = [("method", method), ("objective", objective), ("trainable parameters", f"{run.trainable:,}"), ("steps", run.result.steps),
            ("tokens", f"{run.result.tokens:,}"), ("time", f"{run.result.seconds:.1f} s"),
            ("final train loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-"),
            ("weight change", f"{run.result.weight_change:.2%} of the trained weights' norm (largest step "
                              f"{run.result.largest_step_change:.2%})")]
    if method == "s2ft":
        channels, heads = run.method_config.channels, run.method_config.heads
        rows.insert(3, ("selection", f"{channels} channel{'s' * (channels != 1)}, {heads} head{'s' * (heads != 1)} "
                                     "per layer" + (f" (budget {budget:,})" if budget else "")))
    if run.result.eval_loss_before is not None:
        rows += [("eval loss before", f"{run.result.eval_loss_before:.4f}"), ("eval loss after", f"{run.result.eval_loss_after:.4f}")]
    rows += [("adapter", f"{output} ({render.human_bytes(stored.payload_bytes)}, {stored.digest[:16]})")]
    if push_ref:
        rows.append(("pushed", push_ref))
    render.console.print(render.table("training summary", ["", ""], rows))


COMMANDS = [train_command]
