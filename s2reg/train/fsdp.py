"""Sharded training on torch.distributed FSDP2: the engine's own ``fully_shard``, applied the usual way.

Every decoder layer (the classes transformers names in ``_no_split_modules``, the same units
accelerate and torchtitan wrap) and then the root are sharded with ``fully_shard``: the frozen base and
the trainable S2FT slices / PISA coefficients alike become DTensors split over the ranks, gathered one
layer at a time for its forward and backward. Nothing here shards by hand; this module only decides
what to wrap, with which policies, and how to see a sharded tensor whole.

Partial back-propagation is untouched: the S2FT forward puts the gathered slice into a copy of the
gathered weight (``s2ft/layer.py``), PISA adds its delta to it, and the slice gradients are
reduce-scattered like any other gradient.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, TypeGuard

import torch
import torch.distributed as dist
from torch import nn

from ..errors import S2RegError

if TYPE_CHECKING:  # imported where used: torch.distributed.fsdp takes seconds to import
    from torch.distributed.fsdp import FSDPModule


def is_sharded(model: nn.Module) -> TypeGuard[FSDPModule]:
    """Whether ``fully_shard`` was applied to ``model`` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of a tensor that may be an FSDP shard (a collective: every rank must call it).

    Shards offloaded to CPU memory (``CPUOffloadPolicy``) are gathered on the mesh's device: NCCL
    gathers device tensors only.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    mesh, local = tensor.device_mesh, tensor.to_local()
    if local.device.type != mesh.device_type:
        tensor = DTensor.from_local(local.to(mesh.device_type), mesh, tensor.placements, shape=tensor.shape,
                                    stride=tensor.stride())
    return tensor.full_tensor()


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``reference`` is: sharded the same way, each shard where the reference's is
    (CPU memory for offloaded shards), when it is a DTensor; else as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor):
        return full.to(device=reference.device, dtype=reference.dtype)
    mesh = reference.device_mesh
    spread = distribute_tensor(full.to(dtype=reference.dtype), mesh, reference.placements)
    local = spread.to_local().to(reference.to_local().device)
    return DTensor.from_local(local, mesh, reference.placements, shape=reference.shape, stride=reference.stride())


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the modules of the classes the model declares unsplittable."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:
        raise S2RegError(f"{type(model).__name__}: no decoder layers to shard (the model names no "
                         "_no_split_modules); --fsdp needs a transformers model")
    return layers


def shard(model: nn.Module, *, device: str, mixed_precision: bool = False, cpu_offload: bool = False) -> nn.Module:
    """Shard a prepared model (``prepare_s2ft`` / ``prepare_pisa`` first) over the initialised process group.

    ``mixed_precision``: compute in bf16 (the base as loaded, the fp32 master slices cast for each
    gather), reduce gradients in fp32, keep the sharded slices and the optimizer state in fp32.
    ``cpu_offload``: keep the shards (and so the optimizer step) in CPU memory between uses (CUDA only).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not dist.is_initialized():
        raise S2RegError("FSDP shards over a process group: launch with torchrun (see s2reg train --help)")
    device_type = torch.device(device).type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    # offloaded shards live elsewhere; batches go here (nn.Module types its attributes as tensors and modules)
    model.s2reg_compute_device = torch.device(device)  # type: ignore[assignment]
    return model


def agree(value: object, what: str) -> None:
    """Refuse, on every rank, a run whose ranks do not hold the same JSON-able ``value`` (S2FT's selection:
    a selection computed from activations or gradients can differ in the last bit between devices)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    text = json.dumps(value, sort_keys=True, default=str).encode()
    digest = torch.tensor([int.from_bytes(hashlib.sha256(text).digest()[:7], "big")], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        digest = digest.cuda()
    low, high = digest.clone(), digest.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if int(low) != int(high):
        raise S2RegError(f"the ranks chose different {what}; use a deterministic selection (--strategy random or weight)")
