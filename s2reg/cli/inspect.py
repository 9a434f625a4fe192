"""``s2reg inspect``: what an adapter holds, per layer and module."""

from __future__ import annotations

import click

from ..kinds import kind_named
from ..ops.describe import Description, describe
from . import render
from .common import adapter_argument, arch_option, json_option, sizes_option


@click.command("inspect")
@adapter_argument("adapter")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw a layers x modules heatmap and the selection (PNG).")
@click.option("--base", "base", type=click.Path(exists=True, file_okay=False),
              help="The base checkpoint: show S2FT selections as heads and channels of its model family.")
@sizes_option
@arch_option
@json_option
def inspect_command(adapter, plot: str | None, base: str | None, sizes: bool, arch, as_json: bool) -> None:
    """Show an adapter's targets, selections, sizes and norms.

    With --base, S2FT selections are shown as heads, kv heads and channels (per expert) as the
    base's family lays them out (fused, interleaved, transposed tensors included).

    \b
    Example:
      s2reg inspect ./my-adapter
      s2reg inspect ./my-adapter --base ./base-model
      s2reg inspect ./my-adapter --sizes
      s2reg inspect ./my-adapter --json | jq '.targets[].indices'
      s2reg inspect ./my-adapter --plot adapter.png
    """
    info = None
    if base is not None:
        from ..arch import resolve_source  # the families' descriptions: only with --base
        from ..tensors import open_source

        with open_source(base) as source:
            info = resolve_source(source, arch)
    report = describe(adapter, info, sizes=sizes)
    if plot:
        from ..plot import plot_adapter

        plot_adapter(adapter, plot, info)
    if as_json:
        render.emit_json(report.as_json())
    else:
        show(report)


def _in_model_order(row: dict) -> tuple:
    """Layer 2 before layer 10; targets outside the layers (embeddings, heads) first."""
    return (row["layer"] is not None, row["layer"] or 0, row["module"], row.get("expert") or 0)


def show(report: Description) -> None:
    """Render a :func:`describe` report: a summary, then one row per target."""
    s = report.summary
    render.line((s.kind, "bold"), " adapter for ", (s.base.name, "bold"),
                f" @ {s.base.revision}" if s.base.revision else "")
    render.line(f"{s.targets} targets, {s.params:,} parameters ({s.percent_of_targeted:.2f}% of the targeted tensors)")
    if s.digest is not None and s.bytes_on_disk is not None and s.raw_bytes is not None:
        render.line(
            f"payload {render.human_bytes(s.bytes_on_disk)} on disk ({s.encoding}), "
            f"{render.human_bytes(s.raw_bytes)} raw, ratio {s.compression_ratio:.2f}x; digest {s.digest[:16]}"
        )
    sizes = all("compressed_bytes" in r for r in report.targets)
    render.console.print(
        render.table(
            None,
            ["layer", "module", "selection", "params", "% base", "‖Δ‖"] + (["zstd"] if sizes else []),
            (
                [
                    "" if r["layer"] is None else r["layer"],
                    r["module"].removesuffix(".weight"),
                    kind_named(r["kind"]).selection_text(r),
                    f"{r['params']:,}",
                    f"{r['percent_of_base']:.2f}",
                    f"{r['delta_norm']:.4g}",
                ] + ([render.human_bytes(r["compressed_bytes"])] if sizes else [])
                for r in sorted(report.targets, key=_in_model_order)
            ),
            right=["params", "% base", "‖Δ‖", "zstd"],
            clip=["selection"],
        )
    )


COMMANDS = [inspect_command]
