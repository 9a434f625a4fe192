"""Every MUST and MUST NOT of spec/*.md has a test, and every test here names a sentence that still exists.

The spec's sentences holding the word MUST are found by :func:`must_sentences` (per file, per §);
:data:`MUSTS` maps each one, by its § and a phrase of it that should survive rewording, to checks:
a function of this module (``must_*``, run here) or the node id of a test elsewhere (checked here to
exist and to assert something; it runs where it lives). ``test_every_must_has_a_check`` fails when a
new MUST has no entry, ``test_every_entry_names_a_must`` when an entry's sentence has gone, and
``test_must`` runs each entry's checks, one test per sentence named by its §.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import zstandard

import s2reg
from s2reg.errors import FormatError, IntegrityError, S2RegError
from s2reg.format import codec, manifest, payload, safetensors_header
from s2reg.format.adapter import payload_metadata

from .format.helpers import forge, parts, s2ft_adapter

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec"


# -- the spec's MUST sentences -------------------------------------------------------------------
def _paragraphs(text: str) -> list[tuple[str, str]]:
    """``(§, paragraph)`` of a spec file: a list item, a numbered item and a table row are paragraphs of
    their own; the § is the number of the heading above (``"0"`` before the first numbered one)."""
    section, out, lines = "0", [], []

    def flush():
        if lines:
            out.append((section, " ".join(lines)))
            lines.clear()

    for line in text.splitlines():
        heading = re.match(r"#+ (\d+(?:\.\d+)*)\.? ", line)
        if heading or line.startswith("#"):
            flush()
            section = heading.group(1) if heading else section
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith(("- ", "|")) or re.match(r"\d+\. ", stripped):
            flush()
        if stripped:
            lines.append(stripped)
    flush()
    return out


def must_sentences() -> list[tuple[str, str, str]]:
    """``(spec, §, sentence)`` for every sentence of spec/*.md holding MUST (MUST NOT included)."""
    found = []
    for file in sorted(SPEC.glob("*.md")):
        for section, paragraph in _paragraphs(file.read_text()):
            for sentence in re.split(r"(?<=\.)\s+(?=[A-Z`*(])", paragraph):
                if re.search(r"\bMUST\b", sentence):
                    found.append((file.stem, section, sentence))
    return found


# The RFC 2119 boilerplate names the key words; it states no rule.
NOT_RULES = {("FORMAT", "0", "The key words MUST, MUST NOT, SHOULD and MAY are used as in RFC 2119")}


# -- checks that live here -----------------------------------------------------------------------
def _refused(path: Path, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        s2reg.load(path)
    assert "\n" not in str(info.value)


def must_ignore_other_files(tmp: Path) -> None:
    """FORMAT §1: other files in the directory are ignored and not part of the identity."""
    stored = s2ft_adapter().save(tmp / "a")
    (tmp / "a" / "README.md").write_text("# a model card\n")
    (tmp / "a" / "notes.bin").write_bytes(b"\0\1\2")
    loaded = s2reg.load(tmp / "a")
    assert loaded.stored.digest == stored.digest
    assert loaded.save(tmp / "b").digest == stored.digest


def must_refuse_repeated_keys(tmp: Path) -> None:
    """FORMAT §3: a key named twice in one object is refused, in the manifest and in a safetensors header."""
    s2ft_adapter().save(tmp / "a", compress=False)
    text = (tmp / "a" / manifest.MANIFEST_NAME).read_text()
    assert '"kind": "s2ft"' in text
    (tmp / "a" / manifest.MANIFEST_NAME).write_text(text.replace('"kind": "s2ft"', '"kind": "pisa",\n  "kind": "s2ft"', 1))
    _refused(tmp / "a", FormatError, "manifest.* is refused: an object names the key 'kind' twice")
    entry = '"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    for header in (f"{{{entry},{entry}}}", f'{{"__metadata__":{{"a":"1","a":"2"}},{entry}}}'):
        data = header.encode() + b" " * (-len(header) % 8)
        with pytest.raises(FormatError, match="safetensors header is refused: an object names the key '(t|a)' twice"):
            safetensors_header.read_buffer(struct.pack("<Q", len(data)) + data + b"\0")
    data = f'{{"__metadata__":{{"a":"1"}},{entry}}}'.encode()  # the same header, each key once, is fine
    assert safetensors_header.read_buffer(struct.pack("<Q", len(data)) + data + b"\0").metadata == {"a": "1"}
    data, tensors = parts(s2ft_adapter())  # through a payload: a second __metadata__ that would win
    raw = payload.dump(tensors, payload_metadata(1, "s2ft"))
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].rstrip(b" ").replace(b"{", b'{"__metadata__":{"s2reg.kind":"pisa"},', 1)
    header += b" " * (-len(header) % 8)
    _refused(forge(tmp / "p", data, struct.pack("<Q", len(header)) + header + raw[8 + n:]), FormatError,
             "names the key '__metadata__' twice")


def must_pair_zstd_level_with_its_encoding(tmp: Path) -> None:
    """FORMAT §3.4: zstd_level present iff encoding is zstd-byteplane, in the reader and in the JSON Schema."""
    schema = json.loads((SPEC / "manifest.schema.json").read_text())
    s2ft_adapter().save(tmp / "z")
    s2ft_adapter().save(tmp / "r", compress=False)
    zstd, raw = (json.loads((tmp / d / manifest.MANIFEST_NAME).read_text()) for d in ("z", "r"))
    for good in (zstd, raw):
        jsonschema.validate(good, schema)
    del zstd["payload"]["zstd_level"]
    raw["payload"]["zstd_level"] = 3
    for bad, match in ((zstd, "missing required key 'zstd_level'"), (raw, "'zstd_level' is present only when")):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(FormatError, match=match):
            manifest.parse(manifest.dump(bad))


def must_refuse_a_version_above_the_lowest(tmp: Path) -> None:
    """FORMAT §3.6: a version-1 adapter labelled 2 (or 3) is refused; labelled 1 it loads."""
    data, tensors = parts(s2ft_adapter())
    assert data["format_version"] == 1
    s2reg.load(forge(tmp / "v1", data, tensors))
    for version in (2, 3):
        data["format_version"] = version
        _refused(forge(tmp / f"v{version}", data, tensors), FormatError,
                 f"need format_version 1 .*the manifest says {version}")


def must_refuse_metadata_unlike_the_manifest(tmp: Path) -> None:
    """FORMAT §6.1 rule 7: the payload's __metadata__ says the manifest's version and kind, nothing else."""
    data, tensors = parts(s2ft_adapter())
    s2reg.load(forge(tmp / "ok", data, payload.dump(tensors, payload_metadata(1, "s2ft"))))
    for i, meta in enumerate([payload_metadata(1, "pisa"), payload_metadata(2, "s2ft"), {},
                              {**payload_metadata(1, "s2ft"), "extra": "x"}]):
        _refused(forge(tmp / str(i), data, payload.dump(tensors, meta)), FormatError,
                 "__metadata__ .* does not say the manifest's format_version 1 and kind 's2ft'")


def must_carry_a_content_checksum(tmp: Path) -> None:
    """FORMAT §6.2: a frame without a content checksum is refused; s2reg writes one."""
    data, tensors = parts(s2ft_adapter())
    raw = payload.dump(tensors, payload_metadata(1, "s2ft"))
    assert zstandard.get_frame_parameters(codec.encode(raw)).has_checksum
    planes = codec._transpose_planes(raw, forward=True)
    s2reg.load(forge(tmp / "ok", data, raw, blob=codec.encode(raw)))
    bare = zstandard.ZstdCompressor(write_checksum=False, write_content_size=True).compress(planes)
    _refused(forge(tmp / "a", data, raw, blob=bare), FormatError, "has no content checksum")


def must_check_raw_sha256(tmp: Path) -> None:
    """FORMAT §6.2: after decoding, the decoded bytes must hash to raw_sha256."""
    data, tensors = parts(s2ft_adapter())
    raw = payload.dump(tensors, payload_metadata(1, "s2ft"))
    _refused(forge(tmp / "a", data, raw, blob=codec.encode(raw), raw_sha256="0" * 64), IntegrityError,
             "decoded payload sha256 mismatch")


def must_refuse_unknown_fuse_choices(tmp: Path) -> None:
    """FUSE: fuse() itself refuses another sign rule, an unknown method and a density outside (0, 1]."""
    from s2reg.ops.fuse import fuse

    pair = [s2ft_adapter(seed=1), s2ft_adapter(seed=2)]
    for kwargs, match in (({"method": "ties", "majority_sign": "votes"}, r"unknown sign rule 'votes' \(choose from total, frequency"),
                          ({"method": "ties", "majority_sign": "Total"}, "unknown sign rule 'Total'"),
                          ({"method": "average"}, "unknown fuse method 'average' \\(choose from linear"),
                          ({"density": 0.0}, r"density must be in \(0, 1\]"),
                          ({"density": 1.5}, r"density must be in \(0, 1\]")):
        with pytest.raises(S2RegError, match=match) as info:
            fuse(pair, **kwargs)
        assert "\n" not in str(info.value)


# -- the table ------------------------------------------------------------------------------------
Check = Callable[[Path], None] | str


@dataclass(frozen=True)
class Must:
    spec: str
    section: str
    phrase: str  # a piece of the sentence, kept when it is reworded
    checks: tuple[Check, ...]

    @property
    def id(self) -> str:  # "FORMAT-3.6 ..." (a test id in ASCII: pytest escapes the section sign)
        return f"{self.spec}-{self.section} {self.phrase}"


HOSTILE, ROUNDTRIP, NUMERICS = "tests/format/test_hostile.py", "tests/format/test_roundtrip.py", "tests/format/test_numerics.py"

MUSTS = [
    Must("FORMAT", "1", "readers MUST ignore them", (must_ignore_other_files,)),
    Must("FORMAT", "1", "is ambiguous and MUST be refused", (f"{HOSTILE}::test_both_payload_files_are_refused",)),
    Must("FORMAT", "3", "Writers MUST serialise it canonically", (f"{ROUNDTRIP}::test_manifest_is_canonical_json",)),
    Must("FORMAT", "3", "Readers MUST refuse a manifest larger than 64 MiB", (
        f"{HOSTILE}::test_oversized_manifest", f"{HOSTILE}::test_hostile_manifest_json_is_refused",
        "tests/format/test_safetensors_header.py::test_every_reader_refuses_hostile_headers")),
    Must("FORMAT", "3", "MUST be below 2^63", (f"{HOSTILE}::test_manifest_dimension_of_2_to_the_63_is_refused",)),
    Must("FORMAT", "3", "MUST refuse a JSON object that names one key twice", (must_refuse_repeated_keys,)),
    Must("FORMAT", "3.1", "a writer MUST write the lowest version that holds the adapter", (
        f"{ROUNDTRIP}::test_restore_lists_are_version_2_and_everything_else_stays_version_1",
        f"{ROUNDTRIP}::test_expert_axes_address_one_expert_s_rows_and_columns_and_merge_exactly")),
    Must("FORMAT", "3.2", "MUST compare the fingerprint of each target", (
        "tests/surgery/test_merge.py::test_wrong_base_is_refused_unless_unverified_but_shapes_never",
        "tests/cli/test_inspect_validate_demo.py::test_validate_against_the_right_and_the_wrong_base")),
    Must("FORMAT", "3.3", "MUST be a float dtype", (f"{HOSTILE}::test_manifest_wrong_type",)),
    Must("FORMAT", "3.4", "has `zstd_level` with the `raw` encoding", (must_pair_zstd_level_with_its_encoding,)),
    Must("FORMAT", "3.6", "MUST refuse a `format_version` greater than the one it implements", (
        f"{ROUNDTRIP}::test_newer_format_version_is_refused",)),
    Must("FORMAT", "3.6", "MUST refuse a version-1 manifest whose targets have `restore`", (
        f"{ROUNDTRIP}::test_an_old_reader_refuses_restore_lists_and_never_merges_without_them",)),
    Must("FORMAT", "3.6", "MUST refuse a version-1 or version-2 manifest whose targets use an expert axis", (
        f"{ROUNDTRIP}::test_an_old_reader_refuses_expert_axes",)),
    Must("FORMAT", "3.6", "is not the lowest that holds its targets", (must_refuse_a_version_above_the_lowest,)),
    Must("FORMAT", "3.6", "lacks a required key or has a key of the wrong type", (
        f"{HOSTILE}::test_manifest_missing_fields", f"{HOSTILE}::test_manifest_wrong_type",
        f"{HOSTILE}::test_missing_target_field")),
    Must("FORMAT", "3.6", "MUST preserve, unknown keys", (f"{ROUNDTRIP}::test_unknown_keys_are_kept_with_a_warning",)),
    Must("FORMAT", "3.7", "MUST give the same bytes", (
        f"{ROUNDTRIP}::test_digest_stable_across_processes", f"{ROUNDTRIP}::test_source_date_epoch_sets_created")),
    Must("FORMAT", "4.2", "Deltas MUST be finite", (
        f"{HOSTILE}::test_nonfinite_delta_refused_unless_allowed", f"{HOSTILE}::test_nonfinite_rejected_at_construction")),
    Must("FORMAT", "4.3", "The only change a writer MUST refuse", (
        f"{NUMERICS}::test_nonfinite_tuned_values_are_refused_unless_unchanged",)),
    Must("FORMAT", "4.3", "MUST check the restore list", (
        f"{HOSTILE}::test_s2ft_bad_restore_list", f"{NUMERICS}::test_signed_zero_flips_are_listed_with_their_bits")),
    Must("FORMAT", "4.3", "MUST be *snapped* against the base", (
        f"{NUMERICS}::test_from_slices_snaps_deltas_so_unmerge_is_exact",)),
    Must("FORMAT", "4.3", "MUST check whether unmerging would give the current values back", (
        "tests/surgery/test_merge.py::test_overlapping_adapters_that_cannot_unmerge_exactly_are_refused",
        "tests/surgery/test_live.py::test_overlapping_stack_that_cannot_be_removed_exactly_is_refused")),
    Must("FORMAT", "5.3", "implementations MUST produce that result", (
        f"{NUMERICS}::test_pisa_to_dense_matches_float64_reference",
        f"{NUMERICS}::test_pisa_matches_numpy_irfft2_on_hermitian_input")),
    Must("FORMAT", "5.3", "MUST compute reconstruction in at least `float32` precision", (
        f"{NUMERICS}::test_pisa_stores_lower_precision_coefficients",)),
    Must("FORMAT", "6.1", "Readers MUST check, in this order", (
        "tests/format/test_safetensors_header.py::test_every_reader_refuses_hostile_headers",
        f"{HOSTILE}::test_off_spec_payload_headers_are_refused", f"{HOSTILE}::test_payload_with_unexpected_tensor",
        must_refuse_metadata_unlike_the_manifest)),
    Must("FORMAT", "6.2", "The frame header MUST declare the content size", (
        f"{HOSTILE}::test_only_one_zstd_frame_is_accepted", must_carry_a_content_checksum)),
    Must("FORMAT", "6.2", "MUST NOT decompress more than `raw_bytes` bytes", (
        f"{HOSTILE}::test_decompression_bomb_is_refused", f"{HOSTILE}::test_compressed_payload_shorter_than_declared")),
    Must("FORMAT", "6.2", "Before allocating anything for the output", (
        f"{HOSTILE}::test_huge_declared_sizes_are_refused_before_allocating",
        f"{HOSTILE}::test_declared_size_over_zstds_own_ratio_is_refused",
        f"{HOSTILE}::test_decompression_cap_is_raised_by_env_and_flag")),
    Must("FORMAT", "6.2", "the reader MUST check `raw_sha256`", (must_check_raw_sha256,)),
    Must("FORMAT", "9", "A reader MUST reproduce the dense deltas", (
        "tests/format/test_vectors.py::test_golden_adapter_reads_to_its_dense_deltas_and_writes_the_same_bytes",)),
    Must("FUSE", "0", "MUST refuse any other sign rule", (must_refuse_unknown_fuse_choices, "tests/fuse")),
]


def _normal(text: str) -> str:
    return " ".join(text.split())


def _entries_for(spec: str, section: str, sentence: str) -> list[Must]:
    return [m for m in MUSTS if (m.spec, m.section) == (spec, section) and _normal(m.phrase) in _normal(sentence)]


def test_every_must_has_a_check():
    """A MUST sentence added to spec/ without an entry in MUSTS fails here (name its test, or write one)."""
    sentences = must_sentences()
    assert len(sentences) > 25
    unmapped = [f"{spec} §{section}: {sentence[:120]}" for spec, section, sentence in sentences
                if not _entries_for(spec, section, sentence)
                and not any((spec, section) == r[:2] and r[2] in sentence for r in NOT_RULES)]
    assert not unmapped, "MUST sentences with no test:\n" + "\n".join(unmapped)


def test_every_entry_names_a_must():
    """An entry whose sentence was removed or reworded past its phrase fails here (update the table)."""
    sentences = must_sentences()
    for must in MUSTS:
        hits = [s for spec, section, s in sentences
                if (spec, section) == (must.spec, must.section) and _normal(must.phrase) in _normal(s)]
        assert len(hits) == 1, f"{must.id}: names {len(hits)} MUST sentences of spec/{must.spec}.md §{must.section}"


def _named_test(node: str) -> None:
    """A test elsewhere, by node id: it must exist and assert something (it runs in its own module)."""
    file, _, name = node.partition("::")
    path = ROOT / file
    assert path.exists(), f"{node}: no such test file or folder"
    if not name:  # a folder of tests: at least one test module that asserts
        assert any("assert" in p.read_text() for p in path.glob("test_*.py")), node
        return
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    function = getattr(module, name.split("[")[0], None)
    assert callable(function), f"{node}: no such test"
    source = inspect.getsource(function)
    assert re.search(r"assert|pytest\.raises|refused\(", source), f"{node}: asserts nothing"


@pytest.mark.parametrize("must", MUSTS, ids=lambda m: m.id)
def test_must(must, tmp_path):
    for i, check in enumerate(must.checks):
        if isinstance(check, str):
            _named_test(check)
        else:
            check(tmp_path / str(i))
