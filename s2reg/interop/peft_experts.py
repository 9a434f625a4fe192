"""S2FT targets on MoE experts as PEFT LoRA on the fused 3-D expert parameters.

Checkpoints store experts one tensor each (``block_sparse_moe.experts.3.w1``, ``mlp.experts.3.gate_proj``);
transformers 5 fuses them on load into ``mlp.experts.gate_up_proj`` ``[experts, out, in]`` and
``mlp.experts.down_proj``, which PEFT reaches with ``target_parameters``: per expert ``e`` the delta is
``B[:, :, e] @ A[e]`` with ``A`` stored ``[r * experts, in]`` and ``B`` ``[out, r * experts]``. Where each
checkpoint tensor's elements sit in the fused parameter comes from transformers' own reverse conversion
(``arch.layout``), on a model built on the meta device (no weights are read); the same map names the
module of every other target as transformers builds it. A trained expert slice is
whole rows (or whole columns) of its expert's matrix, so the factors are exact one-hot ones, as for
``nn.Linear`` targets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import S2RegError
from ..format import S2FTTarget
from ..format.arrays import to_torch
from ..arch.layout import Placement, placements
from .peft_files import architecture


@dataclass(frozen=True)
class MemoryLayout:
    """Where a base model's checkpoint tensors live in memory, read from its config on the meta device."""

    placements: dict[str, Placement]          # checkpoint name -> where it sits in memory
    shapes: dict[str, tuple[int, ...]]        # in-memory parameter -> shape
    nesting: dict[str, list[str]]             # module -> its parameters, in the order PEFT wraps them
    transposed: dict[str, bool]               # module -> experts stored [experts, in, out]


def memory_layout(directory: str | os.PathLike) -> MemoryLayout:
    import transformers

    config = transformers.AutoConfig.from_pretrained(Path(directory))
    name = architecture(config.to_dict())
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise S2RegError(f"{directory}: config.json names no transformers model class (architectures, or a model_type "
                         "with a causal or masked LM class)")
    with torch.device("meta"):
        model = cls(config)
    modules = dict(model.named_modules())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    nesting = {name: list(module._parameters) for name, module in modules.items() if module._parameters}
    transposed = {name: bool(getattr(module, "is_transposed", False)) for name, module in modules.items()}
    return MemoryLayout(placements(model), shapes, nesting, transposed)


def module_of(name: str, layout: MemoryLayout) -> str:
    """The in-memory module that computes with checkpoint tensor ``name`` (transformers may rename on load,
    e.g. Gemma 3's ``language_model.model.layers`` -> ``model.language_model.layers``)."""
    placement = layout.placements.get(name)
    if placement is None or placement.converted or not placement.parameter.endswith(".weight"):
        raise S2RegError(f"{name}: not the weight of a module of its own in the model transformers builds")
    return placement.parameter.removesuffix(".weight")


def _expert_blocks(name: str, target: S2FTTarget, placement: Placement, shape: tuple[int, ...], transposed: bool):
    """``[(expert, "rows"|"columns", indices, values)]`` of one checkpoint target inside its fused parameter, per
    expert it touches (a stacked tensor's target spans several, FORMAT §4.5), in the ``[out, in]`` convention of
    each expert's matrix (``transposed``: the parameter stores ``[in, out]``)."""
    if len(shape) != 3:
        raise S2RegError(f"{name}: lives in {placement.parameter} of shape {list(shape)}, not [experts, out, in]")
    _, rows, columns = shape
    all_positions = placement.slice_positions(target.axis, to_torch(target.indices)).reshape(-1)
    all_values = to_torch(target.delta).reshape(-1).to(torch.float32)
    if transposed:
        rows, columns = columns, rows
    blocks = []
    for e in torch.unique(all_positions // (rows * columns)).tolist():
        mine = all_positions // (rows * columns) == e
        positions, values = all_positions[mine], all_values[mine]
        rest = positions % (rows * columns)
        row, column = (rest % rows, rest // rows) if transposed else (rest // columns, rest % columns)
        for kind, index, other, length in (("rows", row, column, columns), ("columns", column, row, rows)):
            units = index.unique()
            if units.numel() * length == positions.numel():  # whole rows (columns) of the expert's matrix
                block = torch.zeros(units.numel(), length, dtype=torch.float32)
                block[torch.searchsorted(units, index), other] = values
                blocks.append((int(e), kind, units, block))
                break
        else:
            raise S2RegError(f"{name}: the slice is not whole rows or columns of {placement.parameter}")
    return blocks


def expert_factors(targets: Mapping[str, S2FTTarget], layout: MemoryLayout) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{fused parameter: (lora_A [r * experts, in], lora_B [out, r * experts])}`` reproducing every target exactly."""
    blocks: dict[str, dict[int, list]] = {}
    for name, target in targets.items():
        placement = layout.placements[name]
        shape = layout.shapes[placement.parameter]
        transposed = layout.transposed.get(placement.parameter.rpartition(".")[0], False)
        for expert, kind, units, block in _expert_blocks(name, target, placement, shape, transposed):
            blocks.setdefault(placement.parameter, {}).setdefault(expert, []).append((kind, units, block))
    factors = {}
    for parameter, by_expert in blocks.items():
        experts, out_features, in_features = layout.shapes[parameter]
        if layout.transposed.get(parameter.rpartition(".")[0], False):  # PEFT: delta[e] = (B_e A_e)^T
            out_features, in_features = in_features, out_features
        merged = {e: _merge(parameter, e, parts, out_features, in_features) for e, parts in by_expert.items()}
        r = max(a.shape[0] for a, _ in merged.values())
        lora_a = torch.zeros(experts, r, in_features)
        lora_b = torch.zeros(out_features, r, experts)
        for e, (a, b) in merged.items():
            lora_a[e, :a.shape[0]] = a
            lora_b[:, :b.shape[1], e] = b
        factors[parameter] = (lora_a.reshape(experts * r, in_features), lora_b.reshape(out_features, r * experts))
    return factors


def _merge(parameter: str, expert: int, parts: list, out_features: int, in_features: int):
    """One expert's ``(A [n, in], B [out, n])`` from its row (or column) blocks."""
    kinds = {kind for kind, _, _ in parts}
    if len(kinds) > 1:
        raise S2RegError(f"{parameter}: expert {expert} has both row and column slices; LoRA needs one or the other")
    units = torch.cat([u for _, u, _ in parts])
    if units.unique().numel() != units.numel():
        raise S2RegError(f"{parameter}: expert {expert} has overlapping slices")
    block = torch.cat([b for _, _, b in parts])
    one_hot = torch.zeros(out_features if kinds == {"rows"} else in_features, units.numel())
    one_hot[units, torch.arange(units.numel())] = 1.0
    if kinds == {"rows"}:
        return block, one_hot
    return one_hot.t().contiguous(), block.t().contiguous()


def lora_keys(parameter: str, layout: MemoryLayout, targeted: set[str]) -> tuple[str, str]:
    """PEFT's state-dict keys (without its prefix) of a targeted parameter: PEFT wraps a module's targeted
    parameters in their definition order, each wrapper around the previous one (``base_layer``)."""
    module, _, attr = parameter.rpartition(".")
    order = [p for p in layout.nesting[module] if f"{module}.{p}" in targeted]
    depth = len(order) - 1 - order.index(attr)
    path = module + ".base_layer" * depth
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"
