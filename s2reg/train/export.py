"""``export_adapter``: the trained slices or coefficients of a prepared model as a format-v1 adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..basename import default_base_name, is_hub_id
from ..errors import S2RegError
from ..format import Adapter, PISAAdapter, S2FTAdapter, S2FTTarget, TensorReader
from ..format.arrays import as_array, to_torch
from ..format.s2ft import put
from ..ops.permute import Permutation, permute_s2ft_target, read_permutation, to_original
from .fsdp import whole
from ..arch.layout import stored_name
from .pisa import layer as pisa_layer
from .s2ft import experts as s2ft_experts
from .s2ft import layer as s2ft_layer
from .s2ft.model import PreparedS2FT


def _base_name(model: nn.Module, base, base_name: str | None) -> str:
    """``base_name``, else the base's portable name (basename.py): the checkpoint's own ``_name_or_path`` when it
    is a Hub id, else the name of the directory it was read from."""
    if base_name:
        return base_name
    loaded = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    own = ((base.config() if hasattr(base, "config") else None) or {}).get("_name_or_path")
    directory = getattr(base, "directory", None)
    if directory is None and loaded and Path(loaded).is_dir():
        directory = loaded
    return default_base_name(own if is_hub_id(own) else loaded, directory)


def _to_original_coordinates(originals, slices, permutation: Permutation, info):
    """Slices trained on a co-permuted checkpoint (``s2reg permute``) mapped back to original order.

    Adapters always hold original coordinates (FORMAT §4.1); merge maps them onto permuted
    checkpoints again (spec/SURGERY.md §4).
    """
    inverse = permutation.inverse()
    mapped_originals, mapped = {}, {}
    for key, (axis, indices, tuned) in slices.items():
        weight = originals[key]
        target = S2FTTarget(tuple(weight.shape), weight.dtype, axis, indices, tuned)
        back = permute_s2ft_target(key, target, inverse, info)
        mapped_originals[key] = to_original(key, weight, (permutation, info))
        mapped[key] = (axis, back.indices, back.delta)
    return mapped_originals, mapped


def _spelled(name: str, model: nn.Module, base) -> str:
    """The checkpoint's spelling of ``name`` (the model in memory may carry a prefix the checkpoint lacks)."""
    if base is None or not hasattr(base, "__contains__"):
        return name
    return stored_name(name, model, base)


def _jsonable(chosen: dict) -> dict:
    return {kind: ({str(e): v for e, v in units.items()} if isinstance(units, dict) else units)
            for kind, units in chosen.items()}


def _trained_slices(model: nn.Module, prepared: PreparedS2FT, base):
    """``(originals, {name: (axis, indices, tuned slice)})`` in checkpoint names, coordinates and dtypes."""
    originals, slices = {}, {}
    modules = dict(model.named_modules())
    for name, s in prepared.slices.items():
        owner, _, attr = s.parameter.rpartition(".")
        module = modules[owner]
        key = _spelled(name, model, base)
        if s.offset is None:
            original, tuned = module.s2ft_original, s2ft_layer.tuned_slice(module)
        else:
            _, first, current = s2ft_experts.carried_slices(module)[attr.removeprefix("s2ft_")]
            shape = list(s.shape)
            count = int(torch.Size(shape).numel())
            original = first[s.offset:s.offset + count].reshape(shape)
            tuned = current[s.offset:s.offset + count].reshape(shape)
        if base is not None:
            originals[key] = base.get(key)
        else:
            stored = as_array(whole(s.stored_value(model)).detach().cpu()).copy()
            put(stored, s.axis, as_array(s.indices), as_array(original))
            originals[key] = to_torch(stored)
        slices[key] = (s.axis, s.indices.cpu(), tuned.to(originals[key].dtype).cpu())
    return originals, slices


def export_adapter(model: nn.Module, *, base: TensorReader | None = None, base_name: str | None = None,
                   training: dict[str, Any] | None = None) -> Adapter:
    """The adapter holding what ``model`` learned since ``prepare_s2ft`` / ``prepare_pisa``.

    S2FT: exact differences between the trained slices (as the model uses them, in the weight's
    dtype) and the original ones, so merging the adapter into the base reproduces the trained
    weights bit for bit. PISA: the coefficients and their explicit frequency indices. ``training``
    goes into the manifest's provenance.

    ``base`` (e.g. the ``CheckpointSource`` the model was loaded from) makes the adapter fit the
    checkpoint as stored: a model trained in float32 from a bf16 checkpoint gives an adapter for
    the bf16 tensors, its trained slices rounded to bf16. A checkpoint written by ``s2reg permute``
    is recognised by its permutation record: the slices were trained in permuted coordinates and
    are stored in original ones.
    """
    prepared = getattr(model, "s2reg_prepared", None)
    provenance = {"source": "s2reg train", "training": training or {}}
    pisa = {n: m for n, m in model.named_modules() if pisa_layer.is_attached(m)}
    if isinstance(prepared, PreparedS2FT) and prepared.slices:
        originals, slices = _trained_slices(model, prepared, base)
        params = {"method": "s2ft", "selection": {str(k): _jsonable(v) for k, v in prepared.selection.items()},
                  "strategy": prepared.config.strategy, "order": prepared.config.order, "seed": prepared.config.seed,
                  "roles": sorted({r for s in prepared.slices.values() for r in s.roles})}
        permuted = read_permutation(base) if getattr(base, "directory", None) is not None else None
        if permuted is not None:
            originals, slices = _to_original_coordinates(originals, slices, *permuted)
            params["trained_in_permuted_coordinates"] = permuted[0].as_json()
        group_sizes = {_spelled(n, model, base): g for n, g in prepared.group_sizes.items()}
        return S2FTAdapter.from_tuned({k: v.cpu() for k, v in originals.items()}, slices, base_name=_base_name(model, base, base_name),
                                      group_sizes=group_sizes, params=params, provenance=provenance)
    if pisa:
        stored = getattr(prepared, "stored_names", {})  # recorded by prepare_pisa, before the layers were wrapped
        keys = {n: _spelled(stored.get(n, f"{n}.weight"), model, base) for n in pisa}
        weights = base if base is not None else {keys[n]: whole(m.weight.detach()).cpu() for n, m in pisa.items()}
        coefficients, scales = {}, {}
        for name, m in pisa.items():
            c = whole(m.pisa_coefficients.detach()).float().cpu()
            coefficients[keys[name]] = (m.pisa_block, m.pisa_indices.cpu(), torch.complex(c[..., 0], c[..., 1]))
            scales[keys[name]] = m.pisa_scale
        params = {"method": "pisa"}
        if prepared is not None:
            params.update(block=prepared.config.block, coefficients=prepared.config.coefficients, seed=prepared.config.seed)
        return PISAAdapter.from_coefficients(weights, coefficients, base_name=_base_name(model, base, base_name), scale=scales,
                                             params=params, provenance=provenance)
    raise S2RegError("the model has no S2FT slices or PISA coefficients (call prepare_s2ft / prepare_pisa first)")
