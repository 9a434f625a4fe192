"""What the official S2FT training code does to a model and how it saves it, reproduced for tests.

Read from github.com/Infini-AI-Lab/S2FT (``experiments/utils/s2_utils.py``, ``s2ft/s2.py``,
``experiments/utils/model_utils.py::save_hf_format``) and re-implemented here, not copied:

- per layer, heads are reordered ``only_v + both + only_o + rest`` and q/k/v rows and o columns are
  co-permuted (its q/k/v reshape to ``num_key_value_heads`` groups, so it supports MHA models only);
  FFN channels are reordered ``only_up + both + only_down + rest`` and up/gate rows and down columns
  co-permuted;
- a dense trainable block ``s2`` is added to a contiguous range of rows (v, up: ``S2ColumnLinear``)
  or columns (o, down: ``S2RowLinear``) of the permuted weight; only the blocks train;
- at the end each block is fused (``weight[rows] += s2`` / ``weight[:, cols] += s2``), keys with
  ``s2``/``lora`` are deleted from ``model.state_dict()``, which is written with
  ``torch.save(..., "pytorch_model.bin")`` (tied ``lm_head.weight`` included), and the config with
  ``config.to_json_file``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

UNIT_ROLES = {"v": "heads", "o": "heads", "up": "channels", "down": "channels"}


@dataclass(frozen=True)
class LayerOrder:
    """One layer's co-permutation: ``order[new position] = original unit``, and the trained ranges."""

    heads: list[int]
    channels: list[int]
    ranges: dict[str, tuple[int, int]]  # role -> [start, end) in permuted units


def _order(first: list[int], second: list[int], total: int) -> tuple[list[int], tuple[int, int], tuple[int, int]]:
    only_first = sorted(set(first) - set(second))
    only_second = sorted(set(second) - set(first))
    both = sorted(set(first) & set(second))
    order = only_first + both + only_second
    order += [u for u in range(total) if u not in order]
    return order, (0, len(only_first) + len(both)), (len(only_first), len(only_first) + len(both) + len(only_second))


def layer_order(selection: dict[str, list[int]], heads: int, channels: int) -> LayerOrder:
    head_order, v_range, o_range = _order(selection.get("v", []), selection.get("o", []), heads)
    channel_order, up_range, down_range = _order(selection.get("up", []), selection.get("down", []), channels)
    return LayerOrder(head_order, channel_order, {"v": v_range, "o": o_range, "up": up_range, "down": down_range})


def _modules(model, layer: int) -> dict[str, torch.nn.Linear]:
    block = model.model.layers[layer]
    attn, mlp = block.self_attn, block.mlp
    return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
            "up": mlp.up_proj, "gate": mlp.gate_proj, "down": mlp.down_proj}


@torch.no_grad()
def co_permute(model, orders: dict[int, LayerOrder]) -> None:
    """Reorder heads and channels in place, as ``convert_mha_layer_to_s2``/``convert_ffn_layer_to_s2`` do."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for layer, order in orders.items():
        m = _modules(model, layer)
        heads = torch.tensor(order.heads)
        for role in ("q", "k", "v"):
            w = m[role].weight
            w.data = w.data.reshape(config.num_key_value_heads, -1, w.shape[-1])[heads].reshape(-1, w.shape[-1])
        o = m["o"].weight
        o.data = o.data.reshape(o.shape[0], config.num_attention_heads, head_dim)[:, heads].reshape(o.shape[0], -1)
        channels = torch.tensor(order.channels)
        for role in ("up", "gate"):
            m[role].weight.data = m[role].weight.data[channels]
        m["down"].weight.data = m["down"].weight.data[:, channels]


def train_and_fuse(model, orders: dict[int, LayerOrder], inputs: torch.Tensor, *, steps: int = 3, lr: float = 0.05) -> None:
    """Train the dense ``s2`` blocks on the permuted model (causal LM loss), then fuse them into the weights."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for p in model.parameters():
        p.requires_grad_(False)
    blocks, hooks = [], []
    for layer, order in orders.items():
        m = _modules(model, layer)
        for role, (start, end) in order.ranges.items():
            if end == start:
                continue
            scale = head_dim if UNIT_ROLES[role] == "heads" else 1
            start, end = start * scale, end * scale
            linear = m[role]
            on_rows = role in ("v", "up")  # S2ColumnLinear: a block of output rows; S2RowLinear: of input columns
            s2 = torch.zeros((end - start, linear.in_features) if on_rows else (linear.out_features, end - start),
                             requires_grad=True)
            blocks.append((linear, on_rows, start, end, s2))

            def hook(module, args, out, s2=s2, start=start, end=end, on_rows=on_rows):
                x = args[0]
                if on_rows:
                    extra = torch.zeros_like(out)
                    extra[..., start:end] = F.linear(x, s2)
                    return out + extra
                return out + F.linear(x[..., start:end], s2)

            hooks.append(linear.register_forward_hook(hook))
    optimizer = torch.optim.Adam([b[-1] for b in blocks], lr=lr)
    for _ in range(steps):
        loss = model(input_ids=inputs, labels=inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for handle in hooks:
        handle.remove()
    with torch.no_grad():
        for linear, on_rows, start, end, s2 in blocks:
            if on_rows:
                linear.weight.data[start:end, :] += s2
            else:
                linear.weight.data[:, start:end] += s2


def save_official(model, directory: Path, shards: int = 1) -> Path:
    """``save_hf_format``: the whole state dict with torch.save, s2/lora keys removed, plus config.json.

    ``shards > 1`` writes Hugging Face's sharded ``.bin`` layout (``pytorch_model-0000i-of-0000n.bin``
    and ``pytorch_model.bin.index.json``), as ``save_pretrained(safe_serialization=False)`` did.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    for key in list(state):
        if "s2" in key or "lora" in key:
            del state[key]
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        names = list(state)
        groups = [names[i::shards] for i in range(shards)]
        weight_map = {}
        for i, group in enumerate(groups, 1):
            file = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
            torch.save({n: state[n].clone() for n in group}, directory / file)
            weight_map.update({n: file for n in group})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (directory / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    model.config.to_json_file(directory / "config.json")
    return directory


def to_original(name: str, tensor: torch.Tensor, orders: dict[int, LayerOrder], config) -> torch.Tensor:
    """Undo the co-permutation of one saved tensor (the independent reference for extraction)."""
    head_dim = config.hidden_size // config.num_attention_heads
    for layer, order in orders.items():
        prefix = f"model.layers.{layer}."
        if not name.startswith(prefix):
            continue
        role = name[len(prefix):]
        heads, channels = torch.tensor(order.heads), torch.tensor(order.channels)
        out = torch.empty_like(tensor)
        if role in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            out.reshape(-1, head_dim, tensor.shape[-1])[heads] = tensor.reshape(-1, head_dim, tensor.shape[-1])
        elif role == "self_attn.o_proj.weight":
            out.reshape(tensor.shape[0], -1, head_dim)[:, heads] = tensor.reshape(tensor.shape[0], -1, head_dim)
        elif role in ("mlp.up_proj.weight", "mlp.gate_proj.weight"):
            out[channels] = tensor
        elif role == "mlp.down_proj.weight":
            out[:, channels] = tensor
        else:
            return tensor
        return out
    return tensor
