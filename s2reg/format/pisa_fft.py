"""The PISA kernel (FORMAT §5.3) in torch: reconstruction by inverse FFT, inner products, best coefficients.

:func:`reconstruct` is the one kernel for this kind: merging, unmerging, inspection and training
(it is differentiable in the coefficients) all call it, so they agree exactly. Only code that
reconstructs a PISA delta imports this module (and torch); :mod:`.pisa` holds the target itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ShapeError
from .pisa import grid_of, half_width, self_conjugate_columns


def _hermitian_columns(spectrum: torch.Tensor, bw: int) -> torch.Tensor:
    """Replace the self-conjugate columns (v = 0, and v = bw/2 for even bw) by their Hermitian part, in place.

    FFT libraries disagree on what c2r does with non-Hermitian input there; FORMAT §5.3 defines it
    as the Hermitian part, so we make the input Hermitian before calling one. Only those columns are
    rewritten (``spectrum`` is the caller's own fresh tensor; autograd records the in-place write).
    """
    bh = spectrum.shape[-2]
    mirror = (-torch.arange(bh)) % bh
    for v in self_conjugate_columns(bw):
        col = spectrum[..., v]
        spectrum[..., v] = (col + col[..., mirror].conj()) / 2
    return spectrum


def blocks(
    block: tuple[int, int], indices: torch.Tensor, coefficients: torch.Tensor, precision: torch.dtype
) -> torch.Tensor:
    """The unscaled ``[blocks, bh, bw]`` reconstructions of FORMAT §5.3 (before placing and cropping)."""
    bh, bw = block
    hw = half_width(block)
    coefficients = coefficients.to(precision)
    spectrum = torch.zeros(indices.shape[0], bh * hw, dtype=precision, device=coefficients.device)
    spectrum.scatter_(1, indices.to(device=coefficients.device, dtype=torch.long), coefficients)
    spectrum = _hermitian_columns(spectrum.view(-1, bh, hw), bw)
    return torch.fft.irfft2(spectrum, s=(bh, bw))


# Reconstruction goes a few block rows at a time: the spectrum, the inverse FFT's output and its placed copy
# of one pass stay small instead of each costing a pass over a whole tensor in memory, and a merge
# adds each pass to its weight rows at once. Every caller goes through the same passes, so merging, the
# dense delta and training agree bit for bit (an FFT library's batched result can depend on the batch).
_PASS_ELEMENTS = 1 << 22  # float32 elements of a pass (16 MiB; fewer, larger calls: each FFT call has a set-up cost)


def block_row_passes(shape: tuple[int, int], block: tuple[int, int]) -> list[tuple[int, int]]:
    """The ranges ``[first, stop)`` of block rows that :func:`deltas` reconstructs in one pass each."""
    gr, gc = grid_of(shape, block)
    step = max(1, _PASS_ELEMENTS // (gc * block[0] * block[1]))
    return [(first, min(first + step, gr)) for first in range(0, gr, step)]


def deltas(
    shape: tuple[int, int],
    block: tuple[int, int],
    indices: torch.Tensor,
    coefficients: torch.Tensor,
    scale: float,
    *,
    precision: torch.dtype = torch.complex64,
):
    """FORMAT §5.3's dense delta in passes of whole block rows: ``(first row, rows of the delta)`` each.

    The rows are those of :func:`reconstruct` (which concatenates them), bit for bit; a pass that crops
    columns is a view.
    """
    bh, bw = block
    gc = grid_of(shape, block)[1]
    for first, stop in block_row_passes(shape, block):
        unplaced = blocks(block, indices[first * gc : stop * gc], coefficients[first * gc : stop * gc], precision)
        unplaced.mul_(scale)  # before placing: the same products as after cropping, one pass fewer
        placed = unplaced.view(stop - first, gc, bh, bw).permute(0, 2, 1, 3).reshape((stop - first) * bh, gc * bw)
        yield first * bh, placed[: min(stop * bh, shape[0]) - first * bh, : shape[1]]


def reconstruct(
    shape: tuple[int, int],
    block: tuple[int, int],
    indices: torch.Tensor,
    coefficients: torch.Tensor,
    scale: float,
    *,
    precision: torch.dtype = torch.complex64,
) -> torch.Tensor:
    """FORMAT §5.3: the dense float32 delta of a PISA target.

    ``indices`` is ``[blocks, k]`` (half-plane positions ``u * hw + v``), ``coefficients`` is a
    complex ``[blocks, k]`` tensor. Differentiable with respect to ``coefficients``. The format is
    defined in complex64 (float32 output); ``precision=torch.complex128`` exists for gradient checks.
    """
    parts = [rows for _, rows in deltas(shape, block, indices, coefficients, scale, precision=precision)]
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


# -- inner products and norms of deltas, from their coefficients -------------------------------------
# Per block, FORMAT §5.3 reads x = Re(sum_j a_j e_j) with e_j[r, s] = exp(2 pi i (u_j r / bh + v_j s / bw))
# and a_j = scale * c_j * w_j / (bh * bw), where w_j = 2 when the Hermitian extension adds the mirror
# term conj(a_j e_j) and 1 in the self-conjugate columns (v = 0, v = bw/2), whose Re() halves nothing.
# Since Re(z) Re(y) = Re(z conj(y) + z y) / 2, the inner product of two deltas over any top-left crop is
#   1/2 Re( sum_jl a_j conj(b_l) g(u_j - u'_l, v_j - v'_l) + sum_jl a_j b_l g(u_j + u'_l, v_j + v'_l) )
# with g the (separable, geometric) sum of the exponentials over the crop. On a whole block g vanishes
# unless both frequencies are 0 mod the block (Parseval): only equal positions and mirror positions in
# the self-conjugate columns pair up, which costs O(k log k) per block. Cropped edge blocks use the
# k x k' sums, or (when k * k' exceeds the block's area) a reconstruction of just those blocks.
_GRAM_ELEMENTS = 1 << 22  # complex128 Gram entries (or block elements) held at once (64 MiB)


@dataclass(frozen=True)
class Spectral:
    """One delta's ``[blocks, k]`` half-plane positions, complex coefficients and scale, on a shared grid."""

    indices: torch.Tensor
    coefficients: torch.Tensor
    scale: float

    def blocks_in(self, part: tuple[slice, slice], grid: tuple[int, int]) -> Spectral:
        """The blocks in ``part`` (a range of block rows, a range of block columns) of the grid."""
        k = self.indices.shape[1]

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(*grid, k)[part].reshape(-1, k).contiguous()

        return Spectral(pick(self.indices), pick(self.coefficients), self.scale)


def _weighted(block: tuple[int, int], x: Spectral):
    """``(a, u, v, self_conjugate)`` of the formula above."""
    bh, bw = block
    hw = half_width(block)
    u, v = x.indices // hw, x.indices % hw
    self_conjugate = torch.isin(v, torch.tensor(self_conjugate_columns(bw)))
    weight = torch.where(self_conjugate, 1.0, 2.0).to(torch.float64)
    return x.coefficients.to(torch.complex128) * weight * (x.scale / (bh * bw)), u, v, self_conjugate


def _lookup(indices: torch.Tensor, values: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Per row, ``values`` at the position ``wanted`` in the sorted ``indices`` row, or 0 where absent."""
    at = torch.searchsorted(indices, wanted).clamp(max=indices.shape[1] - 1)
    return torch.where(indices.gather(1, at) == wanted, values.gather(1, at), 0)


def _whole_blocks_dot(block, x: Spectral, y: Spectral) -> float:
    bh, bw = block
    a, u, v, self_conjugate = _weighted(block, x)
    b = _weighted(block, y)[0]
    mirror = ((-u) % bh) * half_width(block) + v
    same = a * _lookup(y.indices, b, x.indices).conj()
    mirrored = torch.where(self_conjugate, a * _lookup(y.indices, b, mirror), 0)
    return float((same + mirrored).sum().real) * bh * bw / 2


def _geometric(d: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """``sum_{r < length} exp(2 pi i d r / n)`` in closed form, exactly ``length`` where ``d = 0 mod n``."""
    d = d % n

    def turn(m: torch.Tensor) -> torch.Tensor:  # exp(2 pi i m / n), with m reduced mod n first
        return torch.polar(torch.ones_like(m, dtype=torch.float64), (2 * math.pi / n) * m.to(torch.float64))

    ratio = (1 - turn((d * length) % n)) / (1 - turn(d)).where(d != 0, torch.ones((), dtype=torch.complex128))
    return ratio.where(d != 0, torch.full((), complex(length), dtype=torch.complex128))


def _cropped_blocks_dot(block, x: Spectral, y: Spectral, rows: int, cols: int) -> float:
    bh, bw = block
    kx, ky = x.indices.shape[1], y.indices.shape[1]
    total = 0.0
    if kx * ky > bh * bw:  # more coefficients than the k x k' sums are worth: reconstruct these blocks
        chunk = max(1, _GRAM_ELEMENTS // (bh * bw))
        for s in range(0, x.indices.shape[0], chunk):
            parts = [blocks(block, t.indices[s : s + chunk], t.coefficients[s : s + chunk], torch.complex128)
                     [:, :rows, :cols] * t.scale for t in (x, y)]
            total += float((parts[0] * parts[1]).sum())
        return total
    a, u, v, _ = _weighted(block, x)
    b, u2, v2, _ = _weighted(block, y)
    chunk = max(1, _GRAM_ELEMENTS // (kx * ky))
    for s in range(0, x.indices.shape[0], chunk):
        ac, bc = a[s : s + chunk], b[s : s + chunk]
        uj, ul = u[s : s + chunk, :, None], u2[s : s + chunk, None, :]
        vj, vl = v[s : s + chunk, :, None], v2[s : s + chunk, None, :]
        same = torch.einsum("bj,bl,bjl->", ac, bc.conj(), _geometric(uj - ul, bh, rows) * _geometric(vj - vl, bw, cols))
        twice = torch.einsum("bj,bl,bjl->", ac, bc, _geometric(uj + ul, bh, rows) * _geometric(vj + vl, bw, cols))
        total += float(same.real + twice.real) / 2
    return total


def delta_dot(shape: tuple[int, int], block: tuple[int, int], x: Spectral, y: Spectral) -> float:
    """The Frobenius inner product of two deltas of one shape and block (:func:`reconstruct` of each),
    computed from the coefficients alone: O(k log k) per whole block, at most O(k k') per cropped edge block.
    """
    bh, bw = block
    gr, gc = grid_of(shape, block)
    edge_rows, edge_cols = shape[0] - (gr - 1) * bh, shape[1] - (gc - 1) * bw
    total = 0.0
    for row_part, rows in ((slice(0, gr - 1), bh), (slice(gr - 1, gr), edge_rows)):
        for col_part, cols in ((slice(0, gc - 1), bw), (slice(gc - 1, gc), edge_cols)):
            xs, ys = x.blocks_in((row_part, col_part), (gr, gc)), y.blocks_in((row_part, col_part), (gr, gc))
            if xs.indices.shape[0] == 0:
                continue
            if (rows, cols) == (bh, bw):
                total += _whole_blocks_dot(block, xs, ys)
            else:
                total += _cropped_blocks_dot(block, xs, ys, rows, cols)
    return total




# -- the inverse of reconstruct: the best coefficients for a given dense delta --------------------

def _keep_masks(block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per half-plane position: energy weight of one stored coefficient, and its value multiplier.

    Interior positions stand for a conjugate pair (weight 2). In the self-conjugate columns
    (v = 0 and the Nyquist column) positions u and -u are one pair: the canonical one
    (u <= bh/2) is stored with twice the value so that FORMAT §5.3's Hermitian part restores
    both; its mirror gets weight 0; the self-paired points (u = -u) have weight 1.
    """
    bh, bw = block
    hw = half_width(block)
    weight = torch.full((bh, hw), 2.0)
    multiplier = torch.ones(bh, hw)
    for v in self_conjugate_columns(bw):
        for u in range(bh):
            mirror = (-u) % bh
            if u == mirror:
                weight[u, v] = 1.0
            elif u < mirror:
                multiplier[u, v] = 2.0
            else:
                weight[u, v] = 0.0
    return weight.reshape(-1), multiplier.reshape(-1)


def pisa_top_k(delta: torch.Tensor, block: tuple[int, int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` coefficients per block (in Frobenius norm): ``(indices, complex values)``."""
    bh, bw = block
    gr, gc = grid_of(tuple(delta.shape), block)
    padded = torch.zeros(gr * bh, gc * bw, dtype=torch.float64)
    padded[: delta.shape[0], : delta.shape[1]] = delta.to(torch.float64)
    tiles = padded.reshape(gr, bh, gc, bw).permute(0, 2, 1, 3).reshape(gr * gc, bh, bw)
    spectrum = torch.fft.rfft2(tiles).reshape(gr * gc, -1)
    weight, multiplier = _keep_masks(block)
    available = int((weight > 0).sum())
    if not 1 <= k <= available:
        raise ShapeError(f"budget {k} is out of range: a {bh}x{bw} block has {available} independent coefficients")
    indices = (spectrum.abs() ** 2 * weight).topk(k, dim=1).indices
    values = spectrum.gather(1, indices) * multiplier[indices]
    return indices, values.to(torch.complex64)
