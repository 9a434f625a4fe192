"""Every way out of a prepared model gives the trained weights, right after an optimizer step.

The training layers never write the frozen weight (they compute with an effective weight), so the
reference for what a state dict or ``save_pretrained`` must hold is independent of them: the base
checkpoint merged with the exported adapter by ``s2reg.merge`` (format code on numpy arrays), and a
plain transformers model loaded from the saved directory, which must compute the prepared model's
logits bit for bit. Each check runs right after ``optimizer.step()``, with no forward in between (the
issue: a lazily synced weight was one step behind there).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import s2reg
from s2reg.tensors import CheckpointSource
from s2reg.train import PISAConfig, S2FTConfig, export_adapter, prepare_pisa, prepare_s2ft

from ..families import zoo
from .helpers import batch, tiny_model, trained_zoo_adapter, zoo_base


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files, by name."""
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            found.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (not a mapping)
    return found


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def own_loop(model, steps: int = 3, lr: float = 1e-2) -> None:
    """The user's own loop: AdamW steps, and nothing after the last one."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        model(**batch(model, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_s2ft_state_dict_and_save_pretrained_are_the_merged_adapter(tmp_path, dtype):
    model, base = tiny_model(tmp_path / "base", dtype=dtype)
    prepare_s2ft(model, S2FTConfig(heads=1, channels=4, roles=("q", "v", "o", "up", "down"), seed=2))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    own_loop(model)
    state = model.state_dict()
    model.save_pretrained(tmp_path / "saved")
    with CheckpointSource(base) as source:
        adapter = export_adapter(model, base=source)
    s2reg.merge(base, [adapter], tmp_path / "merged")
    merged = tensors(tmp_path / "merged")

    assert not [k for k in state if "s2ft" in k]
    assert state.keys() == merged.keys()
    assert all(torch.equal(bits(state[k]), bits(merged[k])) for k in merged)
    assert {k for k in merged if not torch.equal(bits(merged[k]), bits(tensors(base)[k]))} == set(adapter.targets)
    saved = tensors(tmp_path / "saved")
    assert saved.keys() == merged.keys() and all(torch.equal(bits(saved[k]), bits(merged[k])) for k in merged)
    # a plain model from the saved directory computes what the prepared one does
    plain = type(model).from_pretrained(tmp_path / "saved", dtype=dtype).eval()
    probe = batch(model, seed=9)
    assert torch.equal(plain(**probe).logits, model(**probe).logits)
    # the frozen weights themselves were never written
    assert all(torch.equal(bits(p.detach()), bits(frozen[n])) for n, p in model.named_parameters() if n in frozen)

    # and the state dict loads back into a freshly prepared model: the same adapter
    fresh, _ = tiny_model(tmp_path / "fresh", dtype=dtype)
    prepare_s2ft(fresh, S2FTConfig(heads=1, channels=4, roles=("q", "v", "o", "up", "down"), seed=2))
    fresh.load_state_dict(state)
    with CheckpointSource(base) as source:
        again = export_adapter(fresh, base=source)
    assert again.targets.keys() == adapter.targets.keys()
    assert all(torch.equal(torch.as_tensor(again.to_dense(n)), torch.as_tensor(adapter.to_dense(n)))
               for n in adapter.targets)
    assert all(torch.equal(bits(p.detach()), bits(frozen[n])) for n, p in fresh.named_parameters() if n in frozen)


def test_fused_moe_experts_save_as_the_merged_checkpoint(tmp_path):
    base = zoo_base("mixtral", tmp_path / "base")
    adapter, model = trained_zoo_adapter("mixtral", base, steps=2, lr=0.05, roles=("o", "up", "gate", "down"))
    assert any("experts" in name for name in adapter.targets)
    state = model.state_dict()
    model.save_pretrained(tmp_path / "saved")
    s2reg.merge(base, [adapter], tmp_path / "merged")
    merged, saved = tensors(tmp_path / "merged"), tensors(tmp_path / "saved")
    assert not [k for k in state if "s2ft" in k]
    assert saved.keys() == merged.keys()
    assert all(torch.equal(bits(saved[k]), bits(merged[k])) for k in merged)
    inputs = zoo.example_inputs("mixtral", seed=4)
    plain = zoo.load("mixtral", tmp_path / "saved")
    assert torch.equal(zoo.outputs(plain, inputs), zoo.outputs(model.eval(), inputs))


def test_pisa_state_dict_holds_the_weights_the_model_computes_with(tmp_path):
    model, base = tiny_model(tmp_path / "base", dtype=torch.float32)
    prepare_pisa(model, PISAConfig(block=16, coefficients=6, roles=("q", "down"), seed=1))
    own_loop(model, lr=5e-3)
    state = model.state_dict()
    model.save_pretrained(tmp_path / "saved")
    with CheckpointSource(base) as source:
        adapter = export_adapter(model, base=source)
    s2reg.merge(base, [adapter], tmp_path / "merged")
    merged, original = tensors(tmp_path / "merged"), tensors(base)

    assert not [k for k in state if "pisa" in k] and state.keys() == merged.keys()
    changed = {k for k in merged if not torch.equal(state[k], original[k])}
    assert changed == set(adapter.targets) and len(changed) == 2 * model.config.num_hidden_layers
    # s2reg merge reconstructs the delta its own way (float64): equal to float32 rounding
    for name in merged:
        torch.testing.assert_close(state[name], merged[name], rtol=0, atol=1e-6)
    plain = type(model).from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    probe = batch(model, seed=9)
    assert torch.equal(plain(**probe).logits, model(**probe).logits)
    # a dense trained weight cannot give the coefficients back: refused, saying what to do instead
    fresh, _ = tiny_model(tmp_path / "fresh", dtype=torch.float32)
    prepare_pisa(fresh, PISAConfig(block=16, coefficients=6, roles=("q", "down"), seed=1))
    with pytest.raises(RuntimeError, match="coefficients cannot be read back.*load the s2reg adapter"):
        fresh.load_state_dict(state)
