"""Checkpoint IO: the lazy reader against safetensors' own reader, strictness, atomic writes."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from s2reg.errors import CheckpointError, NotFound
from s2reg.tensors import (
    CheckpointSource,
    TensorSpec,
    plan_shards,
    save_state_dict,
    write_checkpoint,
)
from s2reg.tensors.reader import INDEX_NAME


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(3, 4, 2, generator=g, dtype=torch.float64),
        "c.bias": torch.randn(11, generator=g).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int32),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("max_shard", [1 << 30, 64])
def test_reader_agrees_with_safetensors(tmp_path, max_shard):
    tensors = sample_tensors()
    out = save_state_dict(tmp_path / "ckpt", tensors, max_shard_bytes=max_shard)
    with CheckpointSource(out) as source:
        assert source.names() == sorted(tensors)
        assert (len(source.files) > 1) == (max_shard == 64)
        assert (out / INDEX_NAME).is_file() == (max_shard == 64)
        for name, tensor in tensors.items():
            got = source.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
            with safe_open(source.info(name).file, framework="pt") as reference:
                assert torch.equal(reference.get_tensor(name), tensor)
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert source.sha256_of(name) == hashlib.sha256(raw).hexdigest()
        assert torch.equal(source.get_rows("a.weight", 2, 5), tensors["a.weight"][2:5])
        assert torch.equal(source.get_rows("b.weight", 1, 3), tensors["b.weight"][1:3])
        with pytest.raises(CheckpointError, match="out of range"):
            source.get_rows("a.weight", 5, 8)
        with pytest.raises(NotFound, match="no tensor named"):
            source.get("missing")


def test_index_lists_every_tensor_and_total_size(tmp_path):
    tensors = sample_tensors()
    out = save_state_dict(tmp_path / "ckpt", tensors, max_shard_bytes=64)
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_single_file_and_unindexed_directory(tmp_path):
    tensors = sample_tensors()
    out = save_state_dict(tmp_path / "ckpt", tensors)
    with CheckpointSource(out / "model.safetensors") as one_file:
        assert one_file.names() == sorted(tensors)
        assert one_file.directory == out


def test_truncated_shard_is_refused(tmp_path):
    out = save_state_dict(tmp_path / "ckpt", sample_tensors(), max_shard_bytes=64)
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="truncated or extended"):
        CheckpointSource(out)


def test_garbage_header_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="header"):
        CheckpointSource(tmp_path)


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    out = save_state_dict(tmp_path / "ckpt", sample_tensors(), max_shard_bytes=64)
    sorted(out.glob("*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="shard files missing"):
        CheckpointSource(out)


def test_index_that_disagrees_with_shards_is_refused(tmp_path):
    out = save_state_dict(tmp_path / "ckpt", sample_tensors(), max_shard_bytes=64)
    index = json.loads((out / INDEX_NAME).read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    name = next(n for n, f in index["weight_map"].items() if f == first)
    index["weight_map"][name] = second
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index disagrees"):
        CheckpointSource(out)


def test_index_cannot_point_outside(tmp_path):
    out = save_state_dict(tmp_path / "ckpt", sample_tensors(), max_shard_bytes=64)
    (out / INDEX_NAME).write_text(json.dumps({"weight_map": {"a.weight": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside"):
        CheckpointSource(out)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no safetensors files"):
        CheckpointSource(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        CheckpointSource(tmp_path / "nope")


def test_failed_write_leaves_nothing(tmp_path):
    specs = [TensorSpec("x", (4,), torch.float32), TensorSpec("y", (4,), torch.float32)]

    def produce(spec):
        if spec.name == "y":
            raise OSError(28, "No space left on device")
        return torch.zeros(4)

    with pytest.raises(OSError, match="No space"):
        write_checkpoint(tmp_path / "out", plan_shards(specs), produce)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    first = save_state_dict(tmp_path / "out", {"x": torch.ones(2)})
    with pytest.raises(FileExistsError):
        save_state_dict(first, {"x": torch.zeros(2)})
    with CheckpointSource(first) as source:
        assert torch.equal(source.get("x"), torch.ones(2))
    save_state_dict(first, {"x": torch.zeros(2)}, overwrite=True)
    with CheckpointSource(first) as source:
        assert torch.equal(source.get("x"), torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_produced_tensor_must_match_its_plan(tmp_path):
    specs = [TensorSpec("x", (4,), torch.float32)]
    with pytest.raises(CheckpointError, match="planned"):
        write_checkpoint(tmp_path / "out", plan_shards(specs), lambda s: torch.zeros(5))
    assert not (tmp_path / "out").exists()


def test_side_files_are_copied(tmp_path):
    src = save_state_dict(tmp_path / "src", {"x": torch.ones(2)}, extra_files={"config.json": b"{}", "tokenizer.json": b"[]"})
    out = write_checkpoint(tmp_path / "dst", {"model.safetensors": [TensorSpec("x", (2,), torch.float32)]},
                           lambda s: torch.ones(2), side_files_from=src)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
