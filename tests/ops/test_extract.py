"""``extract``: exact S2FT recovery from two checkpoints, and PISA top-K per block."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.arch import LLAMA, detect
from s2reg.cli import main
from s2reg.errors import ShapeError
from s2reg.ops.extract import ExtractRefused, extract_pisa, extract_s2ft, pisa_top_k
from s2reg.synth import build_checkpoint
from s2reg.tensors import CheckpointSource, save_state_dict


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("base") / "llama", "llama", dtype=torch.bfloat16,
                            max_shard_bytes=40_000)


def tuned_copy(base_dir, out, edit):
    """A copy of the base checkpoint with ``edit(name, tensor)`` applied to every tensor."""
    with CheckpointSource(base_dir) as source:
        tensors = {n: edit(n, source.get(n).clone()) for n in source.names()}
    return save_state_dict(out, tensors, extra_files={"config.json": (base_dir / "config.json").read_bytes()})


def s2ft_edit(name, t):
    g = torch.Generator().manual_seed(hash(name) % 1000)
    if name == LLAMA.tensor("q", 1):
        t[20:23] += torch.randn(3, t.shape[1], generator=g).to(t.dtype) * 0.05  # part of head 1
    if name == LLAMA.tensor("down", 0):
        t[:, [3, 70]] += torch.randn(t.shape[0], 2, generator=g).to(t.dtype) * 0.05
    return t


def test_s2ft_extract_reproduces_tuned_bit_for_bit(base_dir, tmp_path):
    tuned_dir = tuned_copy(base_dir, tmp_path / "tuned", s2ft_edit)
    with CheckpointSource(base_dir) as base, CheckpointSource(tuned_dir) as tuned:
        adapter, report = extract_s2ft(base, tuned, base_name="tiny")
        assert set(adapter.targets) == {LLAMA.tensor("q", 1), LLAMA.tensor("down", 0)}
        head_dim = detect(base.config()).dims.head_dim
        q = adapter.targets[LLAMA.tensor("q", 1)]
        assert q.axis == "rows" and q.indices.tolist() == list(range(head_dim, 2 * head_dim))  # widened to head 1
        assert adapter.targets[LLAMA.tensor("down", 0)].indices.tolist() == [3, 70]
        assert report.unchanged == len(base.names()) - 2
        adapter.save(tmp_path / "adapter")
        loaded = s2reg.load(tmp_path / "adapter")
        for name in base.names():
            merged = loaded.targets[name].merged(base.get(name)) if name in loaded.targets else base.get(name)
            assert merged.view(torch.int16).equal(tuned.get(name).view(torch.int16)), name


def test_dense_changes_are_refused_with_a_report(base_dir, tmp_path):
    def edit(name, t):
        if name == "model.norm.weight" or name == LLAMA.tensor("up", 0):
            t += 0.25
        return t

    tuned_dir = tuned_copy(base_dir, tmp_path / "tuned", edit)
    with CheckpointSource(base_dir) as base, CheckpointSource(tuned_dir) as tuned:
        with pytest.raises(ExtractRefused, match="--allow-dense") as info:
            extract_s2ft(base, tuned, base_name="tiny")
        assert {c.name for c in info.value.report.unstructured} == {"model.norm.weight", LLAMA.tensor("up", 0)}
        adapter, _ = extract_s2ft(base, tuned, base_name="tiny", allow_dense=True)
        assert torch.equal(adapter.targets["model.norm.weight"].merged(base.get("model.norm.weight")),
                           tuned.get("model.norm.weight"))
    result = CliRunner().invoke(main, ["extract", str(base_dir), str(tuned_dir), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Error: " in result.output and "--allow-dense" in result.output
    assert not (tmp_path / "out").exists()


def test_extract_refuses_different_shapes(base_dir, tmp_path):
    other = build_checkpoint(tmp_path / "other", "llama", dtype=torch.bfloat16, hidden_size=32)
    with CheckpointSource(base_dir) as base, CheckpointSource(other) as tuned:
        with pytest.raises(ShapeError, match="same shapes"):
            extract_s2ft(base, tuned, base_name="tiny")


def numpy_top_k_error(delta: np.ndarray, block: int, k: int) -> float:
    """Independent float64 reference: per block keep the k largest-energy conjugate classes of fft2."""
    rows, cols = delta.shape
    padded = np.zeros((-(-rows // block) * block, -(-cols // block) * block))
    padded[:rows, :cols] = delta
    rebuilt = np.zeros_like(padded)
    for r in range(0, padded.shape[0], block):
        for c in range(0, padded.shape[1], block):
            spectrum = np.fft.fft2(padded[r:r + block, c:c + block])
            classes = {}
            for u in range(block):
                for v in range(block):
                    key = min((u, v), ((-u) % block, (-v) % block))
                    classes.setdefault(key, []).append((u, v))
            energy = {key: sum(abs(spectrum[p]) ** 2 for p in members) for key, members in classes.items()}
            keep = sorted(energy, key=energy.get, reverse=True)[:k]
            sparse = np.zeros_like(spectrum)
            for key in keep:
                for p in classes[key]:
                    sparse[p] = spectrum[p]
            rebuilt[r:r + block, c:c + block] = np.fft.ifft2(sparse).real
    return float(np.linalg.norm(delta - rebuilt[:rows, :cols]) / np.linalg.norm(delta))


@pytest.mark.parametrize("k", [1, 5, 12])
def test_pisa_top_k_matches_a_float64_reference(k):
    delta = torch.randn(24, 20, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    indices, values = pisa_top_k(delta, (8, 8), k)
    from s2reg.format.pisa import reconstruct

    rebuilt = reconstruct((24, 20), (8, 8), indices, values.to(torch.complex128), 1.0).double()
    ours = float((delta - rebuilt).norm() / delta.norm())
    assert ours == pytest.approx(numpy_top_k_error(delta.numpy(), 8, k), rel=1e-4)


def test_pisa_extract_recovers_a_sparse_spectrum(base_dir, tmp_path):
    f32 = build_checkpoint(tmp_path / "f32", "llama", dtype=torch.float32)
    name = LLAMA.tensor("v", 0)
    with CheckpointSource(f32) as source:
        shape = source.shape(name)
        blocks = -(-shape[0] // 16) * -(-shape[1] // 16)
        g = torch.Generator().manual_seed(7)
        idx = torch.stack([torch.randperm(16 * 9, generator=g)[:4] for _ in range(blocks)])
        values = torch.complex(torch.randn(blocks, 4, generator=g), torch.randn(blocks, 4, generator=g))
        truth = s2reg.PISAAdapter.from_coefficients(source, {name: ((16, 16), idx, values)}, base_name="t", scale=0.05)
    tuned_dir = tuned_copy(f32, tmp_path / "tuned", lambda n, t: truth.targets[n].merged(t) if n in truth.targets else t)
    with CheckpointSource(f32) as base, CheckpointSource(tuned_dir) as tuned:
        adapter, report = extract_pisa(base, tuned, base_name="t", budget=8, block=(16, 16))
    assert [c.name for c in report.changes] == [name]
    assert report.changes[0].rel_error < 1e-5
    dense, expected = adapter.to_dense(name).double(), truth.to_dense(name).double()
    assert float((dense - expected).norm() / expected.norm()) < 1e-5


def test_cli_extract_json(base_dir, tmp_path):
    tuned_dir = tuned_copy(base_dir, tmp_path / "tuned", s2ft_edit)
    out = tmp_path / "adapter"
    result = CliRunner().invoke(main, ["extract", str(base_dir), str(tuned_dir), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "s2ft" and data["output"] == str(out)
    assert s2reg.load(out).num_params == sum(c["stored"] for c in data["changes"])
    again = CliRunner().invoke(main, ["extract", str(base_dir), str(tuned_dir), "-o", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_extract_undoes_an_official_s2ft_co_permutation(tmp_path):
    """The official S2FT code trains in a co-permuted layout and saves the whole permuted model."""
    from s2reg.ops.permute import permute_tensor, plan

    base_dir = build_checkpoint(tmp_path / "base", "llama", dtype=torch.float32, num_attention_heads=8,
                                num_key_value_heads=4, head_dim=8)
    with CheckpointSource(base_dir) as source:
        info = detect(source.config())
        heads, channels = {0: [5], 1: [2, 3]}, {0: [10, 77, 100], 1: [4, 9]}
        perm = plan(info.dims, heads, channels)
        g = torch.Generator().manual_seed(0)

        def official(name, t):
            t = permute_tensor(name, t, perm, info.arch, info.dims)
            found = info.arch.role_of(name)
            if found and found[0] == "o":  # trained heads sit first after the permutation
                t[:, : 8 * len(heads[found[1]])] += torch.randn(t.shape[0], 8 * len(heads[found[1]]), generator=g) * 0.05
            if found and found[0] == "down":
                t[:, : len(channels[found[1]])] += torch.randn(t.shape[0], len(channels[found[1]]), generator=g) * 0.05
            return t

        tensors = {n: official(n, source.get(n).clone()) for n in source.names()}
    tuned_dir = save_state_dict(tmp_path / "tuned", tensors, extra_files={"config.json": (base_dir / "config.json").read_bytes()})
    with CheckpointSource(base_dir) as base, CheckpointSource(tuned_dir) as tuned:
        with pytest.raises(ExtractRefused):
            extract_s2ft(base, tuned, base_name="b")  # a naive diff is dense
    result = CliRunner().invoke(main, ["extract", str(base_dir), str(tuned_dir), "--detect-permutation", "-o",
                                       str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    adapter = s2reg.load(tmp_path / "adapter")
    down0 = adapter.targets[LLAMA.tensor("down", 0)]
    assert down0.axis == "columns" and down0.indices.tolist() == [10, 77, 100]
    assert adapter.targets[LLAMA.tensor("o", 1)].groups == [2, 3]
    s2reg.merge(base_dir, [adapter], tmp_path / "merged")
    import transformers

    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    theirs = transformers.LlamaForCausalLM.from_pretrained(tuned_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_s2ft_extract_on_a_base_with_negative_zeros_is_exact(tmp_path):
    """FORMAT §4.3 restore lists: -0.0 in the changed slices (as in GGUF-dequantised checkpoints) no longer refuses."""
    base_dir = build_checkpoint(tmp_path / "base", "llama", dtype=torch.bfloat16, negative_zeros=0.05)
    down = LLAMA.tensor("down", 0)

    def edit(name, t):
        if name == down:
            column = t[:, 3]
            zeros = (column.view(torch.int16) == -32768).nonzero().reshape(-1)
            assert zeros.numel() >= 2
            t[zeros[0], 3] = 0.5  # -0.0 -> 0.5: unmerge by arithmetic alone would give +0.0
            t[zeros[1], 3] = 0.0  # -0.0 -> +0.0
            t[0, 70] = -0.0 if float(t[0, 70]) != 0 else 0.25
        return t

    tuned_dir = tuned_copy(base_dir, tmp_path / "tuned", edit)
    result = CliRunner().invoke(main, ["extract", str(base_dir), str(tuned_dir), "--kind", "s2ft", "-o",
                                       str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    adapter = s2reg.load(tmp_path / "a")
    assert adapter.targets[down].restore is not None
    s2reg.merge(base_dir, [adapter], tmp_path / "merged")
    with CheckpointSource(tuned_dir) as tuned, CheckpointSource(tmp_path / "merged") as merged:
        assert {n: merged.sha256_of(n) for n in merged.names()} == {n: tuned.sha256_of(n) for n in tuned.names()}
    s2reg.unmerge(tmp_path / "merged", [adapter], tmp_path / "back")
    with CheckpointSource(base_dir) as base, CheckpointSource(tmp_path / "back") as back:
        assert {n: back.sha256_of(n) for n in back.names()} == {n: base.sha256_of(n) for n in base.names()}
