"""``s2reg generate``: try adapters on prompts without merging them (one base, one mixed batch)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import S2RegError
from . import render
from .common import json_option

DTYPES = ("fp32", "bf16")


def _streamer(tokenizer):
    """Prints the continuation of a one-row batch as it is generated (transformers' TextStreamer protocol)."""
    from transformers import TextStreamer

    class RichStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            render.console.print(text, end="\n" if stream_end else "", markup=False, highlight=False, soft_wrap=True)

    return RichStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _cell(text: str) -> str:
    """A prompt or continuation as one table cell: its line breaks written as ``\\n`` (as --json has them), so
    rows stay side by side. Cells are plain text (render.table), so no markup escaping."""
    return text.replace("\r\n", "\\n").replace("\n", "\\n")


@click.command("generate")
@click.argument("base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--adapter", "adapters", multiple=True, metavar="ADAPTER",
              help="An adapter directory or stored NAME[:TAG]; repeat to compare several.")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="A prompt (repeatable), tokenised as given.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL file of {\"prompt\": ...} lines.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template (default: as given).")
@click.option("--with-base", is_flag=True, help="Also run every prompt on the base model (adapter null in --json).")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True)
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available, as for train).")
@json_option
def generate_command(base, adapters, prompts, prompts_file, max_new_tokens, chat, with_base, dtype, device, as_json) -> None:
    """Generate from BASE with each ADAPTER (greedy), without writing a merged checkpoint.

    Every prompt runs under every adapter (and the base with --with-base) in one mixed batch: each
    sequence computes what BASE with its adapter merged computes. One prompt and one adapter stream
    the continuation; otherwise a table shows the continuations side by side. --json prints a list of
    {"prompt", "adapter", "text"} (the continuation only), one per prompt and adapter.
    """
    import torch

    from ..serve import AdapterServer
    from ..serve.prompts import complete, read_prompts
    from ..train.session import check_device, default_device, read_tokenizer

    texts = list(prompts) + (read_prompts(prompts_file) if prompts_file else [])
    if not texts:
        raise S2RegError("give a prompt: --prompt TEXT or --prompts FILE.jsonl")
    if not adapters and not with_base:
        raise S2RegError("give an adapter (--adapter NAME[:TAG] or a directory), or --with-base for the base alone")
    device = check_device(device) if device else default_device()  # before anything loads
    tokenizer = read_tokenizer(base)
    if tokenizer is None:
        raise S2RegError(f"{base} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    names = list(dict.fromkeys(adapters))
    server = AdapterServer.from_pretrained(base, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
                                           device=device, max_resident=max(1, len(names)))
    with server:
        for name in names:
            server.attach(name, name)
        routes = ([None] if with_base else []) + names
        stream = not as_json and len(texts) == 1 and len(routes) == 1
        results = complete(server, tokenizer, texts, routes, max_new_tokens=max_new_tokens, chat=chat,
                           streamer=_streamer(tokenizer) if stream else None)
    if as_json:
        render.emit_json([r.to_json() for r in results])
    elif not stream:
        columns = ["prompt", *("base" if r is None else r for r in routes)]
        rows = [[_cell(p), *(_cell(r.text) for r in results[i * len(routes):(i + 1) * len(routes)])]
                for i, p in enumerate(texts)]
        render.console.print(render.table(None, columns, rows))


COMMANDS = [generate_command]
