"""Golden adapters (spec/vectors): today's s2reg reads them and writes them back byte for byte.

The committed files and their expected dense deltas (computed by numpy alone in
``spec/vectors/generate.py``) pin the format: a change in the bytes s2reg writes, or in how it
reads them, fails here instead of passing run-against-run comparisons.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import s2reg

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
EXPECTED = json.loads((VECTORS / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_adapter_reads_to_its_dense_deltas_and_writes_the_same_bytes(tmp_path, name):
    expected = EXPECTED[name]
    files = {f.name: f.read_bytes() for f in (VECTORS / name).iterdir()}
    assert {n: hashlib.sha256(b).hexdigest() for n, b in files.items()} == expected["files"]
    adapter = s2reg.load(VECTORS / name)
    assert set(adapter.targets) == set(expected["dense"])
    for target, dense in expected["dense"].items():
        got = adapter.to_dense(target).astype(np.float64)
        if adapter.kind == "s2ft":  # exact differences (FORMAT §4.3): equal, not close
            np.testing.assert_array_equal(got, np.array(dense))
        else:  # FORMAT §5.3: float32 reconstruction within 1e-6 relative
            np.testing.assert_allclose(got, np.array(dense), rtol=1e-6, atol=1e-7)
        assert adapter.stats()[list(adapter.targets).index(target)]["delta_norm"] == pytest.approx(
            float(np.linalg.norm(dense)), rel=1e-9)
    adapter.save(tmp_path / "again", compress=expected["compress"])
    assert {f.name: f.read_bytes() for f in (tmp_path / "again").iterdir()} == files
    assert adapter.stored.digest == expected["files"]["s2reg.json"]
