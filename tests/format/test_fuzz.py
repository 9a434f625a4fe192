"""Seeded fuzzing of adapter directories: every mutant loads fully covered by its digests, or is refused.

Mutants of S2FT and PISA adapters, raw and zstd, are made by editing manifest values and text,
payload header fields, payload and compressed bytes, lengths and zstd frames; most re-forge the
digests so that the mutation reaches the checks behind them. Each one must either load (and
then every payload byte is covered by the recorded digests, and its statistics compute) or raise
an :class:`~s2reg.errors.S2RegError`; any other exception, a mutant slower than
``PER_MUTANT_SECONDS`` or a peak RSS growth over ``RSS_GROWTH_MIB`` fails the test.

``S2REG_FUZZ_SECONDS`` (default 60) sets the time budget and ``S2REG_FUZZ_SEED`` the seed; mutant
``i`` of a seed is the same on every machine, so a failure names what to replay.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import struct
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

import s2reg
from s2reg.errors import S2RegError
from s2reg.format import codec, manifest, payload

from .helpers import expert_adapter, pisa_adapter, s2ft_adapter

BUDGET_SECONDS = float(os.environ.get("S2REG_FUZZ_SECONDS", "60"))
SEED = int(os.environ.get("S2REG_FUZZ_SEED", "20261123"))
PER_MUTANT_SECONDS = 5.0
RSS_GROWTH_MIB = 512

BIG = "@@BIG@@"  # replaced in the text by literals json.dumps cannot write
DEEP = "@@DEEP@@"
LITERALS = {BIG: b"9" * 5001, DEEP: b"[" * 1000 + b"]" * 1000}
HOSTILE_VALUES: list[object] = [
    0, -1, 1, 3, 7, 2**31, 2**32 + 1, 2**40, 2**63 - 1, 2**63, 2**64, 9 * 10**19, 10**400, True, False, None,
    "x", "", "F32", "I32", "BF16", "rows", "columns", "expert_rows", "expert_columns", "zstd-byteplane", "raw", [], {}, [0], [0, 0], [1, 2, 3],
    [2**62, 2**62], [24576, 24576], [False, 8], 1.5, -0.0, 1e308, float("nan"), BIG, DEEP, {"k": "v"}, [[[]]],
]


@dataclass(frozen=True)
class Seed:
    name: str
    manifest: dict
    raw: bytes
    encoding: str


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dump_json(obj, **kwargs) -> bytes:
    text = json.dumps(obj, **kwargs).encode()
    for sentinel, literal in LITERALS.items():
        text = text.replace(json.dumps(sentinel).encode(), literal)
    return text


def make_seeds(tmp: Path) -> list[Seed]:
    seeds = []
    for name, adapter in (("s2ft", s2ft_adapter()), ("pisa", pisa_adapter()), ("experts", expert_adapter())):
        for compress in (False, True):
            stored = adapter.save(tmp / f"{name}-{compress}", compress=compress)
            data = json.loads((stored.path / manifest.MANIFEST_NAME).read_bytes())
            seeds.append(Seed(f"{name}/{'zstd' if compress else 'raw'}", data, adapter.payload_bytes(), stored.encoding))
    return seeds


def compress(raw: bytes) -> bytes:
    """The zstd-byteplane encoding of ``raw``; a header the encoder refuses is compressed untransposed
    (the header region is never transposed, so the reader meets the same hostile header)."""
    try:
        return codec.encode(raw)
    except Exception:  # noqa: BLE001 - the writer is not under test here, only what the reader meets
        return zstandard.ZstdCompressor(write_content_size=True).compress(raw)


def files_for(seed: Seed, data: dict, raw: bytes, *, blob: bytes | None = None, fix: bool = True) -> dict[str, bytes]:
    """Adapter files from a manifest object and a raw payload, with digests re-forged when ``fix``."""
    data = json.loads(json.dumps(data))
    if blob is None:
        blob = compress(raw) if seed.encoding == codec.ZSTD_BYTEPLANE else raw
    if fix and isinstance(data.get("payload"), dict):
        data["payload"].update(bytes=len(blob), sha256=sha(blob), raw_bytes=len(raw), raw_sha256=sha(raw))
    name = manifest.PAYLOAD_FILES[seed.encoding]
    return {manifest.MANIFEST_NAME: dump_json(data, indent=2, sort_keys=True), name: blob}


def split_payload(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_payload(header: dict, body: bytes) -> bytes:
    text = dump_json(header, separators=(",", ":"))
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def paths_in(obj, prefix=()):
    """Every (path, value) inside a JSON object tree."""
    yield prefix, obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from paths_in(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from paths_in(value, (*prefix, i))


def replace_at(obj, path, value):
    holder = obj
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value


# -- mutators: (rng, seed) -> (description, files) ------------------------------------------------------
def manifest_value(rng, seed):
    data = json.loads(json.dumps(seed.manifest))
    path = rng.choice([where for where, _ in paths_in(data) if where])
    value = rng.choice(HOSTILE_VALUES)
    replace_at(data, path, value)
    # Re-forging the payload entry would undo a mutation inside it; elsewhere it keeps the digests valid.
    return f"manifest {list(path)} = {str(value)[:30]}", files_for(seed, data, seed.raw, fix=path[0] != "payload")


def manifest_key(rng, seed):
    data = json.loads(json.dumps(seed.manifest))
    objects = [p for p, v in paths_in(data) if isinstance(v, dict) and v]
    path = rng.choice(objects)
    holder = data
    for key in path:
        holder = holder[key]
    key = rng.choice(sorted(holder))
    if rng.random() < 0.5:
        del holder[key]
        what = "deleted"
    else:
        holder["zz_" + key] = holder[key]
        what = "duplicated"
    return f"manifest key {list(path) + [key]} {what}", files_for(seed, data, seed.raw, fix=path[:1] != ("payload",))


def manifest_text(rng, seed):
    files = files_for(seed, seed.manifest, seed.raw)
    text = bytearray(files[manifest.MANIFEST_NAME])
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(text))
        op = rng.randrange(3)
        if op == 0:
            text[at] = rng.choice(b'{}[]",:0123456789-eE.tfn \\\xff')
        elif op == 1:
            del text[at]
        else:
            text[at:at] = rng.choice([b"[", b"{", b"9" * 30, b"NaN", b"\\u0000", b'"', b"-"])
    files[manifest.MANIFEST_NAME] = bytes(text)
    return "manifest text edits", files


def header_field(rng, seed):
    header, body = split_payload(seed.raw)
    name = rng.choice(sorted(header))
    if name == "__metadata__" or rng.random() < 0.1:
        header["__metadata__"] = rng.choice(HOSTILE_VALUES)
        what = "__metadata__"
    else:
        field = rng.choice(["dtype", "shape", "data_offsets", "data_offsets", "extra"])
        entry = header[name]
        if field == "extra":
            entry["crc"] = 1
        elif field == "data_offsets" and rng.random() < 0.6:
            b, e = entry["data_offsets"]
            shift = rng.choice([-8, -4, -1, 1, 4, 8, 2**32, -(2**40)])
            entry["data_offsets"] = rng.choice([[b + shift, e + shift], [b, e + shift], [b + shift, e], [e, b]])
        else:
            entry[field] = rng.choice(HOSTILE_VALUES)
        what = f"{name}.{field}"
    return f"payload header {what}", files_for(seed, seed.manifest, join_payload(header, body))


def payload_bytes(rng, seed):
    raw = bytearray(seed.raw)
    (n,) = struct.unpack("<Q", raw[:8])
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(8 + n, len(raw)) if rng.random() < 0.8 else rng.randrange(len(raw))
        raw[at] = rng.randrange(256)
    fix = rng.random() < 0.8
    return f"payload bytes ({'digests re-forged' if fix else 'stale digests'})", files_for(seed, seed.manifest, bytes(raw), fix=fix)


def lengths(rng, seed):
    raw = seed.raw
    choice = rng.randrange(4)
    if choice == 0:
        cut = rng.randrange(len(raw))
        return f"payload cut to {cut}", files_for(seed, seed.manifest, raw[:cut])
    if choice == 1:
        return "payload extended", files_for(seed, seed.manifest, raw + bytes(rng.choice([1, 8, 4096])))
    if choice == 2:
        n = rng.choice([0, 1, 7, 2**24 + 1, 2**40, 2**63, 2**64 - 1, len(raw), len(raw) - 9])
        return f"header length {n}", files_for(seed, seed.manifest, struct.pack("<Q", n) + raw[8:])
    data = json.loads(json.dumps(seed.manifest))
    files = files_for(seed, data, raw)
    written = json.loads(files[manifest.MANIFEST_NAME])
    key = rng.choice(["bytes", "raw_bytes"])
    written["payload"][key] = rng.choice([0, 1, written["payload"][key] + 1, written["payload"][key] - 1, 2**40,
                                          2**63 - 1, 2**63])
    files[manifest.MANIFEST_NAME] = dump_json(written, indent=2, sort_keys=True)
    return f"payload.{key} = {written['payload'][key]}", files


def blob_bytes(rng, seed):
    blob = bytearray(compress(seed.raw) if seed.encoding == codec.ZSTD_BYTEPLANE else seed.raw)
    for _ in range(rng.randint(1, 6)):
        blob[rng.randrange(len(blob))] = rng.randrange(256)
    data = json.loads(json.dumps(seed.manifest))
    data["payload"].update(bytes=len(blob), sha256=sha(bytes(blob)))
    if seed.encoding == codec.RAW:
        data["payload"].update(raw_bytes=len(blob), raw_sha256=sha(bytes(blob)))
    return "stored bytes (outer digest re-forged)", files_for(seed, data, seed.raw, blob=bytes(blob), fix=False)


def frames(rng, seed):
    frame = codec.encode(seed.raw)
    skippable = struct.pack("<II", 0x184D2A50 + rng.randrange(16), 4) + b"abcd"
    blob = rng.choice([
        skippable + frame, frame + skippable, frame + zstandard.ZstdCompressor().compress(b"more"),
        zstandard.ZstdCompressor(write_content_size=False).compress(codec._transpose_planes(seed.raw, forward=True)),
        frame[:-1], frame + b"\0",
    ])
    zstd_seed = Seed(seed.name, seed.manifest, seed.raw, codec.ZSTD_BYTEPLANE)
    data = json.loads(json.dumps(seed.manifest))
    data["payload"].update(file="payload.safetensors.zst", encoding="zstd-byteplane", zstd_level=codec.DEFAULT_LEVEL,
                           bytes=len(blob), sha256=sha(blob), raw_bytes=len(seed.raw), raw_sha256=sha(seed.raw))
    return "zstd frames", files_for(zstd_seed, data, seed.raw, blob=blob, fix=False)


def both_payloads(rng, seed):
    files = files_for(seed, seed.manifest, seed.raw)
    other = manifest.PAYLOAD_FILES[codec.RAW if seed.encoding == codec.ZSTD_BYTEPLANE else codec.ZSTD_BYTEPLANE]
    files[other] = seed.raw
    return "both payload files", files


def declared_shape(rng, seed):
    """Consistent lies: a target and its fingerprint claim a huge axis (and maybe a huge group)."""
    data = json.loads(json.dumps(seed.manifest))
    name = rng.choice(sorted(data["targets"]))
    target = data["targets"][name]
    axis = rng.randrange(len(target["shape"]))
    size = rng.choice([2**20, 24576 * 4096, 2**40, 2**62]) * target["shape"][axis]
    for where in (target, data["base"]["fingerprints"][name]):
        where["shape"][axis] = size
    if "grid" in target:
        target["grid"] = [-(-d // b) for d, b in zip(target["shape"], target["block"], strict=True)]
    if "group_size" in target and rng.random() < 0.5:
        target["group_size"] = size
    return f"declared {name} axis {axis} = {size}", files_for(seed, data, seed.raw)


def target_axis(rng, seed):
    """A target re-addressed: another axis (stacked expert axes on any rank), maybe with a rank-3 shape claimed."""
    data = json.loads(json.dumps(seed.manifest))
    name = rng.choice(sorted(data["targets"]))
    target = data["targets"][name]
    target["axis"] = rng.choice(["rows", "columns", "expert_rows", "expert_columns"])
    if rng.random() < 0.5:
        shape = rng.choice([[1, *target["shape"]], [2**40, 1, 1], [3, 2**31, 2**31], target["shape"][::-1]])
        for where in (target, data["base"]["fingerprints"][name]):
            where["shape"] = list(shape)
    if rng.random() < 0.3:
        data["format_version"] = rng.choice([1, 2, 3])
    return f"{name} axis {target['axis']} shape {target['shape']}", files_for(seed, data, seed.raw)


MUTATORS = [declared_shape, target_axis, manifest_value, manifest_value, manifest_key, manifest_text, header_field, header_field, payload_bytes,
            payload_bytes, lengths, blob_bytes, frames, both_payloads]


def check_covered(path: Path, adapter) -> None:
    """A loaded mutant: the payload on disk is what the digests say, and every raw byte is a tensor's."""
    entry = json.loads((path / manifest.MANIFEST_NAME).read_bytes())["payload"]
    blob = (path / entry["file"]).read_bytes()
    assert (len(blob), sha(blob)) == (entry["bytes"], entry["sha256"])
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(blob) if entry["encoding"] == codec.ZSTD_BYTEPLANE else blob
    raw = codec._transpose_planes(raw, forward=False) if entry["encoding"] == codec.ZSTD_BYTEPLANE else raw
    assert (len(raw), sha(raw)) == (entry["raw_bytes"], entry["raw_sha256"])
    tensors, _ = payload.load(raw)
    (n,) = struct.unpack("<Q", raw[:8])
    assert 8 + n + sum(t.nbytes for t in tensors.values()) == len(raw)
    loaded = {}
    for name, target in adapter.targets.items():
        loaded.update(target.payload_tensors(name))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].tobytes() == tensor.tobytes(), name


@pytest.mark.slow
def test_fuzzed_adapters_load_covered_or_are_refused(tmp_path):
    seeds = make_seeds(tmp_path / "seeds")
    rng = random.Random(SEED)
    work = tmp_path / "mutant"
    outcomes, failures = Counter(), []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < BUDGET_SECONDS:
        seed = rng.choice(seeds)
        mutator = rng.choice(MUTATORS)
        description, files = mutator(rng, seed)
        work.mkdir(exist_ok=True)
        for old in work.iterdir():
            old.unlink()
        for name, data in files.items():
            (work / name).write_bytes(data)
        label = f"mutant {i} (seed {SEED}) of {seed.name}: {description}"
        t0 = time.perf_counter()
        adapter = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                adapter = s2reg.load(work)
                adapter.stats()
            outcomes["loaded"] += 1
        except S2RegError as exc:
            outcomes["refused"] += 1
            if "\n" in str(exc):
                failures.append(f"{label}: multi-line message {str(exc)[:200]!r}")
        except Exception as exc:  # noqa: BLE001 - the point of the test: anything else is a bug
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
        elapsed = time.perf_counter() - t0
        if elapsed > PER_MUTANT_SECONDS:
            failures.append(f"{label}: took {elapsed:.1f} s")
        if adapter is not None:
            try:
                check_covered(work, adapter)
            except Exception as exc:  # noqa: BLE001 - reported with the mutant that caused it
                failures.append(f"{label}: loaded but not covered by its digests: {type(exc).__name__} {exc}"[:300])
        i += 1
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"\nfuzz: {i} mutants tried, {outcomes['refused']} refused, {outcomes['loaded']} loaded, "
          f"{len(failures)} failures, peak RSS growth {grown_mib:.0f} MiB")
    assert not failures, "\n".join(failures[:20])
    assert grown_mib < RSS_GROWTH_MIB
    assert outcomes["refused"] and outcomes["loaded"]  # both outcomes are reached, so the mutants bite
