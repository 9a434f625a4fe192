"""``s2reg export`` and ``s2reg import``: PEFT LoRA and FourierFT interoperability."""

from __future__ import annotations

from pathlib import Path

import click

from ..interop import export_gguf_lora, export_lora, import_fourierft, import_lora
from ..interop.export_results import GGUFExport, LoRAExport
from ..interop.pisa_lowrank import DEFAULT_MAX_ERROR
from ..interop.peft_files import peft_config, recorded_base, with_portable_base
from ..tensors import CheckpointSource
from . import render
from .common import adapter_argument, json_option, overwrite_option


@click.command("export")
@adapter_argument("adapter")
@click.option("--to", "target", type=click.Choice(["peft-lora", "gguf-lora"]), default="peft-lora", show_default=True,
              help="peft-lora: a PEFT directory (transformers, vLLM); gguf-lora: one llama.cpp adapter file "
                   "(llama-cli --lora, llama-cpp-python lora_path, an Ollama Modelfile's ADAPTER).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--rank", type=click.IntRange(min=1),
              help="PISA: the LoRA rank of every target [default: per target, the smallest within --max-error].")
@click.option("--max-error", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MAX_ERROR, show_default=True,
              help="PISA: the largest relative Frobenius error a target may export with; over it, export refuses and "
                   "names the rank that would meet it.")
@click.option("--base", "base", type=click.Path(exists=True, file_okay=False),
              help="The checkpoint the adapter is for (task type, transposed layers); default: the adapter's base "
                   "name when it is a directory.")
@overwrite_option
@json_option
def export_command(adapter, target, output, rank, max_error, base, overwrite, as_json) -> None:
    """Write ADAPTER as a PEFT LoRA directory (vLLM, PEFT) or a llama.cpp LoRA GGUF (llama.cpp, Ollama).

    --to peft-lora loads with PeftModel.from_pretrained; --to gguf-lora needs a base GGUF made from the
    same checkpoint.

    S2FT exports as one-hot factors (rank = selected rows/columns): exactly when its deltas are F32
    (the usual case); F64 deltas (some fp32 bases) are rounded to the LoRA's F32 factors. PISA
    exports through a truncated SVD (randomized, without forming the dense delta) at the smallest rank
    within --max-error per target, or at --rank, refused when over --max-error. The relative error
    of each exported delta against the adapter's change is reported. The PEFT task type follows the base's
    model class (FEATURE_EXTRACTION for a bare encoder); GPT-2's Conv1D layers get fan_in_fan_out.
    The GGUF holds the same factors under llama.cpp's tensor names (q/k rows in its rotary order),
    padded to one rank so that one alpha scales every tensor by exactly 1.
    """
    adapter, base = with_portable_base(adapter, base)
    if target == "gguf-lora":
        gguf = export_gguf_lora(adapter, output, base=base, rank=rank, max_error=max_error, overwrite=overwrite)
        what = (f"{gguf.tensors} tensors to {output} ({gguf.family} as llama.cpp's {gguf.architecture}, "
                f"rank {gguf.rank}")
        report: GGUFExport | LoRAExport = gguf
    else:
        with render.progress() as bar:
            task = bar.add_task("export", total=len(adapter.targets))
            lora = export_lora(adapter, output, rank=rank, max_error=max_error, base=base, overwrite=overwrite,
                                 progress=lambda done, total, name: bar.update(task, completed=done, total=total))
        what = f"{lora.modules} modules to {output} (task type {lora.task_type}, max rank {lora.max_rank}"
        report = lora
    if as_json:
        render.emit_json(report.as_json())
        return
    render.line(("exported", "green"), f" {what}, max relative error {report.max_relative_error:.2e})")


@click.command("import")
@click.argument("peft_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--base", "base", type=click.Path(exists=True),
              help="The checkpoint it was made for (default: its base_model_name_or_path, when a local checkpoint).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@overwrite_option
@json_option
def import_command(peft_dir, base, output, overwrite, as_json) -> None:
    """Turn a PEFT adapter into an s2reg adapter: FourierFT -> PISA, one-hot LoRA -> S2FT.

    FourierFT's frequency positions are regenerated once from its seed and written out explicitly.
    A LoRA imports only when it is one-hot (an exported S2FT adapter); others are refused.
    """
    kind = peft_config(peft_dir).get("peft_type")
    with CheckpointSource(base or recorded_base(peft_dir)) as source:
        adapter = (import_fourierft if kind == "FOURIERFT" else import_lora)(peft_dir, source)
    stored = adapter.save(output, overwrite=overwrite)
    if as_json:
        render.emit_json({"output": str(output), "kind": adapter.kind, "targets": len(adapter.targets), "digest": stored.digest})
        return
    render.line(("imported", "green"), f" {kind} as a {adapter.kind} adapter: {len(adapter.targets)} targets -> {output}")


COMMANDS = [export_command, import_command]
