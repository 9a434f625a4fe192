"""Surgery on the real SmolLM2-135M: merge equals in-memory apply; unmerge restores every byte."""

from __future__ import annotations

import pytest
import torch

from s2reg.ops.live import apply
from s2reg.surgery import merge, merge_in_place, unmerge, unmerge_in_place

from .helpers import file_digests, logits, model_of, s2ft, tensor_digests


@pytest.mark.smollm2
def test_merge_unmerge_on_smollm2(smollm2_dir, tmp_path):
    adapter = s2ft(smollm2_dir, heads=(0, 4), channels=range(100, 132), scale=0.02)
    merge(smollm2_dir, [adapter], tmp_path / "merged")
    reference = model_of(smollm2_dir)
    apply(reference, adapter)
    assert torch.equal(logits(model_of(tmp_path / "merged")), logits(reference))
    unmerge(tmp_path / "merged", [adapter], tmp_path / "back")
    assert tensor_digests(tmp_path / "back") == tensor_digests(smollm2_dir)

    unmerge_in_place(tmp_path / "merged", [adapter])
    assert file_digests(tmp_path / "merged") == file_digests(tmp_path / "back")
    merge_in_place(tmp_path / "back", [adapter])
    assert tensor_digests(tmp_path / "back") != tensor_digests(smollm2_dir)
