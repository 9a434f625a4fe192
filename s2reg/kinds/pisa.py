"""The PISA kind: sparse rfft2 coefficients per block (FORMAT §5)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ..errors import S2RegError
from .registry import register
from .base import Comparison, Kind, extract_head, dense_delta, sums


class PISAKind(Kind):
    name = "pisa"
    format_names = ("PISATarget", "PISAAdapter")
    size_options = "--coefficients per --block"
    extract_columns: ClassVar[list[str]] = ["tensor", "changed", "kept/block", "stored", "status", "rel. error"]

    # -- statistics and text -------------------------------------------------------------------
    def stats_columns(self, target) -> dict[str, Any]:
        return {"block": list(target.block), "grid": list(target.grid), "coefficients": target.k,
                "scale": target.scale, "delta_norm": target.delta_norm()}

    def selection_text(self, row) -> str:
        return f"{row['coefficients']}/block of {row['block'][0]}x{row['block'][1]}, grid {row['grid'][0]}x{row['grid'][1]}"

    def card_text(self, row) -> str:
        return f"{row['coefficients']} coefficients per {row['block'][0]}x{row['block'][1]} block"

    # -- diff --------------------------------------------------------------------------------
    def compare(self, name, ta, tb) -> Comparison:
        """By inner products of the coefficients (same block; FORMAT §5.3 and Parseval), else densified (capped)."""
        import numpy as np

        numel = math.prod(ta.shape)
        if ta.block != tb.block:
            return (numel, numel, *sums(dense_delta(ta, name), dense_delta(tb, name)))
        from ..format.pisa_fft import delta_dot  # PISA reconstruction runs in torch

        sa, sb = ta.spectral(), tb.spectral()
        xx, yy, xy = (delta_dot(ta.shape, ta.block, p, q) for p, q in ((sa, sa), (sb, sb), (sa, sb)))
        same = (ta.scale == tb.scale and np.array_equal(ta.indices, tb.indices)
                and np.array_equal(ta.coefficients.astype(np.float32), tb.coefficients.astype(np.float32)))
        return numel, numel, xx, yy, xy, 0.0 if same else max(0.0, xx + yy - 2 * xy), same

    def lines(self, target, dim, indices, *, name):
        return target.lines(dim, indices, name=name)  # from the blocks holding them only

    # -- fuse, interop, extract, training --------------------------------------------------------
    def fuse(self, adapters, names, method, options, generator, params, fingerprints, base):
        from ..ops.fuse import fuse_pisa

        return fuse_pisa(adapters, names, method, options, generator, params, fingerprints)

    def lora_factors(self, name, target, rank, max_error, transposed):
        from ..interop.pisa_lowrank import pisa_low_rank

        low_rank = pisa_low_rank(name, target, rank=rank, max_error=max_error, transposed=transposed)
        return low_rank.a, low_rank.b, low_rank.error

    def lora_rank_text(self, needed: int, tolerance: float) -> str:
        return (f"is a LoRA within relative error {tolerance:g} only from rank {needed} on (PISA deltas are of "
                "full rank; merging it gives the adapter exactly)")

    def check_extract_options(self, options) -> None:
        if options["budget"] is None:
            raise S2RegError("--kind pisa needs --budget")
        if options["detect_permutation"]:
            raise S2RegError("--detect-permutation works with --kind s2ft only (PISA coefficients have no heads to reorder)")

    def extract(self, base, tuned, *, base_name, progress, options):
        from ..ops.extract import extract_pisa

        return extract_pisa(base, tuned, base_name=base_name, budget=options["budget"], block=options["block"],
                            allow_partial=options["allow_partial"], progress=progress)

    def extract_row(self, change) -> list[str]:
        return [*extract_head(change), "ok" if change.structured else "not a matrix",
                "-" if change.rel_error is None else f"{change.rel_error:.3e}"]

    @property
    def train_config(self) -> type:
        from ..train.pisa.config import PISAConfig

        return PISAConfig

    def prepare_training(self, model, options, examples, pad, arch_file, device):
        from ..train.pisa.model import prepare_pisa

        return prepare_pisa(model, options.method_config, arch_file=arch_file), options


register(PISAKind())
