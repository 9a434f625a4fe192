"""Bytes on disk of S2FT and PISA adapters for SmolLM2-135M next to a PEFT LoRA adapter of the
same trainable parameter count, saved with PEFT defaults. One run, side by side.

    python bench/adapter_size.py [--channels 32] [--json]

S2FT: ``--channels`` down_proj columns per layer, with fine-tune-like deltas (the tuned values
are bf16, as a real bf16 fine-tune leaves them; the adapter stores exact differences, FORMAT §4.3).
PISA: down_proj, 64x64 blocks, coefficients per block chosen to match the S2FT parameter count.
LoRA: rank r on down_proj, r chosen to match, factors filled with trained-like values (PEFT
initialises B to zero, which would compress unrealistically well).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.smollm2 import build_smollm2
from s2reg import PISAAdapter, S2FTAdapter, load
from s2reg.arch import resolve_source
from s2reg.tensors import CheckpointSource


def dir_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def plain_zstd(path: Path) -> int:
    return len(zstandard.ZstdCompressor(level=10).compress(path.read_bytes()))


def s2ft_adapter(source, dims, channels: int, g) -> S2FTAdapter:
    slices = {}
    for layer in range(dims.layers):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        idx = torch.randperm(dims.intermediate, generator=g)[:channels].sort().values
        slices[name] = ("columns", idx, torch.randn(dims.hidden, channels, generator=g) * 2e-3)
    return S2FTAdapter.from_slices(source, slices, base_name="HuggingFaceTB/SmolLM2-135M-Instruct")


def saved_s2ft_adapters(base, directory, count: int, channels: int = 32) -> list:
    """``count`` S2FT adapters of ``channels`` down_proj channels per layer over ``base``, saved as
    ``directory/a{i}`` (seeded by ``i``); their paths."""
    paths = []
    with CheckpointSource(base) as source:
        dims = resolve_source(source).dims
        for i in range(count):
            s2ft_adapter(source, dims, channels, torch.Generator().manual_seed(i)).save(directory / f"a{i}")
            paths.append(directory / f"a{i}")
    return paths


def pisa_adapter(source, dims, params: int, g, block: int = 64, dtype=torch.float32) -> PISAAdapter:
    grid = -(-dims.hidden // block) * -(-dims.intermediate // block)
    k = max(1, round(params / (2 * grid * dims.layers)))
    positions = block * (block // 2 + 1)
    coefficients = {}
    for layer in range(dims.layers):
        idx = torch.stack([torch.randperm(positions, generator=g)[:k] for _ in range(grid)])
        values = torch.complex(torch.randn(grid, k, generator=g), torch.randn(grid, k, generator=g)) * 0.05
        coefficients[f"model.layers.{layer}.mlp.down_proj.weight"] = ((block, block), idx, values)
    return PISAAdapter.from_coefficients(source, coefficients, base_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                                         scale=1.0 / block, coefficient_dtype=dtype)


def lora_adapter(base_dir: Path, out: Path, params: int, dims, g) -> tuple[int, int]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rank = max(1, round(params / (dims.layers * (dims.hidden + dims.intermediate))))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2e-3)
    peft_model.save_pretrained(out)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return rank, trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base_dir = build_smollm2()
    g = torch.Generator().manual_seed(0)
    rows = []
    with CheckpointSource(base_dir) as source, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dims = resolve_source(source).dims
        s2ft = s2ft_adapter(source, dims, args.channels, g)
        params = s2ft.num_params
        pisa = pisa_adapter(source, dims, params, torch.Generator().manual_seed(1))
        pisa16 = pisa_adapter(source, dims, params, torch.Generator().manual_seed(1), dtype=torch.bfloat16)
        adapters = (("s2reg S2FT", s2ft), ("s2reg PISA f32", pisa), ("s2reg PISA bf16", pisa16))
        for label, adapter in adapters:
            adapter.save(tmp / label / "raw", compress=False)
            adapter.save(tmp / label / "zst", compress=True)
            raw_file = tmp / label / "raw" / "payload.safetensors"
            assert load(tmp / label / "zst").num_params == adapter.num_params
            rows.append({
                "adapter": label, "params": adapter.num_params,
                "raw": dir_bytes(tmp / label / "raw", "*"),
                "plain_zstd": plain_zstd(raw_file) + (tmp / label / "raw" / "s2reg.json").stat().st_size,
                "byteplane_zstd": dir_bytes(tmp / label / "zst", "*"),
            })
        rank, trainable = lora_adapter(base_dir, tmp / "lora", params, dims, g)
        lora_file = tmp / "lora" / "adapter_model.safetensors"
        rows.append({
            "adapter": f"PEFT LoRA r={rank}", "params": trainable,
            "raw": dir_bytes(tmp / "lora", "*"),
            "plain_zstd": plain_zstd(lora_file) + (tmp / "lora" / "adapter_config.json").stat().st_size,
            "byteplane_zstd": None,
        })
    lora_bytes = rows[-1]["raw"]
    for r in rows:
        best = r["byteplane_zstd"] or r["raw"]
        r["bytes_per_param"] = best / r["params"]
        r["vs_lora"] = best / lora_bytes
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"SmolLM2-135M, {args.channels} down_proj channels x {dims.layers} layers = {params:,} trainable parameters\n")
    print("| adapter | params | raw dir bytes | + plain zstd | s2reg zstd-byteplane | bytes/param | size vs PEFT LoRA |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        bp = "—" if r["byteplane_zstd"] is None else f"{r['byteplane_zstd']:,}"
        print(f"| {r['adapter']} | {r['params']:,} | {r['raw']:,} | {r['plain_zstd']:,} | {bp} | "
              f"{r['bytes_per_param']:.2f} | {r['vs_lora']:.2f}x |")


if __name__ == "__main__":
    main()
