"""What PISA trains: which projections, block size, coefficients per block, scale."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PISAConfig:
    """PISA hyper-parameters (spec/FORMAT.md §5; the PISA paper leaves these open).

    ``roles`` (default q and v, like FourierFT) or explicit module ``targets`` (any model: full module
    names such as ``encoder.layer.0.attn.proj``, or short ones such as ``q_proj`` meaning every module
    whose name ends with it) get ``coefficients`` trainable rfft2 coefficients
    per ``block x block`` tile at ``seed``-drawn positions. ``scale`` multiplies the inverse
    transform; by default ``block**2 / 100``, so a unit coefficient moves weights by about 0.02
    whatever the block size (irfft2 divides by the block area).
    """

    block: int = 64
    coefficients: int = 32
    roles: tuple[str, ...] = ("q", "v")
    targets: tuple[str, ...] = ()
    scale: float | None = None
    seed: int = 0
    layers: list[int] | None = None

    @property
    def effective_scale(self) -> float:
        return self.scale if self.scale is not None else self.block * self.block / 100.0

    def check(self) -> None:
        from ...errors import S2RegError

        if self.block < 1 or self.coefficients < 1:
            raise S2RegError("block and coefficients must be positive")
