"""Reading ``pytorch_model.bin`` state dicts (official S2FT output) and extracting from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from s2reg.cli import main
from s2reg.errors import CheckpointError, NotFound
from s2reg.tensors import CheckpointSource, TorchBinSource, open_source
from tests.families import zoo

from . import official_s2ft

# The official code supports multi-head attention only (it reshapes q/k/v into num_key_value_heads groups).
LLAMA_MHA = zoo.decoder("llama_mha", "llama", num_key_value_heads=4, tie_word_embeddings=True)
SELECTION = {
    0: {"v": [1, 2], "o": [2, 0], "up": [5, 17, 40], "down": [17, 60]},  # not the last head/channel (-0.0 there)
    1: {"v": [2], "down": [7, 8, 90]},
}


def _marker_touch(path: str) -> None:  # what a hostile pickle would run on load
    Path(path).touch()


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _marker_touch, (self.marker,)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return zoo.save_model(LLAMA_MHA, zoo.build_model(LLAMA_MHA), tmp_path_factory.mktemp("bin") / "base")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def test_state_dict_with_tied_lm_head_reads_like_the_safetensors_checkpoint(base_dir, tmp_path):
    model = zoo.load(LLAMA_MHA, base_dir)
    state = model.state_dict()
    assert "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    official_s2ft.save_official(model, tmp_path / "bin")
    with TorchBinSource(tmp_path / "bin") as binary, CheckpointSource(base_dir) as safe:
        assert binary.dropped == {"lm_head.weight": "model.embed_tokens.weight"}
        assert binary.names() == safe.names()
        for name in safe.names():
            assert binary.shape(name) == safe.shape(name) and binary.dtype(name) == safe.dtype(name)
            assert _same_bytes(binary.get(name), safe.get(name)), name
            assert binary.sha256_of(name) == safe.sha256_of(name), name
        q = "model.layers.0.self_attn.q_proj.weight"
        assert _same_bytes(binary.get_rows(q, 16, 32), safe.get_rows(q, 16, 32))
        with pytest.raises(CheckpointError, match="out of range"):
            binary.get_rows(q, 60, 70)
        with pytest.raises(NotFound, match="no tensor named lm_head.weight"):
            binary.get("lm_head.weight")
        assert binary.config()["tie_word_embeddings"] is True


def test_sharded_bin_loses_storage_sharing_but_the_tie_is_still_found(base_dir, tmp_path):
    model = zoo.load(LLAMA_MHA, base_dir)
    official_s2ft.save_official(model, tmp_path / "bin", shards=3)
    index = json.loads((tmp_path / "bin" / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert index["lm_head.weight"] != index["model.embed_tokens.weight"]  # separate files: no shared storage
    with open_source(tmp_path / "bin") as binary, CheckpointSource(base_dir) as safe:
        assert isinstance(binary, TorchBinSource) and len(binary.files) == 3
        assert binary.dropped == {"lm_head.weight": "model.embed_tokens.weight"}
        assert binary.names() == safe.names()


def test_equal_tensors_that_are_not_tied_are_kept(tmp_path):
    embed = torch.randn(8, 4)
    state = {"embed.weight": embed, "norm_a.weight": torch.ones(4), "norm_b.weight": torch.ones(4),
             "head.weight": embed.clone()}
    (tmp_path / "untied").mkdir()
    torch.save(state, tmp_path / "untied" / "pytorch_model.bin")
    (tmp_path / "untied" / "config.json").write_text(json.dumps({"tie_word_embeddings": False, "vocab_size": 8}))
    with TorchBinSource(tmp_path / "untied") as source:
        assert source.dropped == {} and len(source.names()) == 4
    (tmp_path / "untied" / "config.json").write_text(json.dumps({"tie_word_embeddings": True, "vocab_size": 8}))
    with TorchBinSource(tmp_path / "untied") as source:  # equal norms are not word embeddings: kept
        assert source.dropped == {"head.weight": "embed.weight"}


def test_legacy_torch_save_format_is_read_too(tmp_path):
    state = {"w": torch.randn(3, 2), "b": torch.tensor([-0.0, 1.0])}
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with TorchBinSource(tmp_path) as source:
        assert source.names() == ["b", "w"]
        assert all(_same_bytes(source.get(n), state[n]) for n in state)


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "hostile").mkdir()
    torch.save({"w": torch.zeros(2), "payload": _Hostile(marker)}, tmp_path / "hostile" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused, it holds more than tensors .Unsupported global: GLOBAL "
                                              "tests.tensors.test_torch_bin._marker_touch.; s2reg never") as info:
        TorchBinSource(tmp_path / "hostile")
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    ([torch.zeros(2)], "not a state dict"),
    ({"a": torch.zeros(2), "b": 3}, "not a state dict"),
])
def test_non_state_dicts_are_refused(tmp_path, content, message):
    torch.save(content, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=message):
        TorchBinSource(tmp_path)


def test_broken_and_incomplete_bin_directories(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip or a pickle")
    with pytest.raises(CheckpointError, match="not a readable PyTorch state dict"):
        TorchBinSource(tmp_path)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}))
    with pytest.raises(CheckpointError, match="shard files missing"):
        open_source(shards)
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "../x.bin"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        open_source(shards)


@pytest.mark.parametrize("shards", [1, 2])
def test_extract_detects_the_official_co_permutation_from_bin_output(base_dir, tmp_path, shards):
    """The official S2FT pipeline end to end: co-permute, train blocks, fuse, torch.save; then
    ``s2reg extract --detect-permutation`` gives an adapter in original coordinates whose merge into
    BASE is bit-exact against the un-permuted fine-tuned tensors and keeps the fine-tuned logits."""
    model = zoo.load(LLAMA_MHA, base_dir)
    config = model.config
    orders = {layer: official_s2ft.layer_order(sel, config.num_attention_heads, config.intermediate_size)
              for layer, sel in SELECTION.items()}
    official_s2ft.co_permute(model, orders)
    inputs = zoo.example_inputs(LLAMA_MHA)["input_ids"]
    official_s2ft.train_and_fuse(model, orders, inputs)
    tuned_dir = official_s2ft.save_official(model, tmp_path / "tuned", shards=shards)
    with torch.no_grad():
        tuned_logits = model(input_ids=inputs).logits

    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(base_dir), str(tuned_dir), "--detect-permutation",
                                  "-o", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["merge", str(base_dir), str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output

    state = {k: v for f in sorted(tuned_dir.glob("*.bin")) for k, v in torch.load(f, weights_only=True).items()}
    with CheckpointSource(tmp_path / "merged") as merged, CheckpointSource(base_dir) as base:
        assert merged.names() == base.names()
        changed = 0
        for name in base.names():
            expected = official_s2ft.to_original(name, state[name], orders, config)
            assert _same_bytes(merged.get(name), expected), name
            changed += not _same_bytes(base.get(name), expected)
    assert changed == 6  # v, o, up, down of layer 0; v, down of layer 1
    reloaded = zoo.load(LLAMA_MHA, tmp_path / "merged")
    with torch.no_grad():
        logits = reloaded(input_ids=inputs).logits
    torch.testing.assert_close(logits, tuned_logits, rtol=1e-5, atol=1e-5)
