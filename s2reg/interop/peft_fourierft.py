"""PEFT FourierFT -> PISA. FourierFT stores ``n_frequency`` real coefficients per module at positions
regenerated from a seed (``randperm(out*in, seed)[:n]`` read as ``(idx // in, idx % in)``) and
reconstructs ``delta = Re(ifft2(S)) * scaling`` over the full spectrum. ``Re(ifft2(S))`` of a real
sparse ``S`` is the inverse real FFT of the Hermitian part ``(S(u,v) + S(-u,-v)) / 2``; each
coefficient therefore lands, halved, on its own position and on its mirror, wherever those fall in
the rfft2 half-plane. The result is one PISA block per matrix with its positions written out
explicitly: regenerated once here, never again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import FormatError
from ..format import PISAAdapter
from ..format.pisa import half_width
from .peft_files import PREFIX, read_peft


def fourierft_positions(out_features: int, in_features: int, n_frequency: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's seed rule for FourierFT spectrum positions: ``(rows, columns)``."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    return flat // in_features, flat % in_features


def half_plane(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
    """Half-plane positions and complex coefficients whose irfft2 equals ``Re(ifft2(S))``."""
    out, inp = shape
    hw = half_width(shape)
    acc: dict[int, float] = {}
    for u, v, s in zip(rows.tolist(), cols.tolist(), values.double().tolist(), strict=True):
        for mu, mv in ((u, v), ((-u) % out, (-v) % inp)):
            if mv < hw:
                acc[mu * hw + mv] = acc.get(mu * hw + mv, 0.0) + s / 2
    positions = torch.tensor(sorted(acc), dtype=torch.long)
    coefficients = torch.tensor([acc[p] for p in sorted(acc)], dtype=torch.float64)
    return positions, torch.complex(coefficients, torch.zeros_like(coefficients))


def import_fourierft(directory: str | os.PathLike, base, *, base_name: str | None = None) -> PISAAdapter:
    """A PEFT FourierFT adapter directory as a PISA adapter (one block per matrix) against ``base``."""
    directory = Path(directory)
    config, weights = read_peft(directory, "FOURIERFT")
    seed, scaling = config["random_loc_seed"], float(config["scaling"])
    coefficients = {}
    for key in sorted(k for k in weights if k.endswith("fourierft_spectrum")):
        module = key.removeprefix(PREFIX).removesuffix(".fourierft_spectrum")
        name = f"{module}.weight"
        shape = tuple(base.get(name).shape)
        spectrum = weights[key]
        rows, cols = fourierft_positions(shape[0], shape[1], spectrum.numel(), seed)
        positions, values = half_plane(rows, cols, spectrum, shape)
        coefficients[name] = (shape, positions[None], values[None])
    if not coefficients:
        raise FormatError(f"{directory}: no FourierFT spectra found")
    return PISAAdapter.from_coefficients(base, coefficients, base_name=base_name or config.get("base_model_name_or_path") or "unknown",
                                         scale=scaling, params={"method": "import", "from": "peft-fourierft", "seed": seed},
                                         provenance={"source": "peft-fourierft"})
