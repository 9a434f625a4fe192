"""``s2reg train``: fine-tune a checkpoint with S2FT or PISA and write the adapter.

Its flags are generated from ``TrainOptions`` and the configs it nests (``train/settings.py``): every
default and help text is declared there, once.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import S2RegError
from ..kinds import KINDS, kind_named
from ..train.data import read_jsonl
from ..train.s2ft.config import S2FTConfig
from ..train.settings import TrainConfig, TrainOptions
from . import render
from .common import json_option, overwrite_option
from .options import add_options, build, given_flags

# --method NAME -> its config class (its flags), for every kind s2reg trains
METHODS = {kind.name: kind.train_config for kind in KINDS.values() if kind.train_config is not None}
OPTION_CLASSES = (TrainConfig, TrainOptions, *METHODS.values())


def options_from(ctx: click.Context, method: str, values: dict) -> TrainOptions:
    """The run's options from the parsed flags; flags of the other method, or --budget with the sizes it
    chooses, are usage errors."""
    own = set(given_flags(ctx, [METHODS[method]]))
    for other, config in METHODS.items():  # keyed by --method name
        foreign = set(given_flags(ctx, [config])) - own
        if other != method and foreign:
            raise click.UsageError(f"{sorted(foreign)[0]} is an option of --method {other}, not {method}")
    if values.get("budget") is not None and {"--channels", "--heads"} & set(given_flags(ctx, [S2FTConfig])):
        raise click.UsageError("--budget chooses --channels and --heads; give one or the other")
    options = build(TrainOptions, values, method_config=build(METHODS[method], values), loop=build(TrainConfig, values))
    try:
        options.check()
    except S2RegError as exc:
        raise click.UsageError(str(exc)) from None
    return options


@click.command("train")
@click.option("--base", "base", required=True, type=click.Path(exists=True, file_okay=False), help="Checkpoint directory.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSONL: text, prompt/completion, messages, or input_ids; encoders: text (masked-LM) or text + label "
                   "(classification).")
@click.option("--method", type=click.Choice(sorted(METHODS)), required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Adapter directory to write.")
@click.option("--push", "push_ref", help="Also store the adapter in the local registry as NAME[:TAG].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (state kept beside OUTPUT), with the same "
                                             "options and data.")
@add_options(*OPTION_CLASSES)
@overwrite_option
@json_option
@click.pass_context
def train_command(ctx, base, data, method, output, push_ref, resume, overwrite, as_json, **values) -> None:
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
    options = options_from(ctx, method, values)
    from ..fsatomic import check_free

    check_free(output, overwrite=overwrite)
    records = read_jsonl(data)  # a bad line is reported before torch is imported or a model loads
    from ..train.session import join_process_group, run_training  # torch and transformers: every option is good

    rank, _ = join_process_group(options.fsdp)
    with render.StepBar(shown=rank == 0) as bar:
        run = run_training(base, data, options, output=output, overwrite=overwrite, resume=resume, records=records,
                           on_step=bar.update,
                           on_warning=lambda message: render.line(("warning", "yellow"), f": {message}", stderr=True))
    if rank != 0:
        return
    if push_ref:
        from ..registry import Store

        Store().push(output, push_ref)
    _report(run, output, push_ref, as_json)


def _report(run, output: Path, push_ref: str | None, as_json: bool) -> None:
    options, result, stored = run.options, run.result, run.stored
    summary = {"output": str(output), "method": options.method, "objective": run.objective.as_json(),
               "trainable_parameters": run.trainable, "device": run.device, "digest": stored.digest,
               "bytes": stored.payload_bytes, **result.summary()}
    config = options.method_config
    summary |= kind_named(options.method).train_summary(config, options)
    if push_ref:
        summary["pushed"] = push_ref
    if as_json:
        render.emit_json(summary)
        return
    objective = run.objective.kind + (f" ({len(run.objective.labels)} labels)" if run.objective.labels else "")
    rows = [("method", options.method), ("objective", objective), ("trainable parameters", f"{run.trainable:,}"),
            ("steps", result.steps), ("tokens", f"{result.tokens:,}"), ("time", f"{result.seconds:.1f} s"),
            ("final train loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-"),
            ("weight change", f"{result.weight_change:.2%} of the trained weights' norm (largest step "
                              f"{result.largest_step_change:.2%})")]
    rows[3:3] = kind_named(options.method).train_rows(config, options)
    if result.eval_loss_before is not None:
        rows += [("eval loss before", f"{result.eval_loss_before:.4f}"), ("eval loss after", f"{result.eval_loss_after:.4f}")]
    rows += [("adapter", f"{output} ({render.human_bytes(stored.payload_bytes)}, {stored.digest[:16]})")]
    if push_ref:
        rows.append(("pushed", push_ref))
    render.console.print(render.table("training summary", ["", ""], rows))


COMMANDS = [train_command]
