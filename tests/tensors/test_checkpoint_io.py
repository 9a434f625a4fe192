"""Checkpoint IO: the lazy reader against safetensors' own reader, strictness, atomic writes, and the table of
hostile checkpoints every command refuses in one line (the checkpoint side of tests/format/test_hostile.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from s2reg.cli import main
from s2reg.errors import MAX_MESSAGE, CheckpointError, NotFound
from s2reg.tensors import (
    CheckpointSource,
    TensorSpec,
    plan_shards,
    save_state_dict,
    write_checkpoint,
)
from s2reg.tensors.reader import INDEX_NAME

from ..surgery.helpers import pisa, s2ft, tiny


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


def test_side_files_skip_fifos_and_devices(tmp_path):
    src = save_state_dict(tmp_path / "src", {"x": torch.ones(2)}, extra_files={"config.json": b"{}"})
    (src / "original").mkdir()
    (src / "original" / "params.json").write_text("{}")
    os.mkfifo(src / "original" / "pipe")
    (src / "original" / "zeros").symlink_to("/dev/zero")  # copied, it would fill the disk
    os.mkfifo(src / "tokenizer.json")
    out = write_checkpoint(tmp_path / "dst", {"model.safetensors": [TensorSpec("x", (2,), torch.float32)]},
                           lambda s: torch.ones(2), side_files_from=src)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "original"]
    assert [p.name for p in (out / "original").iterdir()] == ["params.json"]


def test_shards_may_be_links_to_regular_files(tmp_path):
    """The Hugging Face cache: each snapshot is a directory of symbolic links into blobs/."""
    out = save_state_dict(tmp_path / "ckpt", sample_tensors(), max_shard_bytes=64)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in out.glob("*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    with CheckpointSource(out) as source:
        assert torch.equal(source.get("d.ids"), torch.arange(6, dtype=torch.int32))


# -- hostile checkpoints: one row each, every command that opens the checkpoint ---------------------------------

def _first_shard(ckpt):
    return sorted(ckpt.glob("model-*.safetensors"))[0]


def _fifo_beside_the_shards(ckpt):
    (ckpt / INDEX_NAME).unlink()  # found by listing the directory
    os.mkfifo(ckpt / "extra.safetensors")


def _fifo_as_an_indexed_shard(ckpt):
    shard = _first_shard(ckpt)
    shard.unlink()
    os.mkfifo(shard)


def _directory_named_like_a_shard(ckpt):
    (ckpt / INDEX_NAME).unlink()
    (ckpt / "x.safetensors").mkdir()


def _link_to_a_device(ckpt):
    (ckpt / INDEX_NAME).unlink()
    (ckpt / "x.safetensors").symlink_to("/dev/zero")


def _a_long_name_in_two_shards(ckpt):
    """A tensor name of 20,000 characters and newlines, in two shards: the error quotes it."""
    (ckpt / INDEX_NAME).unlink()
    name = "evil\nname" * 2_000
    for shard in ("zy", "zz"):
        save_state_dict(ckpt.parent / shard, {name: torch.zeros(1)})
        (ckpt.parent / shard / "model.safetensors").rename(ckpt / f"{shard}.safetensors")


def _index(text):
    return lambda ckpt: (ckpt / INDEX_NAME).write_text(text)


def _weight_map_value(value):
    def damage(ckpt):
        index = json.loads((ckpt / INDEX_NAME).read_text())
        index["weight_map"][next(iter(index["weight_map"]))] = value
        (ckpt / INDEX_NAME).write_text(json.dumps(index))
    return damage


def _config(text):
    return lambda ckpt: (ckpt / "config.json").write_text(text)


DEEP = "[" * 100_000 + "]" * 100_000
FIFOS = ("FIFO beside the shards", "FIFO as an indexed shard")
# row -> (what is done to a good checkpoint, what the one-line error says)
HOSTILE_CHECKPOINTS = {
    FIFOS[0]: (_fifo_beside_the_shards, "extra.safetensors is a FIFO, not a regular file"),
    FIFOS[1]: (_fifo_as_an_indexed_shard, "model-00001-of-.*safetensors is a FIFO, not a regular file"),
    "directory x.safetensors": (_directory_named_like_a_shard, "x.safetensors is a directory, not a regular file"),
    "link to /dev/zero": (_link_to_a_device, "x.safetensors is a character device, not a regular file"),
    "a long name in two shards": (_a_long_name_in_two_shards,
                                  r"tensor evil nameevil .* \.\.\. .* is stored in both zy\.safetensors and zz"),
    "index nested 100,000 deep": (_index('{"weight_map": ' + DEEP + "}"), "index.json nests 100001 levels deep"),
    "index a JSON array": (_index("[]"), r"index.json: not a shard index \(no \"weight_map\" object\)"),
    "index not JSON": (_index("{nope"), "index.json is not valid JSON"),
    "weight_map value a number": (_weight_map_value(5), "is a number, not a file name"),
    "weight_map value null": (_weight_map_value(None), "is null, not a file name"),
    "index naming a path": (_weight_map_value("sub/x.safetensors"), "'sub/x.safetensors' points outside"),
    "index naming ..": (_weight_map_value("../model.safetensors"), r"'\.\./model.safetensors' points outside"),
    "config a JSON array": (_config("[1, 2]"), "config.json: a model config must be a JSON object, not an array"),
    "config nested 100,000 deep": (_config(DEEP), "config.json nests 100000 levels deep"),
}
COMMANDS = {
    "merge -o": lambda ckpt, a: ["merge", ckpt, a["s2ft"], "-o", ckpt.parent / "out"],
    "merge --in-place": lambda ckpt, a: ["merge", ckpt, a["s2ft"], "--in-place"],
    "validate --base": lambda ckpt, a: ["validate", a["s2ft"], "--base", ckpt],
    "inspect --base": lambda ckpt, a: ["inspect", a["s2ft"], "--base", ckpt],
    "inspect --base (PISA)": lambda ckpt, a: ["inspect", a["pisa"], "--base", ckpt],
    "permute": lambda ckpt, a: ["permute", ckpt, "--plan", a["s2ft"], "-o", ckpt.parent / "out"],
}
CONFIG_READERS = ("inspect --base", "inspect --base (PISA)", "permute")  # merge and validate need no config


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base = tiny(root / "base")
    s2ft(base).save(root / "s2ft")
    pisa(base).save(root / "pisa")
    return base, {"s2ft": root / "s2ft", "pisa": root / "pisa"}


def _cases():
    for row in HOSTILE_CHECKPOINTS:
        for command in COMMANDS:
            if not row.startswith("config") or command in CONFIG_READERS:
                yield pytest.param(row, command, id=f"{row} / {command}")


def _run(args, *, fifo: bool) -> tuple[int, str]:
    """Exit status and output of ``s2reg ARGS``; a FIFO row runs in a child, so that a hang fails the test."""
    args = [str(a) for a in args]
    if not fifo:
        result = CliRunner().invoke(main, args)
        return result.exit_code, result.output
    done = subprocess.run([sys.executable, "-m", "s2reg", *args], capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("row, command", _cases())
def test_hostile_checkpoints_are_refused_in_one_line(good, tmp_path, row, command):
    base, adapters = good
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base, ckpt)
    damage, says = HOSTILE_CHECKPOINTS[row]
    damage(ckpt)
    status, output = _run(COMMANDS[command](ckpt, adapters), fifo=row in FIFOS)
    assert status == 1, output
    assert "Traceback" not in output
    assert output.count("\n") == 1 and output.startswith("Error: ") and len(output) <= len("Error: \n") + MAX_MESSAGE
    assert re.search(says, output), output
    assert not (tmp_path / "out").exists()
