"""Low-rank factors of a PISA delta for LoRA export, within a relative error tolerance, errors told exactly.

A PISA delta is generally of full rank (every block carries its own frequencies), so a LoRA can only
approximate it. :func:`pisa_low_rank` returns float32 factors ``b [out, r] @ a [r, in]`` and the true
relative Frobenius error ``||delta - b @ a||_F / ||delta||_F`` of exactly those factors.

How: a randomized SVD (Halko, Martinsson and Tropp 2011, algorithm 4.4: a Gaussian sketch with
oversampling and two power iterations) of the delta applied as an operator (:mod:`.pisa_operator`: FFT
products, never the dense matrix). With ``Q`` the orthonormal sketch basis and ``Q.T @ delta = U S V.T``
(a small dense SVD), the rank-``r`` factors are ``(Q U_r) S_r V_r.T``, whose squared error is exactly
``||delta||^2 - sum(S_r^2)`` (they are the projection of ``delta`` onto an orthonormal basis), with
``||delta||`` from the coefficients by Parseval: the rank can be chosen without densifying anything. When
the rank needed comes near the matrix's size, a sketch costs as much as the SVD it approximates, so the
delta is reconstructed densely in float64 and factored exactly (the truncated SVD, optimal per rank).

The error reported is then measured on the float32 factors themselves: ``||delta||^2 - 2 <delta, b a> +
||b a||^2`` (one operator product and two small Gram matrices), or, when that difference of large numbers
is within float64 rounding of zero, the residual summed directly over bands of block rows of the delta.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import S2RegError
from ..format import limits
from ..format.pisa import PISATarget
from .pisa_operator import PISAOperator

DEFAULT_MAX_ERROR = 1e-3
OVERSAMPLING = 10
POWER_ITERATIONS = 2
FIRST_SKETCH = 32          # columns of the first sketch when the rank is chosen
# a sketch wider than this share of min(out, in): factor the dense delta instead (one thread, 1536 x 576: a sketch
# of a quarter of the columns took 0.25x the dense SVD's time, of half of them 0.7x, and is less accurate)
DENSE_FRACTION = 1 / 3
CANCELLATION = 1e-8        # squared relative error under which the three-term formula is rounding noise
_BAND_ELEMENTS = 1 << 22   # float64 elements of the delta reconstructed at once for the direct residual (32 MiB)
_SEED = 0                  # the sketch is seeded: one adapter always exports to the same LoRA


class ToleranceError(S2RegError):
    """A LoRA of the allowed rank cannot carry a PISA delta within the tolerance."""


@dataclass(frozen=True)
class LowRank:
    """``b @ a`` approximates the delta (in the ``nn.Linear`` layout asked for) with relative ``error``."""

    a: torch.Tensor      # float32 [r, in]
    b: torch.Tensor      # float32 [out, r]
    error: float         # ||delta - b @ a||_F / ||delta||_F (0 for a zero delta)
    rank: int
    sketched: bool       # True: randomized SVD through the operator; False: dense SVD


@dataclass(frozen=True)
class _Spectrum:
    """``delta ~ u @ diag(s) @ vh`` (orthonormal ``u``, ``vh``), and ``delta``'s squared norm."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    squared_norm: float
    exact: bool          # a full SVD of the delta: s holds every singular value

    def squared_errors(self) -> torch.Tensor:
        """``[r = 1 .. len(s)]``: squared Frobenius error of the rank-r truncation, exact for these factors."""
        if self.exact:  # the tail of the spectrum: no cancellation
            tail = self.s.flip(0).square().cumsum(0).flip(0)
            return torch.cat([tail[1:], tail.new_zeros(1)])
        return (self.squared_norm - self.s.square().cumsum(0)).clamp(min=0)

    def smallest_rank(self, max_error: float, usable: int) -> int | None:
        """The smallest rank <= ``usable`` whose truncation meets ``max_error`` (relative), else None."""
        met = (self.squared_errors()[:usable] <= (max_error ** 2) * self.squared_norm).nonzero()
        return int(met[0]) + 1 if met.numel() else None


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: the FFTs, sparse products, QRs and SVDs here are short, and their OpenMP regions
    stall when another process holds a core. On two shared cores a float64 576 x 576 SVD took 13 s with two
    threads and 0.43 s with one; a rank-16 export of a 1536 x 576 target 1.0 s and 0.07 s. The setting is
    OpenMP's, per calling thread: an export in one of a server's threads leaves the others as they are."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def _sketch(op: PISAOperator, width: int, squared_norm: float) -> _Spectrum:
    """HMT's randomized SVD of ``op`` with ``width`` sketch columns (oversampling included)."""
    generator = torch.Generator().manual_seed(_SEED)
    q = _orthonormal(op @ torch.randn(op.shape[1], width, generator=generator, dtype=torch.float64))
    for _ in range(POWER_ITERATIONS):  # re-orthonormalised each half step, so small singular values survive
        q = _orthonormal(op @ _orthonormal(op.rmatmul(q)))
    u, s, vh = torch.linalg.svd(op.rmatmul(q).t(), full_matrices=False)
    return _Spectrum(q @ u, s, vh, squared_norm, exact=False)


def _dense(op: PISAOperator, squared_norm: float) -> _Spectrum:
    """The exact SVD of the delta, reconstructed in float64."""
    u, s, vh = torch.linalg.svd(op.dense(), full_matrices=False)
    return _Spectrum(u, s, vh, squared_norm, exact=True)


def _dense_is_cheaper(op: PISAOperator, width: int) -> bool:
    return width > DENSE_FRACTION * min(op.shape)


def _spectrum(op: PISAOperator, rank: int, squared_norm: float) -> _Spectrum:
    """A factorization good for rank ``rank``: a sketch with oversampling, or the dense SVD."""
    width = rank + OVERSAMPLING
    return _dense(op, squared_norm) if _dense_is_cheaper(op, width) else _sketch(op, width, squared_norm)


def _smallest_rank(op: PISAOperator, max_error: float, squared_norm: float) -> tuple[_Spectrum, int]:
    """The smallest rank whose factors meet ``max_error``: sketches growing with the rank they suggest, then the
    dense SVD (whose full rank always does, in float64)."""
    width = FIRST_SKETCH
    while not _dense_is_cheaper(op, width):
        spectrum = _sketch(op, width, squared_norm)
        usable = width - OVERSAMPLING  # the last columns of a sketch only make the first ones accurate
        rank = spectrum.smallest_rank(max_error, usable)
        if rank is not None:
            return spectrum, rank
        # the energy left past the sketch, spread at most as high as its smallest value: a guess of the rank needed
        left = float(spectrum.squared_errors()[usable - 1]) - max_error ** 2 * squared_norm
        floor = float(spectrum.s[usable - 1]) ** 2
        guess = usable + (math.ceil(left / floor) if floor > 0 else min(op.shape))
        width = max(2 * width, min(guess, min(op.shape)) + OVERSAMPLING)
    spectrum = _dense(op, squared_norm)
    return spectrum, spectrum.smallest_rank(max_error, len(spectrum.s)) or len(spectrum.s)


def _factors(spectrum: _Spectrum, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(a [r, in], b [out, r])`` of the rank-``rank`` truncation, the singular values split evenly."""
    root = spectrum.s[:rank].sqrt()
    return (root[:, None] * spectrum.vh[:rank]).float().contiguous(), (spectrum.u[:, :rank] * root).float().contiguous()


def relative_error(op: PISAOperator, a: torch.Tensor, b: torch.Tensor, squared_norm: float) -> float:
    """``||delta - b @ a||_F / ||delta||_F`` for any factors (float64 arithmetic), without densifying unless the
    closed form is within rounding of zero."""
    if squared_norm == 0:
        return 0.0
    a, b = a.double(), b.double()
    cross = float((b * (op @ a.t())).sum())
    squared = squared_norm - 2 * cross + float(((b.t() @ b) * (a @ a.t())).sum())
    if squared > CANCELLATION * squared_norm:
        return math.sqrt(squared / squared_norm)
    if op.transposed:  # compare with the target as stored: b @ a approximates its transpose
        a, b = b.t(), a.t()
    rows, bh = op.grid[0], op.target.block[0]
    band = max(1, _BAND_ELEMENTS // (bh * op.target.shape[1]))
    squared = 0.0
    for start in range(0, rows, band):
        stop = min(start + band, rows)
        squared += float((op.target_rows(start, stop) - b[start * bh: stop * bh] @ a).square().sum())
    return math.sqrt(squared / squared_norm)


def pisa_low_rank(name: str, target: PISATarget, *, rank: int | None, max_error: float = DEFAULT_MAX_ERROR,
                  transposed: bool = False) -> LowRank:
    """LoRA factors of one PISA target: of rank ``rank`` (clipped to the matrix), or with ``rank=None`` of the
    smallest rank whose error is at most ``max_error``. Raises :class:`ToleranceError` (one line: the error
    reached and the smallest rank that meets the tolerance, or that float32 rounding alone exceeds it) when the
    error exceeds it."""
    if not max_error >= 0:
        raise S2RegError(f"the error tolerance must be a number >= 0, got {max_error}")
    limits.check_dense(target.shape, name)  # no base vouches for the declared shape here
    with one_thread():
        return _low_rank(name, target, rank, max_error, transposed)


def _low_rank(name: str, target: PISATarget, rank: int | None, max_error: float, transposed: bool) -> LowRank:
    op = PISAOperator(target, transposed=transposed)
    full = min(op.shape)
    squared_norm = op.squared_norm()
    if squared_norm == 0:  # nothing to carry: a LoRA still needs rank >= 1
        return LowRank(torch.zeros(1, op.shape[1]), torch.zeros(op.shape[0], 1), 0.0, 1, sketched=False)
    if rank is None:
        spectrum, chosen = _smallest_rank(op, max_error, squared_norm)
    else:
        chosen = min(rank, full)
        spectrum = _spectrum(op, chosen, squared_norm)
    a, b = _factors(spectrum, chosen)
    error = relative_error(op, a, b, squared_norm)
    if error > max_error:
        needed = _smallest_rank(op, max_error, squared_norm)[1]
        remedy = (f"rank {needed} meets it (leave the rank unset to pick the smallest per target)" if needed > chosen
                  else "the rounding of LoRA's float32 factors alone exceeds it")
        raise ToleranceError(f"{name}: a rank-{chosen} LoRA reaches relative error {error:.3g}, over the tolerance "
                             f"{max_error:g}; {remedy}")
    return LowRank(a, b, error, chosen, sketched=not spectrum.exact)
