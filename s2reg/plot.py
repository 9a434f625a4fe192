"""Pictures of an adapter (``s2reg inspect --plot``): a layers x modules heatmap of the delta norm
and, for S2FT, which heads and channels each layer selected. Needs matplotlib (``pip install s2reg[plot]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import S2RegError
from .format import Adapter
from .kinds import kind_of
from .ops.describe import describe


def _points(row: dict[str, Any]) -> list[float]:
    """Where a target's selected units sit in its layer, 0..1 (heads and channels when the family is known)."""
    if row.get("units"):
        return [u / max(1, row["unit_totals"][role] - 1) for role, units in row["units"].items() for u in units]
    units = row["groups"] if row["groups"] is not None else row["indices"]
    return [u / max(1, (row["of"] // (row["group_size"] or 1)) - 1) for u in units]


def plot_adapter(adapter: Adapter, output: str | os.PathLike, info: Any = None) -> Path:
    """Write a PNG (or any format matplotlib knows from the suffix) describing ``adapter``.

    With ``info`` (the base's ``s2reg.arch.ModelInfo``) the selection panel places heads and channels.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise S2RegError("--plot needs matplotlib: pip install 's2reg[plot]'") from None
    rows = describe(adapter, info).targets
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None}) or [0]
    modules = sorted({r["module"].removesuffix(".weight") for r in rows})
    grid = [[0.0] * len(modules) for _ in layers]
    for r in rows:
        grid[layers.index(r["layer"] if r["layer"] is not None else 0)][modules.index(r["module"].removesuffix(".weight"))] = r["delta_norm"]
    s2ft = kind_of(adapter).plots_selection  # a second panel: where the selected rows and columns lie
    fig, axes = plt.subplots(1, 2 if s2ft else 1, figsize=(12 if s2ft else 7, max(3, 0.3 * len(layers) + 1.5)),
                             squeeze=False)
    image = axes[0][0].imshow(grid, aspect="auto", cmap="viridis")
    axes[0][0].set(title=f"{adapter.kind.upper()} delta norm", xlabel="module", ylabel="layer",
                   xticks=range(len(modules)), yticks=range(len(layers)), yticklabels=layers)
    axes[0][0].set_xticklabels(modules, rotation=45, ha="right", fontsize=7)
    fig.colorbar(image, ax=axes[0][0])
    if s2ft:
        ax = axes[0][1]
        for r in rows:
            if r["layer"] is None:
                continue
            share = _points(r)
            module = r["module"].removesuffix(".weight")
            ax.scatter(share, [r["layer"]] * len(share), s=6, label=module, color=f"C{modules.index(module) % 10}")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper right")
        ax.set(title="selected heads / channels (position within the layer)", xlabel="relative index", ylabel="layer")
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
