"""Builders for surgery tests: tiny checkpoints, S2FT/PISA adapters against them, file digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from s2reg import PISAAdapter, S2FTAdapter
from s2reg.arch import resolve_source
from s2reg.format.arrays import as_array, to_torch
from s2reg.synth import build_checkpoint
from s2reg.tensors import CheckpointSource


def tiny(path: Path, family: str = "llama", dtype=torch.bfloat16, **overrides) -> Path:
    return build_checkpoint(path, family, dtype=dtype, max_shard_bytes=30_000, **overrides)


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file in a checkpoint directory (hidden files included)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def tensor_digests(directory: Path) -> dict[str, str]:
    with CheckpointSource(directory) as source:
        return {n: source.sha256_of(n) for n in source.names()}


def s2ft(base: Path, seed: int = 0, heads=(1,), channels=(3, 4, 40), layers=None, scale=0.05) -> S2FTAdapter:
    """Heads (q rows + o columns) and FFN channels (up rows + down columns) in every layer."""
    with CheckpointSource(base) as source:
        info = resolve_source(source)
        dims = info.dims
        g = torch.Generator().manual_seed(seed)
        ch = torch.tensor(sorted(channels))
        slices, groups = {}, {}
        for layer in layers if layers is not None else range(dims.layers):
            q, o, up, down = (info.tensors(r, layer)[0] for r in ("q", "o", "up", "down"))
            rows = info.unit_indices(q, "q", heads)
            slices[q] = ("rows", rows, torch.randn(len(rows), dims.hidden, generator=g) * scale)
            slices[o] = ("columns", rows, torch.randn(dims.hidden, len(rows), generator=g) * scale)
            slices[up] = ("rows", ch, torch.randn(len(ch), dims.hidden, generator=g) * scale)
            slices[down] = ("columns", ch, torch.randn(dims.hidden, len(ch), generator=g) * scale)
            groups[q] = groups[o] = dims.head_dim
        return S2FTAdapter.from_slices(source, slices, base_name="tiny", group_sizes=groups)


def pisa(base: Path, seed: int = 1, block=(16, 16), k: int = 6, roles=("v", "down")) -> PISAAdapter:
    with CheckpointSource(base) as source:
        info = resolve_source(source)
        g = torch.Generator().manual_seed(seed)
        coefficients = {}
        for layer in range(info.dims.layers):
            for role in roles:
                (name,) = info.tensors(role, layer)
                rows, cols = source.shape(name)
                blocks = -(-rows // block[0]) * -(-cols // block[1])
                positions = block[0] * (block[1] // 2 + 1)
                idx = torch.stack([torch.randperm(positions, generator=g)[:k] for _ in range(blocks)])
                values = torch.complex(torch.randn(blocks, k, generator=g), torch.randn(blocks, k, generator=g))
                coefficients[name] = (block, idx, values)
        return PISAAdapter.from_coefficients(source, coefficients, base_name="tiny", scale=0.02)


def model_of(directory: Path, dtype=torch.bfloat16):
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    cls = transformers.BertForMaskedLM if config.model_type == "bert" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(directory, dtype=dtype).eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def negative_zeros(t) -> torch.Tensor:
    """Where a bf16 tensor (torch, or numpy from the format layer) holds -0.0 (bit pattern 0x8000)."""
    return to_torch(as_array(t)).view(torch.int16) == -32768


def signed_zero_changes(source, layers=(0, 1)):
    """Row slices of q and up, and column slices of down, changed so that every kind of signed-zero change
    occurs: -0.0 -> nonzero, nonzero -> -0.0, -0.0 -> +0.0, +0.0 -> -0.0, and ordinary changes."""
    info = resolve_source(source)
    g = torch.Generator().manual_seed(3)
    slices, expected = {}, {}
    for layer in layers:
        for role, axis, indices in (("q", "rows", [4, 5, 17]), ("up", "rows", [0, 9]), ("down", "columns", [2, 30, 31])):
            (name,) = info.tensors(role, layer)
            weight = source.get(name)
            part = weight.index_select(0 if axis == "rows" else 1, torch.tensor(indices))
            moved = (part.double() + torch.randn(part.shape, generator=g, dtype=torch.float64) * 0.01).to(part.dtype)
            zeros = negative_zeros(part).reshape(-1).nonzero().reshape(-1)
            assert zeros.numel() >= 2, "the fixture must put -0.0 into every trained slice"
            flat = moved.reshape(-1)
            flat[zeros[0]] = 0.0  # -0.0 -> +0.0
            flat[zeros[1:]] = torch.randn(zeros.numel() - 1, generator=g).to(part.dtype)  # -0.0 -> nonzero
            flat[3] = -0.0  # nonzero -> -0.0
            slices[name] = (axis, indices, moved)
            full = weight.clone()
            full.index_copy_(0 if axis == "rows" else 1, torch.tensor(indices), moved)
            expected[name] = full
    return slices, expected
