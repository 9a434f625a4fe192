"""An adapter as a llama.cpp LoRA adapter GGUF (``llama-cli --lora``, llama-cpp-python's ``lora_path``,
an Ollama Modelfile's ``ADAPTER``).

The factors are the PEFT LoRA ones (``export_lora``: one-hot and exact for S2FT, a truncated SVD for PISA),
renamed to llama.cpp's tensors by the ``gguf`` package's own name map for the architecture, and put in the
layout llama.cpp reads (src/llama-adapter.cpp):

- metadata ``general.type = adapter``, ``adapter.type = lora``, ``general.architecture`` (must equal the
  base GGUF's) and ``adapter.lora.alpha``;
- per base tensor ``W`` (``blk.3.attn_q.weight``) a pair ``W.lora_a`` ``[r, in]`` and ``W.lora_b``
  ``[out, r]`` (numpy order; GGUF lists dimensions reversed), F32; the engine adds
  ``scale * B @ (A @ x)`` with ``scale = alpha / r``, ``r`` read per tensor from ``lora_b``.

One ``alpha`` serves every tensor, so every pair is padded with zero rows/columns to the adapter's largest
rank ``R`` and ``alpha = R``: each scale is then exactly 1 and the delta is exactly ``B @ A`` (zeros add
nothing), whatever rank each target had.

llama.cpp's converter (convert_hf_to_gguf) permutes the q and k rows of Llama-style models so its
rotary kernel sees interleaved pairs (per head, rows ``[x0..x(d/2-1), y0..y(d/2-1)]`` become
``[x0, y0, x1, y1, ...]``); the base GGUF holds those rows, so ``lora_b`` of q and k gets the same
permutation (for an S2FT adapter it stays one-hot).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import S2RegError
from ..format import Adapter
from ..fsatomic import check_free, write_file
from .export_results import GGUFExport
from .peft_files import PREFIX, read_peft, with_portable_base
from .peft_lora import export_lora
from .pisa_lowrank import DEFAULT_MAX_ERROR


@dataclass(frozen=True)
class GGUFFamily:
    """How llama.cpp's converter treats one of s2reg's families: its GGUF architecture, and whether the
    q/k rows are permuted for llama.cpp's rotary layout."""

    arch: str                 # a gguf.MODEL_ARCH member name
    permutes_qk: bool = False


# s2reg family -> llama.cpp architecture, as convert_hf_to_gguf converts their transformers classes. Families
# llama.cpp converts with other changes to the projection matrices (GPT-2's transposed Conv1D, GPT-NeoX's
# and Falcon's regrouped fused qkv, DeepSeek's split MLA projections, gpt-oss's fused experts), or not
# at all (encoders, ViT, Ministral), are left out and refused by name.
FAMILIES = {
    "llama": GGUFFamily("LLAMA", permutes_qk=True),
    "mistral": GGUFFamily("LLAMA", permutes_qk=True),
    "mixtral": GGUFFamily("LLAMA", permutes_qk=True),
    "granite": GGUFFamily("GRANITE", permutes_qk=True),
    "smollm3": GGUFFamily("SMOLLM3", permutes_qk=True),
    "qwen2": GGUFFamily("QWEN2"),
    "qwen3": GGUFFamily("QWEN3"),
    "qwen2_moe": GGUFFamily("QWEN2MOE"),
    "qwen3_moe": GGUFFamily("QWEN3MOE"),
    "gemma": GGUFFamily("GEMMA"),
    "gemma2": GGUFFamily("GEMMA2"),
    "gemma3_text": GGUFFamily("GEMMA3"),
    "olmo2": GGUFFamily("OLMO2"),
    "phi3": GGUFFamily("PHI3"),
    "stablelm": GGUFFamily("STABLELM"),
    "stablelm_qk_norm": GGUFFamily("STABLELM"),
    "starcoder2": GGUFFamily("STARCODER2"),
    "cohere": GGUFFamily("COMMAND_R"),
}


def rope_row_order(rows: int, heads: int) -> torch.Tensor:
    """Index ``order`` with ``permuted = weight[order]``: llama.cpp's row order of a q or k projection with
    ``heads`` heads, from transformers' (halves per head) to interleaved pairs per head."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, 2, half).transpose(1, 2).reshape(-1)


@dataclass(frozen=True)
class _Base:
    family: str
    heads: int
    kv_heads: int
    layers: int


def _base(adapter: Adapter, base: str | os.PathLike | None) -> _Base:
    """The base checkpoint's family and head counts, from ``base`` or the adapter's recorded base directory."""
    from ..arch import resolve_source
    from ..tensors import CheckpointSource

    directory = Path(base) if base is not None else Path(adapter.base.name)
    if not (directory / "config.json").is_file():
        where = f"{directory} is not a checkpoint directory" if base is not None else \
            f"the adapter's base {adapter.base.name!r} is not a local checkpoint"
        raise S2RegError(f"{where}: GGUF export needs the base's config.json (its family and head counts); pass --base CKPT")
    with CheckpointSource(directory) as source:
        info = resolve_source(source)
    return _Base(info.family.name, info.dims.heads, info.dims.kv_heads, info.dims.layers)


def gguf_family(family: str) -> GGUFFamily:
    """The llama.cpp treatment of ``family``; a one-line refusal for a family s2reg does not export to GGUF."""
    if family not in FAMILIES:
        raise S2RegError(f"the {family} family has no GGUF LoRA export (llama.cpp's converter changes its projections "
                         f"in ways s2reg does not reproduce, or does not convert it); supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family]


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's ``alpha / r`` for ``module``: its alpha pattern names the module, or its weight when the export names
    parameters (models with fused experts)."""
    pattern = config.get("alpha_pattern") or {}
    alpha = pattern.get(module, pattern.get(f"{module}.weight", config["lora_alpha"]))
    return float(alpha) / rank


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - a.shape[0]
    return (torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1))


def gguf_tensors(adapter: Adapter, base: str | os.PathLike | None = None, *, rank: int | None = None,
                 max_error: float = DEFAULT_MAX_ERROR) -> tuple[str, dict[str, torch.Tensor], GGUFExport]:
    """``(architecture, {gguf tensor name: F32 factor}, export report)`` for ``adapter`` on llama.cpp."""
    import gguf

    info = _base(adapter, base)
    family = gguf_family(info.family)
    experts = sorted(n for n in adapter.targets if ".experts." in n)
    if experts:
        raise S2RegError(f"{experts[0]}: targets on MoE experts have no GGUF LoRA export (llama.cpp stacks the experts "
                         "into one tensor per projection); export adapters on attention and shared projections only")
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.TensorNameMap(arch, info.layers)
    with tempfile.TemporaryDirectory(prefix="s2reg-gguf-") as scratch:
        report = export_lora(adapter, Path(scratch) / "peft", rank=rank, max_error=max_error, base=base)
        config, weights = read_peft(Path(scratch) / "peft", "LORA")
    pairs = {}
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        target = names.get_name(module)
        if target is None:
            raise S2RegError(f"{module}.weight: llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} architecture has no tensor for it")
        a, b = weights[key].float(), weights[key.replace("lora_A", "lora_B")].float()
        scaling = _scaling(config, module, a.shape[0])
        if scaling != 1.0:
            b = b * scaling
        if family.permutes_qk and module.endswith(("q_proj", "k_proj")):
            heads = info.heads if module.endswith("q_proj") else info.kv_heads
            b = b[rope_row_order(b.shape[0], heads)]
        pairs[f"{target}.weight"] = (a, b)
    top = max(a.shape[0] for a, _ in pairs.values())
    tensors = {}
    for name, (a, b) in pairs.items():
        a, b = _pad(a, b, top)
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a.contiguous(), b.contiguous()
    summary = GGUFExport(architecture=gguf.MODEL_ARCH_NAMES[arch], family=info.family, rank=top, alpha=float(top),
                         tensors=len(pairs), max_relative_error=report.max_relative_error,
                         relative_error=report.relative_error)
    return gguf.MODEL_ARCH_NAMES[arch], tensors, summary


def export_gguf_lora(adapter: Adapter, output: str | os.PathLike, *, base: str | os.PathLike | None = None,
                     rank: int | None = None, max_error: float = DEFAULT_MAX_ERROR,
                     overwrite: bool = False) -> GGUFExport:
    """Write ``adapter`` as a llama.cpp LoRA adapter GGUF at ``output``; the export report.

    ``base``: the checkpoint directory the adapter is for (its family and head counts); by default the
    adapter's recorded base name when that is a directory. ``rank``, ``max_error``: PISA's low-rank export, as
    ``export_lora``'s.
    """
    import gguf

    output = Path(output)
    check_free(output, overwrite=overwrite)
    adapter, base = with_portable_base(adapter, base)
    arch, tensors, summary = gguf_tensors(adapter, base, rank=rank, max_error=max_error)
    with tempfile.TemporaryDirectory(prefix="s2reg-gguf-") as scratch:
        staged = Path(scratch) / "adapter.gguf"
        writer = gguf.GGUFWriter(staged, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, summary.alpha)
        writer.add_string("s2reg.base_model", adapter.base.name)
        writer.add_string("s2reg.adapter_kind", adapter.kind)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        output.parent.mkdir(parents=True, exist_ok=True)
        write_file(output, staged.read_bytes())
    return replace(summary, output=str(output))
