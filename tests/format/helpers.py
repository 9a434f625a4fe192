"""Builders for format tests: tiny bases, adapters, and forged adapter directories.

``forge`` writes an adapter directory from arbitrary manifest and payload content with
*consistent* digests, so tests reach the checks behind the hash check (FORMAT §7 step 4).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from s2reg import PISAAdapter, S2FTAdapter
from s2reg.format import codec, manifest, payload
from s2reg.format.adapter import payload_metadata
from s2reg.format.digest import sha256_bytes

DOWN = "model.layers.0.mlp.down_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"  # stacked experts [experts, in, out] (FORMAT §4.5)
EXPERT_DOWN = "model.layers.0.mlp.experts.down_proj"


def tiny_base(dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        DOWN: torch.randn(16, 40, generator=g).to(dtype),
        Q: torch.randn(32, 16, generator=g).to(dtype),
        UP: torch.randn(40, 16, generator=g).to(dtype),
    }


def s2ft_adapter(base=None, seed=1, **kwargs) -> S2FTAdapter:
    base = base if base is not None else tiny_base()
    g = torch.Generator().manual_seed(seed)
    return S2FTAdapter.from_slices(
        base,
        {
            DOWN: ("columns", [3, 7, 8, 30], torch.randn(16, 4, generator=g) * 0.05),
            Q: ("rows", list(range(8, 16)), torch.randn(8, 16, generator=g) * 0.05),
        },
        base_name="tiny",
        group_sizes={Q: 8},
        **kwargs,
    )


def expert_base(dtype=torch.bfloat16, seed=3) -> dict[str, torch.Tensor]:
    """Stacked experts as gpt-oss stores them: 3 experts, hidden 8, 2 x 5 interleaved gate/up columns."""
    g = torch.Generator().manual_seed(seed)
    base = {GATE_UP: torch.randn(3, 8, 10, generator=g).to(dtype), EXPERT_DOWN: torch.randn(3, 5, 8, generator=g).to(dtype)}
    for tensor in base.values():
        tensor.view(-1)[::7] = -0.0  # merge/unmerge must carry signed zeros through restore lists
    return base


def expert_adapter(base=None, seed=4, **kwargs) -> S2FTAdapter:
    """Channels of single experts (version 3 expert axes): one target per stacked tensor."""
    base = base if base is not None else expert_base()
    g = torch.Generator().manual_seed(seed)
    return S2FTAdapter.from_slices(
        base,
        {
            GATE_UP: ("expert_columns", [2, 3, 10, 11, 28, 29], torch.randn(8, 6, generator=g) * 0.05),
            EXPERT_DOWN: ("expert_rows", [1, 5, 14], torch.randn(3, 8, generator=g) * 0.05),
        },
        base_name="tiny-experts",
        **kwargs,
    )


def random_half_plane_indices(blocks: int, k: int, block: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    positions = block[0] * (block[1] // 2 + 1)
    return torch.stack([torch.randperm(positions, generator=g)[:k] for _ in range(blocks)])


def pisa_adapter(base=None, seed=2, block=(4, 8), k=5, **kwargs) -> PISAAdapter:
    base = base if base is not None else tiny_base()
    g = torch.Generator().manual_seed(seed)
    coefficients = {}
    for name in (DOWN, UP):
        rows, cols = base[name].shape
        blocks = -(-rows // block[0]) * -(-cols // block[1])
        idx = random_half_plane_indices(blocks, k, block, g)
        values = torch.complex(torch.randn(blocks, k, generator=g), torch.randn(blocks, k, generator=g))
        coefficients[name] = (block, idx, values)
    return PISAAdapter.from_coefficients(base, coefficients, base_name="tiny", scale=0.5, **kwargs)


def forge(path: Path, manifest_obj: dict, tensors: dict[str, torch.Tensor] | bytes, *, compress: bool = False,
          blob: bytes | None = None, **payload_entry) -> Path:
    """Write ``manifest_obj`` (payload entry recomputed, then updated with ``payload_entry``) and ``tensors`` as an
    adapter directory. ``tensors`` may be raw payload bytes instead, and ``blob`` a compressed form of them."""
    raw = tensors if isinstance(tensors, bytes) else payload.dump(
        tensors, payload_metadata(manifest_obj.get("format_version", 1), manifest_obj.get("kind", "s2ft")))
    compress = compress or blob is not None
    blob = blob if blob is not None else codec.encode(raw) if compress else raw
    encoding = "zstd-byteplane" if compress else "raw"
    manifest_obj = json.loads(json.dumps(manifest_obj))
    manifest_obj["payload"] = {
        "file": manifest.PAYLOAD_FILES[encoding],
        "encoding": encoding,
        "bytes": len(blob),
        "sha256": sha256_bytes(blob),
        "raw_bytes": len(raw),
        "raw_sha256": sha256_bytes(raw),
        **({"zstd_level": codec.DEFAULT_LEVEL} if compress else {}),
        **payload_entry,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / manifest.MANIFEST_NAME).write_bytes(manifest.dump(manifest_obj))
    (path / manifest.PAYLOAD_FILES[encoding]).write_bytes(blob)
    return path


def parts(adapter) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter's manifest object and payload tensors, for tampering with one and re-forging."""
    raw = adapter.payload_bytes()
    tensors, _ = payload.load(raw)
    return adapter.manifest_for(raw, raw, "raw", None), tensors


def signed_zero_adapter(**kwargs) -> S2FTAdapter:
    """A bf16 adapter whose changes need restore lists (FORMAT §4.3): -0.0 moved, values moved to -0.0."""
    base = tiny_base()
    base[DOWN][[1, 5, 9], 7] = -0.0
    base[Q][9, [0, 3]] = -0.0
    tuned_down = base[DOWN][:, [3, 7, 8, 30]].clone()
    tuned_down[1, 1], tuned_down[5, 1], tuned_down[0, 0] = 0.5, 0.0, -0.0  # -0.0 -> 0.5, -0.0 -> +0.0, x -> -0.0
    tuned_down[2:4] += 0.25
    tuned_q = base[Q][8:16].clone()
    tuned_q[1, 0] = 1.0
    return S2FTAdapter.from_tuned(base, {DOWN: ("columns", [3, 7, 8, 30], tuned_down), Q: ("rows", list(range(8, 16)), tuned_q)},
                                  base_name="tiny", group_sizes={Q: 8}, **kwargs)
