"""What PISA trains: which projections, block size, coefficients per block, scale."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..settings import setting


@dataclass(frozen=True)
class PISAConfig:
    """PISA hyper-parameters (spec/FORMAT.md §5; the PISA paper leaves these open; the choices are
    explained in docs/training.md).

    ``roles`` (among q, k, v, o, up, gate, down; by default every projection of the family that is a
    2-D matmul layer of its own, so stacked 3-D MoE experts are left out) or explicit module ``targets``
    (any model: full module names such as ``encoder.layer.0.attn.proj``, or short ones such as ``q_proj``
    meaning every module whose name ends with it) get ``coefficients`` trainable rfft2 coefficients
    per ``block x block`` tile at ``seed``-drawn positions. ``scale`` multiplies the inverse
    transform; by default ``sqrt(bh * bw / 2)`` for the block actually used, which makes the map from
    the real coefficients to the delta an isometry (a coefficient change of norm ``x`` moves the weight
    by ``x`` in Frobenius norm, whatever the block): the learning rate then means what it means for
    S2FT or full fine-tuning, and does not have to shrink with the block area.
    """

    method: ClassVar[str] = "pisa"
    # On the isometric scale (scale_for), so comparable with S2FT's (bench/quality.py; docs/training.md).
    default_lr: ClassVar[float] = 1.25e-3

    block: int = setting(64, "pisa: block size.", low=1)
    coefficients: int = setting(32, "pisa: coefficients per block.", low=1)
    roles: tuple[str, ...] | None = setting(
        None, "pisa: default every projection that is a matmul layer of its own.", type="names")
    targets: tuple[str, ...] = setting((), "pisa: comma-separated module names, full or short (q_proj,v_proj), "
                                           "instead of --roles.", type="names")
    scale: float | None = setting(None, "Multiplier of the inverse transform [default: the isometric one].",
                                  type=float, cli=False)
    seed: int = setting(0, None)
    layers: tuple[int, ...] | None = setting(None, None, type="ints")

    def scale_for(self, block: tuple[int, int]) -> float:
        """The scale of a target tiled by ``block`` (the configured block, clipped to the matrix)."""
        return self.scale if self.scale is not None else math.sqrt(block[0] * block[1] / 2)

    def check(self) -> None:
        from ...errors import S2RegError

        if self.block < 1 or self.coefficients < 1:
            raise S2RegError("block and coefficients must be positive")
        if self.roles and self.targets:
            raise S2RegError("--roles and --targets both choose what PISA trains; give one")
