"""The tensor-source protocol: checkpoint, in-memory and permuted sources answer alike."""

from __future__ import annotations

import pytest
import torch

from s2reg.errors import BaseMismatch, CheckpointError, NotFound
from s2reg.format import S2FTAdapter, dtypes
from s2reg.format.digest import tensor_sha256
from s2reg.tensors import CheckpointSource, MemorySource, PermutedView, open_source, save_state_dict


@pytest.fixture()
def tensors():
    g = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(6, 4, generator=g),
        "b.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "c.bias": torch.tensor([-0.0, 0.0, 1.5]),
    }


def test_memory_source_answers_like_the_checkpoint_it_was_saved_to(tensors, tmp_path):
    save_state_dict(tmp_path / "ckpt", tensors, extra_files={"config.json": b'{"model_type": "llama"}'})
    memory = MemorySource(tensors, {"model_type": "llama"})
    with open_source(tmp_path / "ckpt") as disk:
        assert isinstance(disk, CheckpointSource)
        assert memory.names() == disk.names() == sorted(tensors)
        for name in tensors:
            assert name in memory and memory.shape(name) == disk.shape(name) and memory.dtype(name) == disk.dtype(name)
            assert memory.sha256_of(name) == disk.sha256_of(name) == tensor_sha256(tensors[name])
            assert torch.equal(memory.get_rows(name, 1, 3).view(torch.uint8), disk.get_rows(name, 1, 3).view(torch.uint8))
        assert memory.config() == disk.config()
    assert "x" not in memory
    with pytest.raises(NotFound, match="no tensor named x"):
        memory.get("x")
    with pytest.raises(CheckpointError, match="out of range"):
        memory.get_rows("a.weight", 5, 7)


def test_memory_source_hands_out_copies(tensors):
    memory = MemorySource(tensors)
    memory.get("a.weight").zero_()
    memory.get_rows("a.weight", 0, 2).zero_()
    assert torch.equal(memory.get("a.weight"), tensors["a.weight"])
    assert memory.config() is None


def test_permuted_view_gathers_only_the_tensors_it_is_told_to(tensors):
    rows = torch.tensor([2, 0, 1])
    memory = MemorySource(tensors)
    view = PermutedView(memory, lambda name: ("rows", rows) if name == "b.weight"
                        else ("columns", torch.tensor([3, 2, 1, 0])) if name == "a.weight" else None)
    expected_b = tensors["b.weight"][rows]
    expected_a = tensors["a.weight"][:, [3, 2, 1, 0]]
    assert torch.equal(view.get("b.weight"), expected_b) and torch.equal(view.get("a.weight"), expected_a)
    assert torch.equal(view.get("c.bias").view(torch.uint8), tensors["c.bias"].view(torch.uint8))  # -0.0 kept
    assert view.sha256_of("b.weight") == tensor_sha256(expected_b)
    assert view.sha256_of("c.bias") == memory.sha256_of("c.bias")
    assert torch.equal(view.get_rows("a.weight", 2, 5), expected_a[2:5])
    assert torch.equal(view.get_rows("c.bias", 1, 3), tensors["c.bias"][1:3])
    assert view.names() == memory.names() and view.shape("a.weight") == (6, 4) and dtypes.name_of(view.dtype("b.weight")) == "BF16"
    with pytest.raises(CheckpointError, match="out of range"):
        view.get_rows("a.weight", 0, 9)


def test_verify_base_reads_any_source(tensors, tmp_path):
    slices = {"a.weight": ("rows", [1, 4], tensors["a.weight"][[1, 4]] + 0.5)}
    adapter = S2FTAdapter.from_tuned(MemorySource(tensors), slices, base_name="memory")
    save_state_dict(tmp_path / "ckpt", tensors)
    with open_source(tmp_path / "ckpt") as disk:
        adapter.verify_base(disk)
    adapter.verify_base(MemorySource(tensors))
    adapter.verify_base(PermutedView(MemorySource(tensors), lambda name: None))
    changed = dict(tensors, **{"a.weight": tensors["a.weight"] + 1})
    with pytest.raises(BaseMismatch, match="differs from the one this adapter was made for"):
        adapter.verify_base(MemorySource(changed))
    adapter.verify_base(MemorySource(changed), hashes=False)
    with pytest.raises(BaseMismatch, match="has no tensor 'a.weight'"):
        adapter.verify_base(MemorySource({"b.weight": tensors["b.weight"]}))
