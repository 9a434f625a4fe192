"""Hostile and broken adapters: each is refused with a clear one-line error (FORMAT §6, §7)."""

from __future__ import annotations

import json
import struct

import pytest
import numpy as np
import torch
import zstandard
from click.testing import CliRunner

import s2reg
from s2reg.cli import main
from s2reg.errors import FormatError, IntegrityError, LimitExceeded, NonFiniteError, S2RegError, ShapeError
from s2reg.format import codec, payload
from s2reg.format.digest import sha256_bytes

from .helpers import DOWN, Q, forge, parts, pisa_adapter, s2ft_adapter, signed_zero_adapter


def refused(path, error, match):
    """The library raises ``error`` and ``s2reg validate`` exits 1 with the same one-line message."""
    with pytest.raises(error, match=match) as info:
        s2reg.load(path)
    message = str(info.value)
    assert "\n" not in message
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and message in result.output
    assert "Traceback" not in result.output


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "a"
    s2ft_adapter().save(path, compress=False)
    return path


def test_truncated_payload(saved):
    file = saved / "payload.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    refused(saved, FormatError, "truncated")


def test_corrupted_byte_fails_the_hash(saved):
    file = saved / "payload.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x40
    file.write_bytes(bytes(data))
    refused(saved, IntegrityError, "sha256 mismatch")


def test_corrupted_compressed_payload(tmp_path):
    s2ft_adapter().save(tmp_path / "a", compress=True)
    file = tmp_path / "a" / "payload.safetensors.zst"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    refused(tmp_path / "a", IntegrityError, "sha256 mismatch")


def test_missing_payload_file(saved):
    (saved / "payload.safetensors").unlink()
    refused(saved, FormatError, "payload file missing")


def test_not_an_adapter_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", FormatError, "no s2reg.json")


def test_manifest_not_json(saved):
    (saved / "s2reg.json").write_text("{not json")
    refused(saved, FormatError, "not valid JSON")


@pytest.mark.parametrize(
    "path_in_manifest, match",
    [
        (("kind",), "missing required key 'kind'"),
        (("base",), "missing required key 'base'"),
        (("payload", "sha256"), "missing required key 'sha256'"),
        (("provenance", "created"), "missing required key 'created'"),
    ],
)
def test_manifest_missing_fields(tmp_path, path_in_manifest, match):
    data, tensors = parts(s2ft_adapter())
    holder = data
    for key in path_in_manifest[:-1]:
        holder = holder[key]
    del holder[path_in_manifest[-1]]
    path = tmp_path / "a"
    forge(path, data, tensors)
    if path_in_manifest[0] == "payload":  # forge recomputes the payload entry; drop the key after
        written = json.loads((path / "s2reg.json").read_text())
        del written["payload"]["sha256"]
        (path / "s2reg.json").write_text(json.dumps(written))
    refused(path, FormatError, match)


def test_manifest_wrong_type(tmp_path):
    data, tensors = parts(s2ft_adapter())
    data["targets"][DOWN]["count"] = "four"
    refused(forge(tmp_path / "a", data, tensors), FormatError, "'count' must be int")


def test_missing_target_field(tmp_path):
    data, tensors = parts(s2ft_adapter())
    del data["targets"][DOWN]["axis"]
    refused(forge(tmp_path / "a", data, tensors), FormatError, "missing required key 'axis'")


def test_bad_tensor_name(tmp_path):
    data, tensors = parts(s2ft_adapter())
    data["targets"]["../evil"] = data["targets"].pop(DOWN)
    refused(forge(tmp_path / "a", data, tensors), FormatError, "invalid tensor name")


@pytest.mark.parametrize(
    "indices, error, match",
    [
        ([3, 7, 8, 40], ShapeError, "index 40 out of range"),
        ([3, 8, 7, 30], FormatError, "strictly increasing"),
        ([3, 7, 7, 30], FormatError, "strictly increasing"),
        ([-1, 7, 8, 30], ShapeError, "index -1 out of range"),
    ],
)
def test_s2ft_bad_indices(tmp_path, indices, error, match):
    data, tensors = parts(s2ft_adapter())
    tensors[f"{DOWN}.indices"] = torch.tensor(indices, dtype=torch.int32)
    refused(forge(tmp_path / "a", data, tensors), error, match)


def test_s2ft_slice_shape_mismatch(tmp_path):
    data, tensors = parts(s2ft_adapter())
    tensors[f"{DOWN}.delta"] = torch.zeros(15, 4)
    refused(forge(tmp_path / "a", data, tensors), ShapeError, "does not match the slice shape")


def test_s2ft_count_mismatch(tmp_path):
    data, tensors = parts(s2ft_adapter())
    data["targets"][DOWN]["count"] = 5
    refused(forge(tmp_path / "a", data, tensors), ShapeError, "count 5")


def test_s2ft_incomplete_group(tmp_path):
    data, tensors = parts(s2ft_adapter())
    tensors[f"{Q}.indices"] = torch.arange(8, 16, dtype=torch.int32) - 1  # 7..14 straddles two heads
    refused(forge(tmp_path / "a", data, tensors), FormatError, "whole groups of 8")


@pytest.mark.parametrize(
    "tamper, error, match",
    [
        (lambda d, t: t.__setitem__(f"{DOWN}.restore", torch.tensor([0, 5, 64])), ShapeError, "restore position out of range"),
        (lambda d, t: t.__setitem__(f"{DOWN}.restore", torch.tensor([5, 0, 21])), FormatError, "strictly increasing"),
        (lambda d, t: t.__setitem__(f"{DOWN}.restore", torch.tensor([0, 5, 21], dtype=torch.int32)), FormatError, "must be I64"),
        (lambda d, t: t.__setitem__(f"{DOWN}.restore_values", t[f"{DOWN}.restore_values"].astype(np.float32)), FormatError,
         r"restore_values must be \[3, 2\] BF16"),
        (lambda d, t: d["targets"][DOWN].__setitem__("restore", 2), ShapeError, "manifest restore 2"),
        (lambda d, t: d["targets"][DOWN].__setitem__("restore", "3"), FormatError, "'restore' must be int"),
        (lambda d, t: t.pop(f"{DOWN}.restore_values"), FormatError, "missing .*restore_values"),
    ],
)
def test_s2ft_bad_restore_list(tmp_path, tamper, error, match):
    """FORMAT §4.2, §7 step 4: restore lists are checked like indices."""
    data, tensors = parts(signed_zero_adapter())
    tamper(data, tensors)
    refused(forge(tmp_path / "a", data, tensors), error, match)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_delta_refused_unless_allowed(tmp_path, bad):
    data, tensors = parts(s2ft_adapter())
    tensors[f"{DOWN}.delta"][0, 0] = bad
    path = forge(tmp_path / "a", data, tensors)
    refused(path, NonFiniteError, "NaN or Inf")
    assert np.isnan(s2reg.load(path, allow_nonfinite=True).targets[DOWN].delta).any() == (bad != bad)
    result = CliRunner().invoke(main, ["validate", str(path), "--allow-nonfinite"])
    assert result.exit_code == 0, result.output


def test_nonfinite_rejected_at_construction():
    with pytest.raises(NonFiniteError):
        s2reg.PISAAdapter.from_coefficients(
            {"w": torch.zeros(4, 4)},
            {"w": ((4, 4), torch.tensor([[1]]), torch.tensor([[complex(float("nan"), 0)]]))},
            base_name="b",
        )


def test_pisa_bad_frequency_index(tmp_path):
    data, tensors = parts(pisa_adapter())
    name = next(iter(data["targets"]))
    idx = tensors[f"{name}.indices"].copy()
    idx[0, -1] = 4 * (8 // 2 + 1)  # one past the half-plane of a 4x8 block
    tensors[f"{name}.indices"] = idx
    refused(forge(tmp_path / "a", data, tensors), ShapeError, "out of range")


def test_pisa_grid_mismatch(tmp_path):
    data, tensors = parts(pisa_adapter())
    name = next(iter(data["targets"]))
    data["targets"][name]["grid"] = [1, 1]
    refused(forge(tmp_path / "a", data, tensors), ShapeError, "grid")


def test_payload_with_unexpected_tensor(tmp_path):
    data, tensors = parts(s2ft_adapter())
    tensors["sneaky"] = torch.zeros(1)
    refused(forge(tmp_path / "a", data, tensors), FormatError, "unexpected 'sneaky'")


def test_a_payload_naming_5000_unexpected_tensors_is_refused_in_one_short_line(tmp_path):
    data, tensors = parts(s2ft_adapter())
    tensors.update((f"sneaky.{i}", torch.zeros(1)) for i in range(5_000))
    refused(forge(tmp_path / "a", data, tensors), FormatError, r"unexpected 'sneaky\.0', .* and 4,995 more\)$")


def _with_raw_payload(path, raw: bytes, data: dict) -> None:
    data = json.loads(json.dumps(data))
    data["payload"].update(bytes=len(raw), sha256=sha256_bytes(raw), raw_bytes=len(raw), raw_sha256=sha256_bytes(raw))
    path.mkdir()
    (path / "payload.safetensors").write_bytes(raw)
    (path / "s2reg.json").write_text(json.dumps(data))


def test_oversized_header(tmp_path):
    data, _ = parts(s2ft_adapter())
    raw = struct.pack("<Q", payload.MAX_HEADER_BYTES + 1) + b"{}"
    _with_raw_payload(tmp_path / "a", raw, data)
    refused(tmp_path / "a", FormatError, "over the 16777216-byte limit")


def test_header_longer_than_file(tmp_path):
    data, _ = parts(s2ft_adapter())
    _with_raw_payload(tmp_path / "a", struct.pack("<Q", 1000) + b"{}", data)
    refused(tmp_path / "a", FormatError, "truncated")


def test_overlapping_offsets(tmp_path):
    data, tensors = parts(s2ft_adapter())
    raw = bytearray(payload.dump(tensors, {}))
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    first = min((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
    first["data_offsets"] = [4, first["data_offsets"][1] + 4]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    _with_raw_payload(tmp_path / "a", struct.pack("<Q", len(text)) + text + bytes(raw[8 + n :]), data)
    refused(tmp_path / "a", FormatError, "a gap|overlap or alias")


def _with_zstd_payload(path, blob: bytes, data: dict, raw: bytes, raw_bytes: int | None = None):
    data = json.loads(json.dumps(data))
    data["payload"].update(
        file="payload.safetensors.zst", encoding="zstd-byteplane", bytes=len(blob), sha256=sha256_bytes(blob),
        raw_bytes=len(raw) if raw_bytes is None else raw_bytes, raw_sha256=sha256_bytes(raw), zstd_level=codec.DEFAULT_LEVEL,
    )
    path.mkdir()
    (path / "payload.safetensors.zst").write_bytes(blob)
    (path / "s2reg.json").write_text(json.dumps(data))
    return path


def test_decompression_bomb_is_refused(tmp_path):
    """FORMAT §6.2: a frame that declares more than raw_bytes is refused before anything is allocated."""
    data, tensors = parts(s2ft_adapter())
    raw = payload.dump(tensors, {})
    bomb = zstandard.ZstdCompressor().compress(raw + bytes(50_000_000))
    refused(_with_zstd_payload(tmp_path / "a", bomb, data, raw), FormatError, f"declares {len(raw) + 50_000_000} content")


def test_compressed_payload_shorter_than_declared(tmp_path):
    data, tensors = parts(s2ft_adapter())
    raw = payload.dump(tensors, {})
    path = _with_zstd_payload(tmp_path / "a", codec.encode(raw), data, raw, raw_bytes=len(raw) + 8)
    refused(path, FormatError, "truncated")


@pytest.mark.parametrize("raw_bytes, error, match", [
    (2**40, LimitExceeded, "over the limit of 4,294,967,296 .*--max-decompressed or S2REG_MAX_DECOMPRESSED"),
    (2**63 - 1, LimitExceeded, "over the limit"),
    (2**63, FormatError, "'raw_bytes' must be >= 0 and below 2\\*\\*63"),
    (10**19 * 9, FormatError, "'raw_bytes' must be >= 0 and below 2\\*\\*63"),
    (10**25, FormatError, "integer literal of 26 digits"),
])
def test_huge_declared_sizes_are_refused_before_allocating(tmp_path, raw_bytes, error, match):
    data, tensors = parts(s2ft_adapter())
    raw = payload.dump(tensors, {})
    refused(_with_zstd_payload(tmp_path / "a", codec.encode(raw), data, raw, raw_bytes=raw_bytes), error, match)


def test_declared_size_over_zstds_own_ratio_is_refused(tmp_path, monkeypatch):
    """FORMAT §6.2: no zstd frame inflates more than 32768:1, so a header that claims more is forged."""
    monkeypatch.setenv("S2REG_MAX_DECOMPRESSED", str(2**50))
    data, tensors = parts(s2ft_adapter())
    raw = payload.dump(tensors, {})
    blob = codec.encode(raw)
    path = _with_zstd_payload(tmp_path / "a", blob, data, raw, raw_bytes=codec.MAX_RATIO * len(blob) + 1)
    refused(path, FormatError, "more than zstd's 32768:1")


def test_decompression_cap_is_raised_by_env_and_flag(tmp_path, monkeypatch):
    adapter = s2ft_adapter()
    stored = adapter.save(tmp_path / "a")
    monkeypatch.setenv("S2REG_MAX_DECOMPRESSED", str(stored.raw_bytes - 1))
    refused(tmp_path / "a", LimitExceeded, f"{stored.raw_bytes - 1:,}")
    ok = CliRunner().invoke(main, ["--max-decompressed", str(stored.raw_bytes), "validate", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    low = CliRunner().invoke(main, ["--max-decompressed", "100", "inspect", str(tmp_path / "a")])
    assert low.exit_code == 1 and "over the limit of 100 (raise it with --max-decompressed" in low.output
    monkeypatch.setenv("S2REG_MAX_DECOMPRESSED", "lots")
    refused(tmp_path / "a", S2RegError, "S2REG_MAX_DECOMPRESSED='lots' is not")


def _skippable(content: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A50, len(content)) + content


@pytest.mark.parametrize("shape, match", [
    (lambda frame, raw: _skippable(b"hello") + frame, "does not start with a zstd frame"),
    (lambda frame, raw: frame + _skippable(b"hello"), "not exactly one zstd frame \\(13 bytes after it"),
    (lambda frame, raw: frame + zstandard.ZstdCompressor().compress(b""), "not exactly one zstd frame"),
    (lambda frame, raw: frame + b"\0", "not exactly one zstd frame \\(1 bytes after it"),
    (lambda frame, raw: frame[:-6], "truncated inside its zstd frame"),
    (lambda frame, raw: zstandard.ZstdCompressor(write_content_size=False).compress(raw), "declares no content size"),
])
def test_only_one_zstd_frame_is_accepted(tmp_path, shape, match):
    """FORMAT §6.2: the file is one zstd frame declaring its size; skippable or extra frames are refused."""
    data, tensors = parts(s2ft_adapter())
    raw = payload.dump(tensors, {})
    frame = codec.encode(raw)
    refused(_with_zstd_payload(tmp_path / "a", shape(frame, raw), data, raw), FormatError, match)


def test_both_payload_files_are_refused(tmp_path):
    """FORMAT §1: exactly one of payload.safetensors and payload.safetensors.zst."""
    adapter = s2ft_adapter()
    adapter.save(tmp_path / "a", compress=True)
    (tmp_path / "a" / "payload.safetensors").write_bytes(adapter.payload_bytes())
    refused(tmp_path / "a", FormatError, "holds both payload.safetensors.zst and payload.safetensors")


def _payload_header(tensors) -> tuple[dict, bytes]:
    raw = payload.dump(tensors, {"s2reg.format_version": "1", "s2reg.kind": "s2ft"})
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _reheader(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize("tamper, match", [
    (lambda h: h[f"{DOWN}.delta"].update(data_offsets=[False, h[f"{DOWN}.delta"]["data_offsets"][1]]), "two integers"),
    (lambda h: h.update(__metadata__=[]), "__metadata__ must be an object"),
])
def test_off_spec_payload_headers_are_refused(tmp_path, tamper, match):
    data, tensors = parts(s2ft_adapter())
    header, body = _payload_header(tensors)
    tamper(header)
    _with_raw_payload(tmp_path / "a", _reheader(header, body), data)
    refused(tmp_path / "a", FormatError, match)


def _manifest_text(tmp_path, text: bytes):
    s2ft_adapter().save(tmp_path / "a")
    (tmp_path / "a" / "s2reg.json").write_bytes(text)
    return tmp_path / "a"


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace(b'"params": {', b'"params": {"deep": ' + b"[" * 1000 + b"]" * 1000 + b", ", 1),
     "manifest .*s2reg.json nests 1002 levels deep, over the limit of 64"),  # the file named (issue 24)
    (lambda t: t.replace(b'"shape": [\n        16,', b'"shape": [\n        1' + b"0" * 400 + b",", 1),
     "integer literal of 401 digits"),
    (lambda t: t.replace(b'"params": {', b'"params": {"seed": ' + b"9" * 5001 + b", ", 1), "integer literal of 5001"),
    (lambda t: t.replace(b'"params": {', b'"params": {"x": NaN, ', 1), "NaN is not JSON"),
    (lambda t: t.replace(b'"params": {', b'"params": {"x": 1e999, ', 1), "out of the float range"),
    (lambda t: t.replace(b'"format_version": 1', b'"format_version": 1' + b"0" * 30, 1), "integer literal of 31"),
])
def test_hostile_manifest_json_is_refused(tmp_path, edit, match):
    """Depth, literal length and non-finite numbers are bounded before or while parsing (FORMAT §8)."""
    text = (s2ft_adapter().save(tmp_path / "src").path / "s2reg.json").read_bytes()
    changed = edit(text)
    assert changed != text
    refused(_manifest_text(tmp_path, changed), FormatError, match)


def test_manifest_dimension_of_2_to_the_63_is_refused(tmp_path):
    data, tensors = parts(s2ft_adapter())
    data["base"]["fingerprints"][DOWN]["shape"] = [2**63, 40]
    refused(forge(tmp_path / "a", data, tensors), FormatError, "below 2\\*\\*63")


def test_oversized_manifest(tmp_path, monkeypatch):
    from s2reg.format import manifest

    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 100)
    s2ft_adapter().save(tmp_path / "a")
    with pytest.raises(FormatError, match="manifest limit"):
        s2reg.load(tmp_path / "a")


def _tiny_adapter_declaring_a_huge_target(path):
    """A few-KB PISA adapter whose one target claims 24576 x 24576 (2.4 GB as float32)."""
    data, _ = parts(pisa_adapter())
    shape, block, k = [24576, 24576], [4096, 4096], 3
    g = torch.Generator().manual_seed(0)
    indices = torch.tensor([[0, 4096 * 2049 // 2 + b, 4096 * 2049 - 1 - b] for b in range(36)])  # k = 3 per block
    tensors = {f"{DOWN}.indices": indices.to(torch.int32), f"{DOWN}.coefficients": torch.randn(36, k, 2, generator=g)}
    data["targets"] = {DOWN: {**data["targets"][DOWN], "shape": shape, "block": block, "grid": [6, 6], "coefficients": k}}
    data["base"]["fingerprints"] = {DOWN: {**data["base"]["fingerprints"][DOWN], "shape": shape}}
    return forge(path, data, tensors, compress=True)


def test_tiny_adapter_declaring_a_huge_target_costs_its_size(tmp_path):
    """Statistics come from the payload; densifying needs a base that vouches for the shape, or a cap."""
    import resource

    from s2reg.interop import export_lora
    from s2reg.ops.diff import diff_adapters

    path = _tiny_adapter_declaring_a_huge_target(tmp_path / "a")
    assert sum(f.stat().st_size for f in path.iterdir()) < 8_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    adapter = s2reg.load(path)
    norm = json.loads(result.stdout)["targets"][0]["delta_norm"]
    with pytest.raises(LimitExceeded, match="a dense delta of 603,979,776 elements, over the limit of 268,435,456"):
        adapter.to_dense(DOWN)
    assert diff_adapters(adapter, adapter).identical is True  # inner products of coefficients only
    with pytest.raises(LimitExceeded, match="--max-dense or S2REG_MAX_DENSE"):
        export_lora(adapter, tmp_path / "lora", rank=2)
    with pytest.raises(s2reg.errors.BaseMismatch, match="declares \\[24576, 24576\\]"):
        adapter.to_dense(DOWN, base={DOWN: torch.zeros(4, 4)})
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 256, f"peak RSS grew by {grown_mib:.0f} MiB"
    # The norm is that of the coefficients' blocks (checked against a dense reference in test_numerics).
    assert norm > 0


def test_declared_group_size_costs_nothing(tmp_path):
    """A group_size as long as a declared 2**40-row axis is refused from the index count alone."""
    data, tensors = parts(s2ft_adapter())
    for where in (data["targets"][Q], data["base"]["fingerprints"][Q]):
        where["shape"] = [2**40, 16]
    data["targets"][Q]["group_size"] = 2**40
    refused(forge(tmp_path / "a", data, tensors), FormatError, "not whole groups of 1099511627776")


def test_dense_cap_flag_applies_to_every_command(tmp_path):
    pisa_adapter().save(tmp_path / "p")
    export = ["export", str(tmp_path / "p"), "-o"]
    low = CliRunner().invoke(main, ["--max-dense", "10", *export, str(tmp_path / "out1")])
    assert low.exit_code == 1 and "a dense delta of 640 elements, over the limit of 10 (raise it with --max-dense" in low.output
    assert CliRunner().invoke(main, ["--max-dense", "640", *export, str(tmp_path / "out2")]).exit_code == 0
