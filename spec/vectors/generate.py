"""Regenerate the golden adapters of this folder (run from the repository root).

    SOURCE_DATE_EPOCH=1767225600 python spec/vectors/generate.py

Only a deliberate format change should ever rerun this: ``tests/format/test_vectors.py`` checks
that today's s2reg reads the committed adapters to the dense deltas of ``expected.json`` and writes
them back byte for byte. The dense deltas are computed here with numpy alone, from the inputs below
(FORMAT §4.4 by placing the slices; FORMAT §5.3 by the Hermitian extension and a float64 inverse
DFT), never by s2reg. The numbers are small dyadic values so that every delta is exact and nonzero.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from s2reg import PISAAdapter, S2FTAdapter

HERE = Path(__file__).resolve().parent
DOWN = "model.layers.0.mlp.down_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"  # stacked experts (FORMAT §4.5): [experts, in, out]
EXPERT_DOWN = "model.layers.0.mlp.experts.down_proj"

BASE = {
    DOWN: np.arange(1, 25, dtype=np.float64).reshape(4, 6) / 8,
    Q: -np.arange(1, 17, dtype=np.float64).reshape(4, 4) / 4,
    UP: np.arange(1, 31, dtype=np.float64).reshape(5, 6) / 16,
    GATE_UP: np.arange(1, 73, dtype=np.float64).reshape(3, 4, 6) / 32,
    EXPERT_DOWN: -np.arange(1, 37, dtype=np.float64).reshape(3, 3, 4) / 16,
}
S2FT_SLICES = {  # name -> (axis, indices, delta slice), dtype of the base: BF16
    DOWN: ("columns", [1, 4], np.array([[0.5, -0.25], [0.125, 1.0], [-2.0, 0.75], [0.25, -0.5]])),
    Q: ("rows", [2, 3], np.array([[1.0, 0.5, -0.25, 2.0], [-1.0, 0.25, 0.5, -0.125]])),
}
EXPERT_SLICES = {  # version 3: index e * n + k is row/column k of expert e (FORMAT §4.1)
    # columns 2, 3 of expert 0, 0, 1 of expert 1, 4, 5 of expert 2 (n = 6)
    GATE_UP: ("expert_columns", [2, 3, 6, 7, 16, 17],
              np.array([[0.5, -0.25, 1.0, 0.125, -1.0, 2.0], [0.25, 0.5, -0.5, 0.75, 1.0, -0.125],
                        [-2.0, 1.0, 0.25, -0.25, 0.5, 0.5], [1.0, -0.75, 0.125, 2.0, -0.5, 0.25]])),
    # row 1 of expert 0, row 2 of expert 1, row 0 of expert 2 (n = 3)
    EXPERT_DOWN: ("expert_rows", [1, 5, 6], np.array([[0.5, 1.0, -0.25, 0.125], [-1.0, 0.25, 0.75, -0.5],
                                                     [2.0, -0.125, 0.5, 1.0]])),
}
PISA_BLOCK = (2, 4)  # UP is 5 x 6: both sides are cropped (FORMAT §5.3)
PISA_INDICES = np.array([[0, 4, 5], [1, 2, 5], [0, 3, 5], [2, 3, 4], [1, 4, 5], [0, 1, 3]])  # half-plane 2 x 3
PISA_VALUES = np.array([[complex(0.5, 0), complex(-0.25, 0.5), complex(1, -0.75)]] * 6) * np.arange(1, 7)[:, None] / 4
PISA_SCALE = 0.5


def dense_s2ft(shape, axis, indices, values) -> np.ndarray:
    out = np.zeros(shape)
    for j, i in enumerate(indices):
        if axis == "rows":
            out[i, :] = values[j]
        elif axis == "columns":
            out[:, i] = values[:, j]
        elif axis == "expert_rows":
            out[i // shape[1], i % shape[1], :] = values[j]
        else:
            out[i // shape[2], :, i % shape[2]] = values[:, j]
    return out


def dense_pisa(shape, block, indices, values, scale) -> np.ndarray:
    bh, bw = block
    hw = bw // 2 + 1
    gr, gc = -(-shape[0] // bh), -(-shape[1] // bw)
    out = np.zeros((gr * bh, gc * bw))
    for n in range(gr * gc):
        half = np.zeros((bh, hw), dtype=np.complex128)
        for position, value in zip(indices[n], values[n], strict=True):
            half[position // hw, position % hw] = value
        full = np.zeros((bh, bw), dtype=np.complex128)
        for u in range(bh):
            for v in range(bw):
                full[u, v] = half[u, v] if v < hw else np.conj(half[(-u) % bh, bw - v])
        r, c = divmod(n, gc)
        out[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw] = scale * np.fft.ifft2(full).real
    return out[: shape[0], : shape[1]]


def main() -> None:
    base = {name: torch.tensor(values).to(torch.bfloat16) for name, values in BASE.items()}
    s2ft = S2FTAdapter.from_slices(
        base, {n: (axis, idx, torch.tensor(d)) for n, (axis, idx, d) in S2FT_SLICES.items()},
        base_name="s2reg/golden-tiny", group_sizes={Q: 2}, params={"note": "golden vector"},
    )
    pisa = PISAAdapter.from_coefficients(
        {UP: base[UP].to(torch.float32)},
        {UP: (PISA_BLOCK, torch.tensor(PISA_INDICES), torch.tensor(PISA_VALUES))},
        base_name="s2reg/golden-tiny", scale=PISA_SCALE, params={"note": "golden vector"},
    )
    experts = S2FTAdapter.from_slices(
        base, {n: (axis, idx, torch.tensor(d)) for n, (axis, idx, d) in EXPERT_SLICES.items()},
        base_name="s2reg/golden-tiny", params={"note": "golden vector"},
    )
    vectors = {"s2ft-raw": (s2ft, False), "s2ft-zstd": (s2ft, True), "pisa-zstd": (pisa, True),
               "s2ft-experts-zstd": (experts, True)}
    expected = {}
    for name, (adapter, compress) in vectors.items():
        shutil.rmtree(HERE / name, ignore_errors=True)
        adapter.save(HERE / name, compress=compress)
        if adapter is experts:
            dense = {n: dense_s2ft(BASE[n].shape, *EXPERT_SLICES[n]).tolist() for n in EXPERT_SLICES}
        elif adapter.kind == "s2ft":
            dense = {n: dense_s2ft(BASE[n].shape, *S2FT_SLICES[n]).tolist() for n in S2FT_SLICES}
        else:
            dense = {UP: dense_pisa(BASE[UP].shape, PISA_BLOCK, PISA_INDICES, PISA_VALUES, PISA_SCALE).tolist()}
        expected[name] = {
            "compress": compress,
            "files": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((HERE / name).iterdir())},
            "dense": dense,
        }
    text = json.dumps(expected, indent=1, sort_keys=True) + "\n"
    (HERE / "expected.json").write_text(text)


if __name__ == "__main__":
    assert os.environ.get("SOURCE_DATE_EPOCH"), "set SOURCE_DATE_EPOCH so that provenance.created is fixed"
    main()
