"""A PISA delta as a linear operator: its products with blocks of vectors by FFTs, never the dense matrix.

Per block (FORMAT §5.3), ``delta[r, s] = Re(sum_j a_j w_bh^(u_j r) w_bw^(v_j s))`` with ``w_n = exp(2 pi i / n)``,
the block's stored frequencies ``(u_j, v_j)`` and ``a_j = scale * c_j * m_j / (bh * bw)``, where ``m_j = 2``
(the Hermitian extension adds the conjugate term) except in the self-conjugate columns (v = 0 and v = bw/2),
whose ``Re()`` is FORMAT's Hermitian part (``m_j = 1``). For real ``X``, one block row of ``delta @ X`` is then

    Re( sum_u w_bh^(u r) Z[u] ),   Z[u] = sum over the row's blocks C and their j with u_j = u of a_j Xhat_C[v_j]

where ``Xhat_C[v] = sum_s w_bw^(v s) X_C[s]`` is an FFT of the block's slice of ``X`` (zero-padded past the
matrix: FORMAT's crop). ``delta.T @ Y`` is the same with the roles of rows and columns swapped. One product
costs two FFTs of the vectors and ``blocks * k`` multiply-adds per vector (a sparse product: one entry per
stored coefficient), against ``out * in`` for the dense matrix. Everything runs in float64/complex128, so the
products agree with the dense float64 delta to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.pisa import PISATarget, grid_of, half_width, self_conjugate_columns


class PISAOperator:
    """``delta`` of one PISA target (transposed when ``transposed``: a GPT-2 ``Conv1D`` weight) as an operator."""

    def __init__(self, target: PISATarget, *, transposed: bool = False) -> None:
        bh, bw = target.block
        gr, gc = grid_of(target.shape, target.block)
        hw = half_width(target.block)
        k = target.k
        indices = torch.as_tensor(target.indices, dtype=torch.long).reshape(gr, gc, k)
        u, v = indices // hw, indices % hw
        self_conjugate = torch.isin(v, torch.tensor(self_conjugate_columns(bw)))
        weight = torch.where(self_conjugate, 1.0, 2.0).to(torch.float64)
        a = target.complex_coefficients().to(torch.complex128).reshape(gr, gc, k) * weight * (target.scale / (bh * bw))
        # Z = S @ Xhat with S[R * bh + u_j, C * bw + v_j] = a_j: one entry per stored coefficient (positions are
        # unique within a block), so delta.T's S is S's plain transpose
        spectral_rows = (torch.arange(gr).reshape(gr, 1, 1) * bh + u).reshape(-1)
        spectral_columns = (torch.arange(gc).reshape(1, gc, 1) * bw + v).reshape(-1)
        mixing = torch.sparse_coo_tensor(torch.stack([spectral_rows, spectral_columns]), a.reshape(-1),
                                         (gr * bh, gc * bw), check_invariants=True).coalesce()
        forward = _Side(mixing, bw, target.shape[1], bh, target.shape[0])
        backward = _Side(mixing.t().coalesce(), bh, target.shape[0], bw, target.shape[1])
        self._forward, self._backward = (backward, forward) if transposed else (forward, backward)
        self.shape = (self._forward.length_out, self._forward.length_in)
        self.target, self.transposed, self.grid = target, transposed, (gr, gc)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """``delta @ x`` for ``x`` of shape ``[in, l]``: float64 ``[out, l]``."""
        return self._forward.apply(x)

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        """``delta.T @ y`` for ``y`` of shape ``[out, l]``: float64 ``[in, l]``."""
        return self._backward.apply(y)

    def dense(self) -> torch.Tensor:
        """The float64 ``[out, in]`` matrix: FORMAT §5.3's reconstruction in double precision."""
        dense = self.target_rows(0, self.grid[0])
        return dense.t() if self.transposed else dense

    def target_rows(self, start: int, stop: int) -> torch.Tensor:
        """Block rows ``start:stop`` of the target's delta (as stored, never transposed) in float64, cropped."""
        from ..format.pisa_fft import blocks

        t, (bh, bw), gc = self.target, self.target.block, self.grid[1]
        part = slice(start * gc, stop * gc)
        tiles = blocks(t.block, torch.as_tensor(t.indices[part]), t.complex_coefficients()[part], torch.complex128)
        rows = tiles.reshape(stop - start, gc, bh, bw).permute(0, 2, 1, 3).reshape((stop - start) * bh, gc * bw)
        return rows[: t.shape[0] - start * bh, : t.shape[1]] * t.scale

    def squared_norm(self) -> float:
        """``||delta||_F^2`` from the coefficients alone (Parseval: ``PISATarget.delta_norm``)."""
        return self.target.delta_norm() ** 2


@dataclass(frozen=True)
class _Side:
    """One direction of the product: the sparse spectral mixing and the block side and length of each end."""

    mixing: torch.Tensor
    side_in: int
    length_in: int
    side_out: int
    length_out: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[0] != self.length_in:
            raise ValueError(f"the operator takes [{self.length_in}, l], got {list(x.shape)}")
        columns = x.shape[1]
        padded = torch.zeros(self.mixing.shape[1], columns, dtype=torch.float64)
        padded[: self.length_in] = x
        # sum_s w^(f s) x[s] for every frequency f: the conjugate of the FFT, as x is real
        spectrum = torch.fft.fft(padded.reshape(-1, self.side_in, columns), dim=1).conj().reshape(-1, columns)
        z = torch.sparse.mm(self.mixing, spectrum).reshape(-1, self.side_out, columns)
        # Re(sum_f w^(f r) z[f]) = Re(side * ifft(z)[r])
        out = torch.fft.ifft(z, dim=1).real * self.side_out
        return out.reshape(-1, columns)[: self.length_out]
