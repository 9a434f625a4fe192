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
from . import dtypes
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


# -- the norm of a delta, from its coefficients ------------------------------------------------------
# Per block, FORMAT §5.3 reads x = Re(sum_j a_j e_j) with e_j[r, s] = exp(2 pi i (u_j r / bh + v_j s / bw))
# and a_j = scale * c_j * w_j / (bh * bw), where w_j = 2 when the Hermitian extension adds the mirror
# term conj(a_j e_j) and 1 in the self-conjugate columns (v = 0, v = bw/2), whose Re() halves nothing.
# Since Re(z)^2 = (|z|^2 + Re(z^2)) / 2, the squared norm over any top-left crop of the block is
#   1/2 * (sum_jl a_j conj(a_l) g(u_j - u_l, v_j - v_l) + Re sum_jl a_j a_l g(u_j + u_l, v_j + v_l))
# with g the (separable, geometric) sum of the exponentials over the crop. On a whole block g vanishes
# unless both frequencies are 0 mod the block (Parseval): only j = l and mirror pairs in the
# self-conjugate columns remain, which costs O(k) per block. Cropped edge blocks use the k x k sums.
_GRAM_ELEMENTS = 1 << 22  # complex128 Gram entries held at once (64 MiB)


def _weighted(block: tuple[int, int], indices: torch.Tensor, coefficients: torch.Tensor, scale: float):
    """``(a, u, v, self_conjugate)`` of the formula above for ``[blocks, k]`` inputs."""
    bh, bw = block
    hw = half_width(block)
    u, v = indices // hw, indices % hw
    self_conjugate = (v == 0) | ((v == bw // 2) if bw % 2 == 0 else torch.zeros_like(v, dtype=torch.bool))
    weight = torch.where(self_conjugate, 1.0, 2.0).to(torch.float64)
    a = coefficients.to(torch.complex128) * weight * (scale / (bh * bw))
    return a, u, v, self_conjugate


def _whole_blocks_sq(block, indices, coefficients, scale) -> float:
    bh, bw = block
    a, u, v, self_conjugate = _weighted(block, indices, coefficients, scale)
    mirror = ((-u) % bh) * half_width(block) + v  # the partner position in a self-conjugate column
    at = torch.searchsorted(indices, mirror).clamp(max=indices.shape[1] - 1)
    paired = self_conjugate & (indices.gather(1, at) == mirror)
    squares = a.abs().square().sum() + torch.where(paired, a * a.gather(1, at), 0).sum().real
    return float(squares) * bh * bw / 2


def _geometric(d: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """``sum_{r < length} exp(2 pi i d r / n)`` in closed form, exactly ``length`` where ``d = 0 mod n``."""
    d = d % n

    def turn(m: torch.Tensor) -> torch.Tensor:  # exp(2 pi i m / n), with m reduced mod n first
        return torch.polar(torch.ones_like(m, dtype=torch.float64), (2 * math.pi / n) * m.to(torch.float64))

    ratio = (1 - turn((d * length) % n)) / (1 - turn(d)).where(d != 0, torch.ones((), dtype=torch.complex128))
    return ratio.where(d != 0, torch.full((), complex(length), dtype=torch.complex128))


def _cropped_blocks_sq(block, indices, coefficients, scale, rows: int, cols: int) -> float:
    bh, bw = block
    k = indices.shape[1]
    if k * k > bh * bw:  # more coefficients than the k x k sums are worth: reconstruct these blocks
        total = 0.0
        chunk = max(1, _GRAM_ELEMENTS // (bh * bw))
        for start in range(0, indices.shape[0], chunk):
            part = _blocks(block, indices[start : start + chunk], coefficients[start : start + chunk], torch.complex128)
            total += float(part[:, :rows, :cols].square().sum()) * scale * scale
        return total
    a, u, v, _ = _weighted(block, indices, coefficients, scale)
    total = 0.0
    chunk = max(1, _GRAM_ELEMENTS // (k * k))
    for start in range(0, indices.shape[0], chunk):
        ac, uc, vc = a[start : start + chunk], u[start : start + chunk], v[start : start + chunk]
        du, dv = uc[:, :, None] - uc[:, None, :], vc[:, :, None] - vc[:, None, :]
        su, sv = uc[:, :, None] + uc[:, None, :], vc[:, :, None] + vc[:, None, :]
        same = torch.einsum("bj,bl,bjl->", ac, ac.conj(), _geometric(du, bh, rows) * _geometric(dv, bw, cols))
        twice = torch.einsum("bj,bl,bjl->", ac, ac, _geometric(su, bh, rows) * _geometric(sv, bw, cols))
        total += float(same.real + twice.real) / 2
    return total


def delta_norm(
    shape: tuple[int, int], block: tuple[int, int], indices: torch.Tensor, coefficients: torch.Tensor, scale: float
) -> float:
    """The Frobenius norm of :func:`reconstruct`'s delta, computed from the coefficients alone.

    Costs O(k) per whole block and at most O(k^2) per cropped edge block; the dense delta is never formed.
    """
    bh, bw = block
    gr, gc = grid_of(shape, block)
    k = indices.shape[1]
    idx = indices.to(torch.long).reshape(gr, gc, k)
    values = coefficients.reshape(gr, gc, k)
    edge_rows, edge_cols = shape[0] - (gr - 1) * bh, shape[1] - (gc - 1) * bw
    total = 0.0
    for row_part, rows in ((slice(0, gr - 1), bh), (slice(gr - 1, gr), edge_rows)):
        for col_part, cols in ((slice(0, gc - 1), bw), (slice(gc - 1, gc), edge_cols)):
            part_idx = idx[row_part, col_part].reshape(-1, k).contiguous()
            if part_idx.shape[0] == 0:
                continue
            part_values = values[row_part, col_part].reshape(-1, k)
            if (rows, cols) == (bh, bw):
                total += _whole_blocks_sq(block, part_idx, part_values, scale)
            else:
                total += _cropped_blocks_sq(block, part_idx, part_values, scale, rows, cols)
    return math.sqrt(max(total, 0.0))


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

    def delta_norm(self) -> float:
        """The Frobenius norm of :meth:`to_dense`, from the coefficients alone (no dense matrix)."""
        return delta_norm(self.shape, self.block, self.indices, self.complex_coefficients(), self.scale)

    def merged(self, weight: torch.Tensor, *, subtract: bool = False) -> torch.Tensor:
        """The whole merged (or unmerged) weight: cast_D(float32(W) +/- delta) (FORMAT §5.3)."""
        delta = self.to_dense()
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
    def payload_names(name: str) -> tuple[str, ...]:
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
        indices, coefficients = (tensors[n] for n in cls.payload_names(name))
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
