"""Model families as data: which stored rows and columns of which tensors hold each head and FFN channel.

S2FT selects attention heads and FFN channels. A family description (one JSON file per family in
``s2reg/arch/families/``; a user's own passed with ``--arch FILE`` or saved as ``s2reg-arch.json``
beside the checkpoint; format in docs/families.md) says, per tensor of a layer, which roles its
output units or input units hold and in what layout. Everything else is computed here, once.

Where a family's checkpoint tensors live in a model held in memory (transformers' load-time conversions,
fused MoE experts, model prefixes) is ``s2reg.arch.layout``, and which modules are matmul layers is
``s2reg.arch.matmul``; both need torch and are imported only by the code that holds models (training,
serving, live apply, PEFT interop), never by this package's import.

API (train, zoo, ops, surgery, cli code against this)::

    from s2reg.arch import resolve, resolve_source, load_description, Family, ModelInfo, Dims, Coupling

    info = resolve(config, tensors=None, arch_file=None)   # config.json dict; {checkpoint name: shape}
    info = resolve_source(source, arch_file=None)          # same for a TensorSource; finds s2reg-arch.json
    info.family            # Family: .name, .roles, .model_types, .source ("built-in x.json" or a path)
    info.dims              # Dims(layers, heads, kv_heads, head_dim, hidden, intermediate, experts); .group
    info.note              # None, or "unknown model_type 'foo': assumed the llama layout from tensor names"
    info.prefix            # the prefix in front of the layers in THIS checkpoint ("model.", "bert.", "", ...)
    info.roles             # the roles the family has, of q k v o up gate down; others are refused:
    info.require_roles(roles)                 # ArchError naming the family (and why, e.g. MLA) for a missing one
    info.coupled(name)     # Coupling | None: .layer, .expert (None; "0", "1", ... or "shared"), .roles,
                           # .part ("weight" | "bias" | "parameter"), .axis ("rows"/"columns" of the STORED
                           # tensor), .dim (0/1), .transposed, .follower (biases of output units, per-head
                           # norms, sinks: move under permutation, never trained)
    info.names()           # every coupled checkpoint tensor (followers included)
    info.tensors(role, layer, expert=None) -> list[str]   # trainable weights holding the role
    info.experts(layer)    # [None] for a dense FFN, else ["0", "1", ..., "shared"] (numbered first)
    info.unit_count(name, role); info.channel_count(layer, expert=None)
    info.stacked_experts(name)  # ["0", ...] for a tensor holding every expert on dimension 0 (gpt-oss), else []
    info.by_expert(name, indices); info.expert_units(name, indices)  # per expert (stacked tensors split)
    info.unit_indices(name, role, units, expert=None) -> int64 array  # THE unit -> stored-index expansion (fused offsets,
                           # grouped/interleaved layouts, GQA kv heads, transposed, experts), in unit order
    info.units_of(name, indices) -> {role: sorted units}  # the inverse (any index of a unit counts)
    info.whole_units(name, indices) -> int64 array      # indices widened to whole units, sorted
    info.permute_index(name, layer_permutation) -> (FORMAT axis, gather index) | None
                           # layer_permutation has .order_for(role, expert) -> list | None
                           # (ops.permute.LayerPermutation); followers (OLMo 2 q_norm, sinks) move too

Units: ``q``/``o``: query heads; ``k``/``v``: key/value heads; ``up``/``gate``/``down``: FFN channels of
the tensor's expert (counted from the stored shape, so dense-first layers and shared experts differ).
An MoE layer's channel selection is ``{expert: [channels]}``; the adapter holds the checkpoint tensor of
that expert (``...experts.3.w1.weight``) and the channel's stored indices in it, or, for a stacked tensor
(gpt-oss ``mlp.experts.gate_up_proj``), the expert-axis index ``e * n + k`` (spec/FORMAT.md §4.5).
All errors are :class:`ArchError` (an ``S2RegError``), one line, naming docs/families.md where it helps.
"""

from __future__ import annotations

from .dims import Dims
from .model import Coupling, ModelInfo
from .resolve import ARCH_FILE, builtin_families, load_description, resolve, resolve_source
from .schema import CHANNEL_ROLES, HEAD_ROLES, ROLES, ArchError, Family, Segment, TensorSpec

__all__ = [
    "ARCH_FILE", "CHANNEL_ROLES", "HEAD_ROLES", "ROLES", "ArchError", "Coupling", "Dims", "Family", "ModelInfo",
    "Segment", "TensorSpec", "builtin_families", "load_description", "resolve", "resolve_source",
]
