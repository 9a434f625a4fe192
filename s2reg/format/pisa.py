"""PISA deltas (FORMAT §5): a few rfft2 coefficients per block, reconstructed by inverse FFT.

:func:`reconstruct` is the one kernel for this kind: saving, merging, inspection and training
(it is differentiable in the coefficients) all call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import FormatError, NonFiniteError, ShapeError
from . import dtypes, limits
from .manifest import require, require_dtype, require_shape, warn_unknown

COEFFICIENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_AREA = 1 << 24


def half_width(block: tuple[int, int]) -> int:
    """Width of the rfft2 half-plane of a ``(bh, bw)`` block: ``bw // 2 + 1``."""
    return block[1] // 2 + 1


def grid_of(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """``(ceil(out / bh), ceil(in / bw))`` (FORMAT §5.1)."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _hermitian_columns(spectrum: torch.Tensor, bw: int) -> torch.Tensor:
    """Replace the self-conjugate columns (v = 0, and v = bw/2 for even bw) by their Hermitian part.

    FFT libraries disagree on what c2r does with non-Hermitian input there; FORMAT §5.3 defines it
    as the Hermitian part, so we make the input Hermitian before calling one.
    """
    bh = spectrum.shape[-2]
    mirror = (-torch.arange(bh)) % bh
    columns = [0] + ([bw // 2] if bw % 2 == 0 and bw > 1 else [])
    out = spectrum.clone()
    for v in columns:
        col = spectrum[..., v]
        out[..., v] = (col + col[..., mirror].conj()) / 2
    return out


def _blocks(
    block: tuple[int, int], indices: torch.Tensor, coefficients: torch.Tensor, precision: torch.dtype
) -> torch.Tensor:
    """The unscaled ``[blocks, bh, bw]`` reconstructions of FORMAT §5.3 (before placing and cropping)."""
    bh, bw = block
    hw = half_width(block)
    coefficients = coefficients.to(precision)
    spectrum = torch.zeros(indices.shape[0], bh * hw, dtype=precision, device=coefficients.device)
    spectrum = spectrum.scatter(1, indices.to(device=coefficients.device, dtype=torch.long), coefficients)
    spectrum = _hermitian_columns(spectrum.reshape(-1, bh, hw), bw)
    return torch.fft.irfft2(spectrum, s=(bh, bw))


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
    bh, bw = block
    gr, gc = grid_of(shape, block)
    blocks = _blocks(block, indices, coefficients, precision)
    dense = blocks.reshape(gr, gc, bh, bw).permute(0, 2, 1, 3).reshape(gr * bh, gc * bw)
    return dense[: shape[0], : shape[1]] * scale


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
    self_conjugate = (v == 0) | ((v == bw // 2) if bw % 2 == 0 else torch.zeros_like(v, dtype=torch.bool))
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
            parts = [_blocks(block, t.indices[s : s + chunk], t.coefficients[s : s + chunk], torch.complex128)
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


@dataclass(eq=False)
class PISATarget:
    """One tensor's PISA delta (FORMAT §5.2). ``coefficients`` is real ``[blocks, k, 2]`` as stored."""

    kind: ClassVar[str] = "pisa"
    shape: tuple[int, ...]
    dtype: torch.dtype
    block: tuple[int, int]
    indices: torch.Tensor
    coefficients: torch.Tensor
    scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return grid_of(self.shape, self.block)

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    @property
    def num_params(self) -> int:
        """Trainable real numbers: a complex coefficient counts twice."""
        return int(self.coefficients.numel())

    def complex_coefficients(self) -> torch.Tensor:
        c = self.coefficients.to(torch.float32)
        return torch.complex(c[..., 0], c[..., 1])

    def check(self, name: str, *, allow_nonfinite: bool = False) -> None:
        """Every rule of FORMAT §5.1-5.2; raises FormatError / ShapeError / NonFiniteError."""
        if len(self.shape) != 2:
            raise ShapeError(f"{name}: PISA targets must be rank 2, shape is {list(self.shape)}")
        if self.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            raise FormatError(f"{name}: PISA needs a float base tensor, got {self.dtype}")
        bh, bw = self.block
        if bh < 1 or bw < 1 or bh * bw > MAX_BLOCK_AREA:
            raise ShapeError(f"{name}: block {list(self.block)} must have sides >= 1 and area <= {MAX_BLOCK_AREA}")
        if not math.isfinite(self.scale):
            raise NonFiniteError(f"{name}: scale {self.scale} is not finite")
        if self.coefficients.dtype not in COEFFICIENT_DTYPES:
            raise FormatError(f"{name}: coefficients must be F32, F16 or BF16, got {self.coefficients.dtype}")
        blocks = self.grid[0] * self.grid[1]
        idx = self.indices
        if idx.dim() != 2 or idx.shape[0] != blocks or idx.shape[1] < 1:
            raise ShapeError(f"{name}: indices shape {list(idx.shape)}, expected [{blocks}, k>=1] for grid {list(self.grid)}")
        if list(self.coefficients.shape) != [blocks, idx.shape[1], 2]:
            raise ShapeError(
                f"{name}: coefficients shape {list(self.coefficients.shape)}, expected [{blocks}, {idx.shape[1]}, 2]"
            )
        positions = bh * half_width(self.block)
        if int(idx.min()) < 0 or int(idx.max()) >= positions:
            raise ShapeError(f"{name}: frequency index out of range [0, {positions}) of the {bh}x{bw} half-plane")
        if idx.shape[1] > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
            raise FormatError(f"{name}: frequency indices must be strictly increasing within each block")
        if not allow_nonfinite and not bool(torch.isfinite(self.coefficients).all()):
            raise NonFiniteError(f"{name}: coefficients contain NaN or Inf (refused; FORMAT §5.2)")

    def to_dense(self) -> torch.Tensor:
        """FORMAT §5.3: the dense float32 delta."""
        return reconstruct(self.shape, self.block, self.indices, self.complex_coefficients(), self.scale)

    def spectral(self) -> Spectral:
        return Spectral(self.indices, self.complex_coefficients(), self.scale)

    def delta_norm(self) -> float:
        """The Frobenius norm of :meth:`to_dense`, from the coefficients alone (no dense matrix)."""
        return math.sqrt(max(delta_dot(self.shape, self.block, self.spectral(), self.spectral()), 0.0))

    def lines(self, dim: int, selected: torch.Tensor, *, name: str) -> torch.Tensor:
        """``to_dense().index_select(dim, selected)``, reconstructing only the blocks that hold those lines.

        Costs the touched block rows (or columns), within ``limits.MAX_DENSE``, never the whole target.
        """
        gr, gc = self.grid
        k, size = self.k, self.block[dim]
        touched, where = torch.unique(selected.long() // size, return_inverse=True)
        indices = self.indices.reshape(gr, gc, k).index_select(dim, touched)
        values = self.complex_coefficients().reshape(gr, gc, k).index_select(dim, touched)
        n_rows, n_cols = indices.shape[:2]
        bh, bw = self.block
        limits.check_dense((n_rows * bh, n_cols * bw), name)
        blocks = _blocks(self.block, indices.reshape(-1, k), values.reshape(-1, k), torch.complex64)
        dense = blocks.reshape(n_rows, n_cols, bh, bw).permute(0, 2, 1, 3).reshape(n_rows * bh, n_cols * bw)
        dense = dense[:, : self.shape[1]] if dim == 0 else dense[: self.shape[0], :]
        return dense.index_select(dim, where * size + selected.long() % size) * self.scale

    def merged(self, weight: torch.Tensor, *, subtract: bool = False) -> torch.Tensor:
        """The whole merged (or unmerged) weight: cast_D(float32(W) +/- delta) (FORMAT §5.3)."""
        delta = self.to_dense().to(weight.device)
        wide = weight.to(torch.float32)
        return (wide - delta if subtract else wide + delta).to(weight.dtype)

    def manifest_entry(self) -> dict[str, Any]:
        return {
            **self.extra,
            "shape": list(self.shape),
            "dtype": dtypes.name_of(self.dtype),
            "payload_dtype": dtypes.name_of(self.coefficients.dtype),
            "block": list(self.block),
            "grid": list(self.grid),
            "coefficients": self.k,
            "scale": self.scale,
        }

    def payload_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.indices": self.indices.to(torch.int32), f"{name}.coefficients": self.coefficients.contiguous()}

    @staticmethod
    def payload_names(name: str, entry: dict[str, Any]) -> tuple[str, ...]:
        return f"{name}.indices", f"{name}.coefficients"

    @classmethod
    def from_manifest(cls, name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PISATarget:
        where = f"targets[{name!r}]"
        known = {"shape", "dtype", "payload_dtype", "block", "grid", "coefficients", "scale"}
        warn_unknown(entry, known, where)
        shape = require_shape(entry, "shape", where)
        dtype = require_dtype(entry, "dtype", where, dtypes.FLOAT_DTYPES)
        payload_dtype = require_dtype(entry, "payload_dtype", where, frozenset({"F32", "F16", "BF16"}))
        block = require_shape(entry, "block", where)
        grid = require_shape(entry, "grid", where)
        k = require(entry, "coefficients", int, where)
        scale = require(entry, "scale", (int, float), where)
        if len(block) != 2:
            raise ShapeError(f"{name}: block must be [bh, bw], got {list(block)}")
        if len(shape) != 2 or tuple(grid) != grid_of(shape, block):
            raise ShapeError(f"{name}: grid {list(grid)} does not match shape {list(shape)} and block {list(block)}")
        indices, coefficients = (tensors[n] for n in cls.payload_names(name, entry))
        if indices.dtype != torch.int32:
            raise FormatError(f"{name}: payload indices must be I32, got {dtypes.name_of(indices.dtype)}")
        if dtypes.name_of(coefficients.dtype) != payload_dtype:
            raise FormatError(f"{name}: payload coefficients are {dtypes.name_of(coefficients.dtype)}, manifest says {payload_dtype}")
        if indices.dim() != 2 or indices.shape[1] != k:
            raise ShapeError(f"{name}: manifest says {k} coefficients per block, payload indices are {list(indices.shape)}")
        return cls(
            shape=shape,
            dtype=dtypes.to_torch(dtype),
            block=(block[0], block[1]),
            indices=indices.to(torch.int64),
            coefficients=coefficients,
            scale=float(scale),
            extra={k_: v for k_, v in entry.items() if k_ not in known},
        )


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
    for v in [0] + ([bw // 2] if bw % 2 == 0 and bw > 1 else []):
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
    blocks = padded.reshape(gr, bh, gc, bw).permute(0, 2, 1, 3).reshape(gr * gc, bh, bw)
    spectrum = torch.fft.rfft2(blocks).reshape(gr * gc, -1)
    weight, multiplier = _keep_masks(block)
    available = int((weight > 0).sum())
    if not 1 <= k <= available:
        raise ShapeError(f"budget {k} is out of range: a {bh}x{bw} block has {available} independent coefficients")
    indices = (spectrum.abs() ** 2 * weight).topk(k, dim=1).indices
    values = spectrum.gather(1, indices) * multiplier[indices]
    return indices, values.to(torch.complex64)
