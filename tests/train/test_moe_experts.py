"""Partial back-propagation through transformers' fused MoE experts (``s2reg/train/s2ft/experts.py``).

References are independent of the code under test: an untouched float64 copy of the model whose
weights all require grad (plain autograd through transformers' own experts kernel), and the
untouched model's logits. The structural claim, no weight-sized gradient, is checked on the tensors
the backward actually creates (a dispatch mode sees every op's output).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from s2reg.errors import S2RegError
from s2reg.train import S2FTConfig, prepare_s2ft
from s2reg.train.s2ft.experts import attach_experts
from s2reg.train.targets import map_model

from ..families import zoo
from .helpers import zoo_loss

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
MOE_LAYER = {"deepseek_v3": 1}  # DeepSeek V3's layer 0 has a dense FFN


class _Allocations(TorchDispatchMode):
    """Records the shape of every tensor an op allocates while active (views of its inputs are not new)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.shapes.append(tuple(t.shape))
        return out


def _model(name: str, dtype=torch.float64, implementation: str = "eager"):
    model = zoo.build_model(zoo.SPECIES[name]).to(dtype)
    model.set_experts_implementation(implementation)  # grouped_mm has no float64 kernel
    return model


def _experts(model, layer: int):
    return model.model.layers[layer].mlp.experts


def _slice_of(full: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return full.reshape(-1)[positions]


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize("heads", [0, 1], ids=["channels-only", "heads-and-channels"])
def test_expert_slice_gradients_equal_dense_float64_autograd(name, heads):
    """Every role of every expert of every layer; the experts of layer 1 pass gradients back to the slices
    of layer 0 (through their input and through the routing weights), with heads those of layer 0 too.
    DeepSeek V3 (MLA: no heads) trains its dense layer-0 FFN below its MoE layer 1 instead."""
    model = _model(name)
    reference = copy.deepcopy(model)
    heads = heads if "o" in map_model(model).info.roles else 0
    roles = ("o", "up", "gate", "down") if heads else ("up", "gate", "down")
    prepared = prepare_s2ft(model, S2FTConfig(heads=heads, channels=3, roles=roles, seed=4))
    for p in reference.parameters():
        p.requires_grad_(True)
    inputs = zoo.example_inputs(name)
    zoo_loss(reference, inputs).backward()
    zoo_loss(model, inputs).backward()
    full = dict(reference.named_parameters())
    fused = 0
    for trained in prepared.slices.values():
        grad = model.get_parameter(trained.parameter).grad
        positions = trained.placement.slice_positions(trained.axis, trained.indices).reshape(-1)
        expected = _slice_of(full[trained.placement.parameter].grad, positions)
        if trained.offset is None:
            actual = grad.reshape(-1)
            expected = expected.reshape(trained.shape).reshape(-1)
        else:
            fused += 1
            actual = grad[trained.offset:trained.offset + positions.numel()]
        assert float(expected.abs().max()) > 0, trained.name
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-13, msg=trained.name)
    assert fused >= 3 * model.config.num_experts_per_tok  # slices of several experts' gate, up and down
    experts = _experts(model, MOE_LAYER.get(name, 0))
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
    assert not experts.gate_up_proj.requires_grad and not experts.down_proj.requires_grad


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_forward_is_transformers_own_experts_kernel_bit_for_bit(name, implementation):
    model = _model(name, torch.float32, implementation)
    untouched = copy.deepcopy(model)
    prepare_s2ft(model, S2FTConfig(channels=3, roles=("up", "gate", "down"), seed=2))
    inputs = zoo.example_inputs(name, seed=3)
    with torch.no_grad():
        expected = zoo.outputs(untouched, inputs)
    assert torch.equal(zoo.outputs(model, inputs), expected)  # with a graph (training) ...
    with torch.no_grad():
        assert torch.equal(zoo.outputs(model, inputs), expected)  # ... and without


def _backward_shapes(model, inputs) -> list[tuple[int, ...]]:
    loss = zoo_loss(model, inputs)
    with _Allocations() as recorder:
        loss.backward()
    return recorder.shapes


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_backward_forms_no_weight_sized_gradient(name):
    """The dense path materialises a gradient the size of each fused expert parameter; S2FT's backward
    creates nothing larger than one expert's matrix (the effective weight of the expert whose gradients
    it is computing) or one expert's activations."""
    inputs = zoo.example_inputs(name)
    dense = _model(name, torch.float32, "grouped_mm")
    for p in dense.parameters():
        p.requires_grad_(False)
    for layer in dense.model.layers:
        layer.mlp.experts.gate_up_proj.requires_grad_(True)
        layer.mlp.experts.down_proj.requires_grad_(True)
    fused_shapes = {tuple(_experts(dense, 0).gate_up_proj.shape), tuple(_experts(dense, 0).down_proj.shape)}
    assert fused_shapes <= set(_backward_shapes(dense, inputs))  # the recorder sees dense gradients where they exist

    model = _model(name, torch.float32, "grouped_mm")
    prepare_s2ft(model, S2FTConfig(heads=1, channels=3, roles=("o", "up", "gate", "down"), seed=2))
    experts = _experts(model, 0)
    one_expert = max(experts.gate_up_proj[0].numel(), experts.down_proj[0].numel())
    assert one_expert < min(experts.gate_up_proj.numel(), experts.down_proj.numel())
    shapes = _backward_shapes(model, inputs)
    assert shapes and max(torch.Size(s).numel() for s in shapes) <= one_expert
    for layer in model.model.layers:
        assert layer.mlp.experts.gate_up_proj.grad is None and layer.mlp.experts.down_proj.grad is None
        assert layer.mlp.experts.s2ft_down_proj.grad is not None


def _rows(shape, expert: int, rows: list[int]) -> torch.Tensor:
    _, a, b = shape
    return torch.tensor([expert * a * b + r * b + j for r in rows for j in range(b)])


def _columns(shape, expert: int, columns: list[int]) -> torch.Tensor:
    _, a, b = shape
    return torch.tensor([expert * a * b + i * b + c for i in range(a) for c in columns])


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_rows_and_columns_of_either_layout_get_exact_gradients(name):
    """Both axes of both expert matrices, on the ``[out, in]`` layout (Mixtral) and on gpt-oss's
    transposed ``[in, out]`` one with biases and its interleaved, clamped gate; the layer's input and
    routing weights carry gradients to a dense trainable ``o_proj`` below."""
    model = _model(name)
    reference = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    experts, o_proj = _experts(model, 0), model.model.layers[0].self_attn.o_proj
    o_proj.weight.requires_grad_(True)
    chosen = {
        "gate_up_proj": torch.cat([_rows(experts.gate_up_proj.shape, 0, [1, 5]),
                                   _columns(experts.gate_up_proj.shape, 2, [0, 3, 7])]),
        "down_proj": torch.cat([_columns(experts.down_proj.shape, 1, [2, 4]), _rows(experts.down_proj.shape, 3, [6])]),
    }
    trainable = {n: attach_experts(model, "model.layers.0.mlp.experts", n, positions) for n, positions in chosen.items()}
    for p in reference.parameters():
        p.requires_grad_(True)
    inputs = zoo.example_inputs(name)
    zoo_loss(reference, inputs).backward()
    zoo_loss(model, inputs).backward()
    full = _experts(reference, 0)
    for n, positions in chosen.items():
        expected = _slice_of(getattr(full, n).grad, positions)
        assert int((expected != 0).sum()) > positions.numel() // 2, n  # the routed experts were reached
        torch.testing.assert_close(trainable[n].grad, expected, rtol=1e-10, atol=1e-13, msg=n)
    torch.testing.assert_close(o_proj.weight.grad, reference.model.layers[0].self_attn.o_proj.weight.grad,
                               rtol=1e-10, atol=1e-13)


def test_an_expert_weight_made_trainable_after_prepare_is_refused_not_silently_frozen():
    model = _model("mixtral")
    prepare_s2ft(model, S2FTConfig(channels=2, roles=("down",)))
    _experts(model, 1).gate_up_proj.requires_grad_(True)
    with pytest.raises(S2RegError, match="MixtralExperts.gate_up_proj requires grad beside its S2FT slices"):
        zoo_loss(model, zoo.example_inputs("mixtral"))


def test_a_slice_that_is_not_whole_rows_or_columns_is_refused():
    model = _model("mixtral")
    experts = _experts(model, 0)
    with pytest.raises(S2RegError, match="neither whole rows nor whole columns"):
        attach_experts(model, "model.layers.0.mlp.experts", "down_proj", _rows(experts.down_proj.shape, 1, [2])[:-1])
    assert _experts(model, 0) is experts  # a refused slice leaves the module unwrapped
    with pytest.raises(S2RegError, match="fused MoE experts only"):
        attach_experts(model, "model.layers.0.self_attn", "q_proj", torch.arange(3))
