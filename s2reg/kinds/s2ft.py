"""The S2FT kind: row/column slices of exact differences (FORMAT §4)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from .registry import register
from .base import Comparison, Kind, extract_head, sums

# what inspect calls the units of each role
UNIT_NAMES = {"q": "heads", "o": "heads", "k": "kv heads", "v": "kv heads", "up": "channels", "gate": "channels",
              "down": "channels"}


def _slice_numel(target: Any) -> int:
    """Elements of one selected row (or column): the tensor's size divided by its selected axis."""
    from ..format.s2ft import axis_dim

    return math.prod(target.shape) // target.shape[axis_dim(target.axis)]


def _units(row: dict) -> str:
    """``q heads 1,3 + k kv heads 0`` (``expert 3:`` in front for an MoE expert's tensor)."""
    from ..format.stats import ranges

    parts = [f"{role} {UNIT_NAMES[role]} {ranges(units)} of {row['unit_totals'][role]}" for role, units in row["units"].items()]
    return (f"expert {row['expert']}: " if row["expert"] is not None else "") + " + ".join(parts)


class S2FTKind(Kind):
    name = "s2ft"
    format_names = ("S2FTTarget", "S2FTAdapter")
    exact = True  # FORMAT §4.3: the delta is an exact difference, restore lists included
    lora_by_tolerance = False  # its LoRA factors are the slice and a one-hot matrix: the export is the adapter
    experts_to_lora = True
    plots_selection = True
    size_options = None  # --budget chooses --channels and --heads
    extract_columns: ClassVar[list[str]] = ["tensor", "changed", "slice", "stored", "status", "noise"]

    # -- merge math --------------------------------------------------------------------------
    def region(self, target):
        return target.axis, target.indices

    def merged_region(self, target, current, *, subtract=False, name="tensor", check_reversible=False):
        return target.shifted(current, subtract=subtract, name=name, check_reversible=check_reversible)

    def undoes(self, target, current, merged) -> bool:
        return target.undoes(current, merged)

    def permuted(self, name, target, permutation, info):
        from ..ops.permute import permute_s2ft_target

        return permute_s2ft_target(name, target, permutation, info)

    # -- statistics and text -------------------------------------------------------------------
    def stats_columns(self, target) -> dict[str, Any]:
        from ..format.arrays import dot
        from ..format.s2ft import axis_length

        return {"axis": target.axis, "count": target.count, "of": axis_length(target.shape, target.axis),
                "indices": target.indices.tolist(), "group_size": target.group_size, "groups": target.groups,
                "delta_norm": math.sqrt(dot(target.delta, target.delta))}

    def selection_text(self, row) -> str:
        from ..format.stats import ranges

        if row.get("units"):
            return f"{row['count']} {row['axis']}: {_units(row)}"
        what = "rows" if row["axis"] == "rows" else "cols"
        if row["groups"] is not None:
            return f"{row['count']} {what}: groups {ranges(row['groups'])}"
        return f"{row['count']}/{row['of']} {what}: {ranges(row['indices'])}"

    def card_text(self, row) -> str:
        return f"{row['axis']} {row['count']}/{row['of']}"

    # -- diff --------------------------------------------------------------------------------
    def compare(self, name, ta, tb) -> Comparison:
        """From the slices alone: the common rows (or columns), or the crossing of rows and columns."""
        import numpy as np

        from ..format.s2ft import axis_dim

        if ta.axis == tb.axis:
            dim = axis_dim(ta.axis)
            _, pa, pb = np.intersect1d(ta.indices, tb.indices, assume_unique=True, return_indices=True)
            per = _slice_numel(ta)
            common = len(pa) * per
            x, y = np.take(ta.delta, pa, axis=dim), np.take(tb.delta, pb, axis=dim)
            return (common, (ta.count + tb.count) * per - common, *sums(x, y))
        rows, cols = (ta, tb) if ta.axis == "rows" else (tb, ta)
        common = rows.count * cols.count  # the crossing of the selected rows and the selected columns
        union = rows.count * rows.shape[1] + cols.count * cols.shape[0] - common
        on_rows = np.take(rows.delta, cols.indices, axis=1)
        on_cols = np.take(cols.delta, rows.indices, axis=0)
        return (common, union, *(sums(on_rows, on_cols) if rows is ta else sums(on_cols, on_rows)))

    def region_delta(self, target):
        return target.delta

    # -- fuse, interop, extract, training --------------------------------------------------------
    def fuse(self, adapters, names, method, options, generator, params, fingerprints, base):
        from ..ops.fuse import fuse_s2ft

        return fuse_s2ft(adapters, names, method, options, generator, params, fingerprints, base)

    def lora_factors(self, name, target, rank, max_error, transposed):
        from ..interop.peft_lora import s2ft_factors

        return s2ft_factors(name, target, transposed)

    def lora_rank_text(self, needed: int, tolerance: float) -> str:
        return f"is a LoRA of rank {needed}"

    def check_extract_options(self, options) -> None:
        return None  # every s2ft flag has a default; the pisa ones are ignored, as their help says

    def extract(self, base, tuned, *, base_name, progress, options):
        from ..ops.extract import extract_s2ft

        return extract_s2ft(base, tuned, base_name=base_name, allow_dense=options["allow_dense"],
                            max_fraction=options["max_fraction"], allow_noise=options["allow_noise"],
                            detect=options["detect_permutation"], arch_file=options["arch"], progress=progress)

    def extract_row(self, change) -> list[str]:
        return [*extract_head(change), "ok" if change.structured else "dense", str(change.noise) if change.noise else ""]

    @property
    def train_config(self) -> type:
        from ..train.s2ft.config import S2FTConfig

        return S2FTConfig

    def prepare_training(self, model, options, examples, pad, arch_file, device):
        """Heads and channels chosen (by a budget, or scored on a few calibration batches), agreed across ranks."""
        from dataclasses import replace

        from ..train.budget import fit_budget
        from ..train.fsdp import agree
        from ..train.s2ft.model import prepare_s2ft

        config = options.method_config
        if options.budget is not None:
            config = fit_budget(model, options.budget, config, arch_file=arch_file)
        calibration = None
        if config.strategy in ("activation", "weight_activation", "gradient"):
            from ..train.data import collate

            calibration = [{k: v.to(device) for k, v in collate(examples[i:i + 4], pad).items()}
                           for i in range(0, min(len(examples), 32), 4)]
        prepared = prepare_s2ft(model, config, calibration=calibration, arch_file=arch_file)
        agree(prepared.selection, "S2FT slices")
        return prepared, replace(options, method_config=prepared.config)

    def train_summary(self, config, options) -> dict[str, Any]:
        return {"channels": config.channels, "heads": config.heads}

    def train_rows(self, config, options) -> list[tuple[str, str]]:
        return [("selection", f"{config.channels} channel{'s' * (config.channels != 1)}, {config.heads} "
                              f"head{'s' * (config.heads != 1)} per layer"
                              + (f" (budget {options.budget:,})" if options.budget else ""))]


register(S2FTKind())

