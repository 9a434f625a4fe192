"""S2FT <-> PEFT LoRA. An S2FT delta is exactly a LoRA with a one-hot factor: rows ``R`` with delta
``D`` are ``B = E_R`` (one-hot columns), ``A = D``; columns ``C`` are ``B = D``, ``A = E_C^T``; the
rank is the number of selected rows or columns and ``lora_alpha = r`` (scaling 1); LoRA factors are
F32, so an F64 delta is rounded. PISA exports through a truncated SVD of its dense delta. Either way the
relative error of the exported delta is reported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import FormatError, S2RegError
from ..format import Adapter, S2FTAdapter, S2FTTarget, limits
from ..fsatomic import building
from .peft_files import PREFIX, read_peft


def _module(name: str) -> str:
    if not name.endswith(".weight"):
        raise S2RegError(f"{name}: only weight matrices export to LoRA (this target is not one)")
    return name.removesuffix(".weight")


def _lora_error(target: S2FTTarget, stored: torch.Tensor) -> float:
    """Relative (Frobenius) error of the LoRA's delta against the true change of the slice.

    LoRA factors are F32 (PEFT loads them into parameters of the base's dtype, or F32 for 16-bit
    bases, and merges in that precision), so an F64 delta (FORMAT §4.3) is rounded; elements with a
    restore list change by ``tuned - base``, which the delta holds only up to rounding.
    """
    true = target.delta.double().clone()
    if target.restore is not None:
        true.view(-1)[target.restore.index] = target.restore.tuned.double() - target.restore.base.double()
    norm = float(true.norm())
    return float((stored.double() - true).norm()) / norm if norm else float((stored.double() - true).norm())


def _factors(name: str, target, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [r, in], B [out, r], relative error)`` for one target."""
    if isinstance(target, S2FTTarget):
        if len(target.shape) != 2:
            raise S2RegError(f"{name}: only matrices export to LoRA")
        n = target.count
        limits.check_dense((target.shape[0 if target.axis == "rows" else 1], n), name)  # a declared length
        one_hot = torch.zeros(target.shape[0 if target.axis == "rows" else 1], n, dtype=torch.float32)
        one_hot[target.indices.long(), torch.arange(n)] = 1.0
        delta = target.delta.to(torch.float32)
        error = _lora_error(target, delta)
        if target.axis == "rows":
            return delta, one_hot, error
        return one_hot.t().contiguous(), delta, error
    if rank is None:
        raise S2RegError("PISA adapters export to LoRA through a truncated SVD: pass --rank")
    limits.check_dense(target.shape, name)  # no base vouches for the declared shape here
    dense = target.to_dense().double()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]
    error = float((dense - b @ a).norm() / dense.norm()) if float(dense.norm()) else 0.0
    return a.float().contiguous(), b.float().contiguous(), error


def export_lora(adapter: Adapter, output: str | os.PathLike, *, rank: int | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Write ``adapter`` as a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    tensors, ranks, errors = {}, {}, {}
    for name, target in adapter.targets.items():
        module = _module(name)
        a, b, error = _factors(name, target, rank)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
        ranks[module] = a.shape[0]
        errors[name] = error
    top = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base.name,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": {m: r for m, r in ranks.items() if r != top},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != top},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    with building(Path(output), overwrite=overwrite) as staging:
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"output": str(output), "max_rank": top, "modules": len(ranks),
            "max_relative_error": max(errors.values()), "relative_error": errors}


def _one_hot(matrix: torch.Tensor) -> torch.Tensor | None:
    """For a factor whose columns are (scaled) unit vectors: the row index of each column, else None."""
    nonzero = matrix != 0
    if not bool((nonzero.sum(0) == 1).all()):
        return None
    return nonzero.float().argmax(0)


def import_lora(directory: str | os.PathLike, base, *, base_name: str | None = None) -> S2FTAdapter:
    """A PEFT LoRA whose factors are one-hot (an exported S2FT adapter) as an S2FT adapter; else an error."""
    directory = Path(directory)
    config, weights = read_peft(directory, "LORA")
    slices = {}
    for key in sorted(k for k in weights if k.endswith("lora_A.weight")):
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        a, b = weights[key].double(), weights[key.replace("lora_A", "lora_B")].double()
        r = a.shape[0]
        short = module.split(".")[-1]
        alpha = config.get("alpha_pattern", {}).get(module, config.get("alpha_pattern", {}).get(short, config["lora_alpha"]))
        rank = config.get("rank_pattern", {}).get(module, config.get("rank_pattern", {}).get(short, r))
        scaling = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
        rows, columns = _one_hot(b), _one_hot(a.t())
        if rows is not None and len(set(rows.tolist())) == r:
            order = rows.argsort()
            delta = (b.gather(0, rows[None]).reshape(-1)[:, None] * a * scaling)[order]
            slices[f"{module}.weight"] = ("rows", rows[order], delta)
        elif columns is not None and len(set(columns.tolist())) == r:
            order = columns.argsort()
            delta = (b * (a.gather(1, columns[:, None]).reshape(-1) * scaling))[:, order]
            slices[f"{module}.weight"] = ("columns", columns[order], delta)
        else:
            raise S2RegError(f"{module}: this LoRA is not one-hot, so it is not an S2FT delta; s2reg imports only "
                             "exported S2FT adapters (merge it with PEFT and use `s2reg extract` for a dense delta)")
    if not slices:
        raise FormatError(f"{directory}: no LoRA weights found")
    return S2FTAdapter.from_slices(base, slices, base_name=base_name or config.get("base_model_name_or_path") or "unknown",
                                   params={"method": "import", "from": "peft-lora"}, provenance={"source": "peft-lora"})
