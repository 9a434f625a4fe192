"""What PISA trains: which projections, block size, coefficients per block, scale."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
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

    block: int = 64
    coefficients: int = 32
    roles: tuple[str, ...] | None = None
    targets: tuple[str, ...] = ()
    scale: float | None = None
    seed: int = 0
    layers: list[int] | None = None

    def scale_for(self, block: tuple[int, int]) -> float:
        """The scale of a target tiled by ``block`` (the configured block, clipped to the matrix)."""
        return self.scale if self.scale is not None else math.sqrt(block[0] * block[1] / 2)

    def check(self) -> None:
        from ...errors import S2RegError

        if self.block < 1 or self.coefficients < 1:
            raise S2RegError("block and coefficients must be positive")
