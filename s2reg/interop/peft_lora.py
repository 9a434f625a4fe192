"""S2FT <-> PEFT LoRA. An S2FT delta is exactly a LoRA with a one-hot factor: rows ``R`` with delta
``D`` are ``B = E_R`` (one-hot columns), ``A = D``; columns ``C`` are ``B = D``, ``A = E_C^T``; the
rank is the number of selected rows or columns and ``lora_alpha = r`` (scaling 1). A PISA delta is
generally of full rank: it exports through a low-rank factorization (pisa_lowrank.py) whose relative
error must stay within a tolerance, at a given rank or the smallest rank that meets it. LoRA factors
are F32, so an F64 delta is rounded; either way the relative error of the exported delta is reported.

LoRA factors are in the ``nn.Linear`` convention (``B @ A`` is ``[out, in]``); a target on a weight
stored transposed (GPT-2's ``Conv1D``, ``[in, out]``) is exported transposed, with
``fan_in_fan_out`` set, as PEFT expects. ``task_type`` follows the model class the base checkpoint
was saved from (``config.json`` ``architectures``): a bare encoder (``BertModel``) is
``FEATURE_EXTRACTION``, a classifier ``SEQ_CLS``, a causal LM ``CAUSAL_LM``; PEFT has no masked-LM
task, so a ``*ForMaskedLM`` base gets none (a plain ``PeftModel``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import FormatError, S2RegError
from ..format import Adapter, S2FTAdapter, S2FTTarget, limits
from ..format.arrays import to_torch
from ..fsatomic import building
from ..kinds import kind_of
from .peft_experts import MemoryLayout, expert_factors, lora_keys, memory_layout, module_of
from .export_results import LoRAExport
from .peft_files import PREFIX, architecture, read_peft
from .pisa_lowrank import DEFAULT_MAX_ERROR


class ExportProgress(Protocol):
    """Told after each target is exported: ``done`` of ``total`` targets, ``name`` the one just finished."""

    def __call__(self, done: int, total: int, name: str) -> None: ...


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
    true = to_torch(target.delta).double().clone()
    if target.restore is not None:
        restore = target.restore
        true.view(-1)[to_torch(restore.index)] = to_torch(restore.tuned.astype(np.float64) - restore.base.astype(np.float64))
    norm = float(true.norm())
    return float((stored.double() - true).norm()) / norm if norm else float((stored.double() - true).norm())


def s2ft_factors(name: str, target: S2FTTarget, transposed: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [r, in], B [out, r], relative error)`` of an S2FT slice in the ``nn.Linear`` convention: the slice
    and a one-hot matrix of its indices (the S2FT kind's ``lora_factors``)."""
    if len(target.shape) != 2:
        raise S2RegError(f"{name}: only matrices export to LoRA")
    n = target.count
    length = target.shape[0 if target.axis == "rows" else 1]
    limits.check_dense((length, n), name)  # a declared length
    axis, delta = target.axis, to_torch(target.delta).to(torch.float32)
    error = _lora_error(target, delta)
    if transposed:  # stored rows are the layer's inputs, stored columns its outputs
        axis, delta = ("columns" if axis == "rows" else "rows"), delta.t()
    one_hot = torch.zeros(length, n, dtype=torch.float32)
    one_hot[to_torch(target.indices).long(), torch.arange(n)] = 1.0
    if axis == "rows":
        return delta.contiguous(), one_hot, error
    return one_hot.t().contiguous(), delta.contiguous(), error


def _fused_on_load(model_type: str | None, name: str) -> bool:
    """Whether transformers merges this checkpoint tensor into another parameter when loading (its
    conversion mapping: MoE experts stored per expert become one 3-D parameter)."""
    if not model_type:
        return False
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    for transform in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(transform, WeightConverter):
            for pattern in transform.source_patterns:
                if re.search(re.escape(pattern).replace(r"\*", r"[^.]+"), name):
                    return True
    return False


def task_type_of(config: dict[str, Any] | None) -> str | None:
    """PEFT's ``task_type`` for a base saved as ``config["architectures"][0]``, by transformers' own class
    mappings; None (a plain PeftModel) for masked-LM heads, which PEFT has no task for, and unknown classes."""
    name = architecture(config)
    if name is None:
        return None
    from transformers.models.auto import modeling_auto as auto

    for mapping, task in ((auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "CAUSAL_LM"),
                          (auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "CAUSAL_LM"),
                          (auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "SEQ_CLS"),
                          (auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, "TOKEN_CLS"),
                          (auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES, "QUESTION_ANS"),
                          (auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "SEQ_2_SEQ_LM"),
                          (auto.MODEL_MAPPING_NAMES, "FEATURE_EXTRACTION")):
        if name in {c for v in mapping.values() for c in ((v,) if isinstance(v, str) else v)}:
            return task
    return None


@dataclass(frozen=True)
class BaseLayout:
    """What LoRA export needs to know about the base beyond the adapter: its task and stored layouts."""

    task_type: str | None
    transposed: frozenset[str]          # targets whose weight is stored [in, out]
    fused_experts: frozenset[str]       # targets on 3-D expert parameters (fused by transformers, or stacked on disk)
    directory: Path | None = None       # the base checkpoint, when known


def base_layout(adapter: Adapter, base: str | os.PathLike | None) -> BaseLayout:
    """The layout of the adapter's base: from the checkpoint directory ``base`` (or the adapter's
    recorded base name when that is a directory), else from the adapter's own tensor shapes."""
    from ..arch import resolve
    from ..tensors import CheckpointSource
    from ..tensors.reader import read_config

    candidate = Path(base) if base is not None else Path(adapter.base.name)
    if base is not None and not (candidate / "config.json").is_file():
        raise S2RegError(f"{candidate}: not a checkpoint directory (no config.json)")
    config, shapes = None, {n: tuple(f.shape) for n, f in adapter.base.fingerprints.items()}
    directory = candidate if (candidate / "config.json").is_file() else None
    if directory is not None:
        config = read_config(directory)
        with CheckpointSource(directory) as source:
            shapes = {n: tuple(source.shape(n)) for n in source.names()}
    try:
        info = resolve(config, shapes)
    except S2RegError:
        if base is not None:
            raise
        info = None
    transposed, fused = set(), set()
    for name in adapter.targets:
        coupled = info.coupled(name) if info is not None else None
        if coupled is not None and coupled.transposed and not coupled.stacked:
            transposed.add(name)
        stacked = coupled is not None and coupled.stacked  # experts stored as one 3-D parameter (gpt-oss)
        if stacked or _fused_on_load((config or {}).get("model_type"), name) or (
                config is None and coupled is not None and coupled.expert is not None):
            fused.add(name)
    task = task_type_of(config) if config is not None else "CAUSAL_LM"
    return BaseLayout(task, frozenset(transposed), frozenset(fused), directory)


def export_lora(adapter: Adapter, output: str | os.PathLike, *, rank: int | None = None,
                max_error: float = DEFAULT_MAX_ERROR, base: str | os.PathLike | None = None, overwrite: bool = False,
                progress: ExportProgress | None = None) -> LoRAExport:
    """Write ``adapter`` as a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    PISA targets: ``rank`` is the LoRA rank of every target (clipped to the matrix); ``None`` gives each
    target the smallest rank whose relative Frobenius error is at most ``max_error``. A target over the
    tolerance refuses the export (``ToleranceError``, naming the error and the rank that would meet it) before
    anything is written. S2FT targets export exactly at their own rank; neither argument applies to them.
    ``progress(done, total, name)`` is called after each target.

    ``base``: the checkpoint directory the adapter is for (its task type and stored layouts); by
    default the adapter's recorded base name when that is a directory. MoE expert targets become LoRA on
    the fused 3-D expert parameters (``target_parameters``; peft_experts.py).
    """
    layout = base_layout(adapter, base)
    dense = {n: t for n, t in adapter.targets.items() if n not in layout.fused_experts}
    kinds = {name in layout.transposed for name in dense}
    if len(kinds) > 1:
        raise S2RegError("the adapter mixes transposed (Conv1D) and ordinary linear targets; PEFT's fan_in_fan_out is "
                         "one setting per adapter: export them separately")
    transposed = kinds == {True}
    memory = memory_layout(layout.directory) if layout.directory is not None else None
    tensors, ranks, errors, target_ranks = {}, {}, {}, {}
    tell = progress or (lambda done, total, name: None)
    for name, target in dense.items():
        module = _module(name) if memory is None else module_of(_module(name) + ".weight", memory)
        a, b, error = kind_of(target).lora_factors(name, target, rank, max_error, transposed)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
        ranks[module] = target_ranks[name] = a.shape[0]
        errors[name] = error
        tell(len(errors), len(adapter.targets), name)
    parameters = _expert_tensors(adapter, layout, memory, tensors, errors)
    for done, name in enumerate(sorted(adapter.targets.keys() - dense.keys()), len(dense) + 1):
        tell(done, len(adapter.targets), name)  # the experts are exported together, each exactly
    by_parameter = bool(parameters) or (memory is not None and any(p.converted for p in memory.placements.values()))
    if by_parameter:
        # PEFT translates target_modules of models with fused experts onto expert parameters by name (a
        # shared_experts.down_proj entry also wraps the routed experts' down_proj; a dense layer's gate_proj
        # becomes gate_up_proj and is lost), even when the adapter touches no expert: name every weight as a
        # parameter instead, which PEFT matches exactly (a 2-D one is an ordinary LoRA).
        ranks = {f"{module}.weight": r for module, r in ranks.items()}
    ranks.update(parameters)
    top = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": layout.task_type,
        "base_model_name_or_path": adapter.base.name,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": {m: r for m, r in ranks.items() if r != top},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != top},
        "target_modules": [] if by_parameter else sorted(ranks),
        "target_parameters": sorted(ranks) if by_parameter else None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": transposed,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    with building(Path(output), overwrite=overwrite) as staging:
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return LoRAExport(output=str(output), max_rank=top, modules=len(ranks), task_type=layout.task_type,
                      fan_in_fan_out=transposed, max_relative_error=max(errors.values()), relative_error=errors,
                      rank=target_ranks, max_error=max_error)


def _expert_tensors(adapter: Adapter, layout: BaseLayout, memory: MemoryLayout | None, tensors: dict,
                    errors: dict) -> dict[str, int]:
    """LoRA factors of the MoE expert targets on their fused parameters; ``{parameter: rank}``."""
    experts = {n: t for n, t in adapter.targets.items() if n in layout.fused_experts}
    if not experts:
        return {}
    if memory is None:
        raise S2RegError("MoE expert targets export onto transformers' fused expert parameters: pass --base "
                         "(the checkpoint directory, for its config)")
    refused = sorted({t.kind for t in experts.values() if not kind_of(t).experts_to_lora})
    if refused:
        raise S2RegError(f"{refused[0].upper()} targets on MoE experts do not export to LoRA (only S2FT slices do)")
    factors = expert_factors(experts, memory)
    ranks = {}
    for parameter, (a, b) in factors.items():
        key_a, key_b = lora_keys(parameter, memory, set(factors))
        tensors[f"{PREFIX}{key_a}"], tensors[f"{PREFIX}{key_b}"] = a, b
        ranks[parameter] = a.shape[0] // memory.shapes[parameter][0]
    errors.update({n: 0.0 for n in experts})
    return ranks


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
