"""Hostile safetensors files: one table, refused the same way by every reader (FORMAT §6.1).

Payloads, checkpoint shards and surgery journals share one header parser; each row below is fed
to all three, so a reader with laxer rules (an overlapping shard accepted, and an in-place patch
of one tensor then rewriting another) fails here.
"""

from __future__ import annotations

import json
import struct

import pytest

from s2reg.errors import S2RegError
from s2reg.format import payload
from s2reg.format.digest import sha256_bytes
from s2reg.surgery.inplace import recover
from s2reg.surgery.journal import Journal
from s2reg.surgery.ledger import Ledger
from s2reg.tensors import CheckpointSource


def file_bytes(header, data: bytes = b"", *, declared: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


def f32(begin: int, end: int, shape=None) -> dict:
    return {"dtype": "F32", "shape": [(end - begin) // 4] if shape is None else shape, "data_offsets": [begin, end]}


def nested(levels: int) -> bytes:
    return b"[" * levels + b'"x"' + b"]" * levels


HOSTILE = {
    "overlap": (file_bytes({"a": f32(0, 8), "b": f32(4, 12)}, bytes(12)), "overlap or alias"),
    "alias": (file_bytes({"a": f32(0, 8), "b": f32(0, 8)}, bytes(8)), "overlap or alias"),
    "gap": (file_bytes({"a": f32(0, 8), "b": f32(12, 20)}, bytes(20)), "a gap"),
    "offsets past the end": (file_bytes({"a": f32(0, 16)}, bytes(8)), "run past"),
    "trailing bytes": (file_bytes({"a": f32(0, 8)}, bytes(12)), "cover 8"),
    "header length past the file": (file_bytes({"a": f32(0, 8)}, bytes(8), declared=4096), "truncated"),
    "header length over the cap": (struct.pack("<Q", 2**40) + b"{}      ", "over the"),
    "header length 2**64-1": (struct.pack("<Q", 2**64 - 1) + b"{}      ", "over the"),
    "shorter than a length": (b"\x01\x02", "truncated"),
    "bool offsets": (file_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [False, 8]}}, bytes(8)),
                     "two integers"),
    "float offsets": (file_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}, bytes(8)),
                      "two integers"),
    "three offsets": (file_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, bytes(8)),
                      "two integers"),
    "begin after end": (file_bytes({"a": f32(8, 0, shape=[0])}, bytes(8)), "begin <= end"),
    "negative offset": (file_bytes({"a": f32(-8, 0, shape=[2])}, bytes(8)), "begin <= end"),
    "shape does not match the span": (file_bytes({"a": f32(0, 8, shape=[3])}, bytes(8)), "do not match"),
    "huge dimensions": (file_bytes({"a": f32(0, 8, shape=[2**62, 2**62, 2**62])}, bytes(8)), "do not match"),
    "dimension of 10**400": (file_bytes(b'{"a":{"dtype":"F32","shape":[1' + b"0" * 400 + b'],"data_offsets":[0,8]}}',
                                        bytes(8)), "integer literal of 401 digits"),
    "5001-digit integer": (file_bytes(b'{"a":{"dtype":"F32","shape":[' + b"7" * 5001 + b'],"data_offsets":[0,8]}}',
                                      bytes(8)), "integer literal of 5001 digits"),
    "empty tensor with a 2**63 dimension": (file_bytes({"a": f32(0, 0, shape=[0, 2**63])}), "invalid shape"),
    "bool dimension": (file_bytes({"a": f32(0, 4, shape=[True])}, bytes(4)), "invalid shape"),
    "unknown dtype": (file_bytes({"a": {"dtype": "F8", "shape": [8], "data_offsets": [0, 8]}}, bytes(8)),
                      "unknown dtype"),
    "extra entry key": (file_bytes({"a": {**f32(0, 8), "crc": 1}}, bytes(8)), "exactly dtype, shape"),
    "metadata is a list": (file_bytes({"__metadata__": [], "a": f32(0, 8)}, bytes(8)), "__metadata__"),
    "metadata value not a string": (file_bytes({"__metadata__": {"k": 1}, "a": f32(0, 8)}, bytes(8)), "__metadata__"),
    "header is a list": (file_bytes([], b""), "not a JSON object"),
    "header not UTF-8": (file_bytes(b'{"\xff":1}', b""), "UTF-8"),
    "header not JSON": (file_bytes(b"{nope", b""), "not valid JSON"),
    "NaN in the header": (file_bytes(b'{"__metadata__":{},"a":NaN}', b""), "NaN is not JSON"),
    "nested 1000 levels deep": (file_bytes(b'{"__metadata__":{"k":' + nested(1000) + b"}}"), "nests 1002 levels"),
}


def read_as_payload(tmp_path, data: bytes) -> None:
    payload.load(data)


def read_as_checkpoint(tmp_path, data: bytes) -> None:
    (tmp_path / "model.safetensors").write_bytes(data)
    CheckpointSource(tmp_path).close()


def read_as_journal(tmp_path, data: bytes) -> None:
    (tmp_path / Journal.PAYLOAD_NAME).write_bytes(data)
    journal = Journal("merge", "2026-01-01T00:00:00Z", Ledger(), Ledger(), (), sha256_bytes(data))
    (tmp_path / Journal.NAME).write_text(json.dumps(journal.to_json()))
    recover(tmp_path)


@pytest.mark.parametrize("reader", [read_as_payload, read_as_checkpoint, read_as_journal])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_every_reader_refuses_hostile_headers(tmp_path, reader, case):
    data, match = HOSTILE[case]
    with pytest.raises(S2RegError, match=match) as info:
        reader(tmp_path, data)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("reader", [read_as_payload, read_as_checkpoint])
def test_every_reader_accepts_the_strict_layout(tmp_path, reader):
    """Zero-size tensors may share an offset: they own no bytes, so nothing can alias."""
    header = {"__metadata__": {"k": "v"}, "a": f32(0, 8), "e": f32(8, 8, shape=[0, 5]), "b": f32(8, 12)}
    reader(tmp_path, file_bytes(header, bytes(12)))


@pytest.mark.parametrize("reader", [read_as_payload, read_as_checkpoint])
def test_files_written_by_the_safetensors_library_are_accepted(tmp_path, reader):
    """The strict rules are the reference implementation's: its own files pass them."""
    import torch
    from safetensors.torch import save

    from s2reg.format.arrays import to_torch

    tensors = {"w": torch.randn(3, 5), "h": torch.zeros(7, dtype=torch.float16), "i": torch.arange(5, dtype=torch.int8),
               "empty": torch.zeros(0, 4), "b": torch.ones(2, 2, dtype=torch.bfloat16)}
    data = save(tensors, metadata={"format": "pt"})
    reader(tmp_path, data)
    loaded, metadata = payload.load(data)
    assert metadata == {"format": "pt"}
    assert all(torch.equal(to_torch(loaded[name]), t) for name, t in tensors.items())


@pytest.mark.parametrize("metadata", [None, {"note": "é"}])  # one key: the library's metadata order is a hash map's
def test_checkpoint_shards_are_byte_for_byte_what_the_safetensors_library_writes(tmp_path, metadata):
    """The one header writer (``safetensors_header.encode``), given the library's tensor order, writes its
    exact bytes: compact JSON, ``__metadata__`` first, ``dtype``/``shape``/``data_offsets``, space padding."""
    import torch
    from safetensors.torch import save

    from s2reg.tensors.writer import save_state_dict

    tensors = {"w": torch.randn(3, 5), "h": torch.zeros(7, dtype=torch.float16), "i": torch.arange(5, dtype=torch.int8),
               "empty": torch.zeros(0, 4), "b": torch.ones(2, 2, dtype=torch.bfloat16), "é.x": torch.arange(3)}
    reference = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", reference[:8])
    order = [name for name in json.loads(reference[8 : 8 + n]) if name != "__metadata__"]
    assert order != sorted(order)  # the library's order (by dtype, then name) is kept, not re-sorted
    out = save_state_dict(tmp_path / "ckpt", [(name, tensors[name]) for name in order],
                          metadata={"model.safetensors": metadata} if metadata else None)
    assert (out / "model.safetensors").read_bytes() == reference


def test_payload_headers_sort_every_key_and_pad_with_spaces():
    """FORMAT §6.1: compact JSON with every object's keys sorted (``__metadata__`` among the tensor names,
    ``data_offsets`` before ``dtype``), tensors in name order, padded with spaces to a multiple of 8."""
    import numpy as np

    tensors = {"b": np.zeros(3, np.float32), "A": np.zeros((1, 2), np.int64), "a": np.zeros(0, np.float16)}
    data = payload.dump(tensors, {"z": "1", "s2reg.kind": "s2ft"})
    text = (b'{"A":{"data_offsets":[0,16],"dtype":"I64","shape":[1,2]},"__metadata__":{"s2reg.kind":"s2ft","z":"1"},'
            b'"a":{"data_offsets":[16,16],"dtype":"F16","shape":[0]},"b":{"data_offsets":[16,28],"dtype":"F32","shape":[3]}}')
    text += b" " * (-len(text) % 8)
    assert data == struct.pack("<Q", len(text)) + text + bytes(28)
