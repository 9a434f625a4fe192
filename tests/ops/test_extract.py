"""``extract``: exact S2FT recovery from two checkpoints, and PISA top-K per block."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.format.arrays import to_torch
from s2reg.arch import resolve_source
from s2reg.cli import main
from s2reg.errors import ShapeError
from s2reg.format.pisa_fft import pisa_top_k
from s2reg.ops.extract import ExtractRefused, extract_pisa, extract_s2ft
from s2reg.synth import build_checkpoint
from s2reg.tensors import CheckpointSource, save_state_dict


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("base") / "llama", "llama", dtype=torch.bfloat16,
                            max_shard_bytes=40_000)


def llama_name(role, layer):
    return {"q": "model.layers.{}.self_attn.q_proj.weight", "v": "model.layers.{}.self_attn.v_proj.weight",
            "o": "model.layers.{}.self_attn.o_proj.weight", "up": "model.layers.{}.mlp.up_proj.weight",
            "down": "model.layers.{}.mlp.down_proj.weight"}[role].format(layer)


def tuned_copy(base_dir, out, edit):
    """A copy of the base checkpoint with ``edit(name, tensor)`` applied to every tensor."""
    with CheckpointSource(base_dir) as source:
        tensors = {n: edit(n, source.get(n).clone()) for n in source.names()}
    return save_state_dict(out, tensors, extra_files={"config.json": (base_dir / "config.json").read_bytes()})


def s2ft_edit(name, t):
    g = torch.Generator().manual_seed(hash(name) % 1000)
    if name == llama_name("q", 1):
        t[20:23] += torch.randn(3, t.shape[1], generator=g).to(t.dtype) * 0.05  # part of head 1
    if name == llama_name("down", 0):
        t[:, [3, 70]] += torch.randn(t.shape[0], 2, generator=g).to(t.dtype) * 0.05
    return t


def test_s2ft_extract_reproduces_tuned_bit_for_bit(base_dir, tmp_path):
    tuned_dir = tuned_copy(base_dir, tmp_path / "tuned", s2ft_edit)
    with CheckpointSource(base_dir) as base, CheckpointSource(tuned_dir) as tuned:
        result = extract_s2ft(base, tuned, base_name="tiny")
        adapter, report = result.adapter, result.report
        assert set(adapter.targets) == {llama_name("q", 1), llama_name("down", 0)}
        head_dim = resolve_source(base).dims.head_dim
        q = adapter.targets[llama_name("q", 1)]
        assert q.axis == "rows" and q.indices.tolist() == list(range(head_dim, 2 * head_dim))  # widened to head 1
        assert adapter.targets[llama_name("down", 0)].indices.tolist() == [3, 70]
        assert report.unchanged == len(base.names()) - 2
        adapter.save(tmp_path / "adapter")
        loaded = s2reg.load(tmp_path / "adapter")
        for name in base.names():
            merged = to_torch(loaded.targets[name].merged(base.get(name))) if name in loaded.targets else base.get(name)
            assert merged.view(torch.int16).equal(tuned.get(name).view(torch.int16)), name


def test_dense_changes_are_refused_with_a_report(base_dir, tmp_path):
    def edit(name, t):
        if name == "model.norm.weight" or name == llama_name("up", 0):
            t += 0.25
        return t

    tuned_dir = tuned_copy(base_dir, tmp_path / "tuned", edit)
    with CheckpointSource(base_dir) as base, CheckpointSource(tuned_dir) as tuned:
        with pytest.raises(ExtractRefused, match="--allow-dense") as info:
            extract_s2ft(base, tuned, base_name="tiny")
        assert {c.name for c in info.value.report.unstructured} == {"model.norm.weight", llama_name("up", 0)}
        adapter = extract_s2ft(base, tuned, base_name="tiny", allow_dense=True).adapter
        assert torch.equal(to_torch(adapter.targets["model.norm.weight"].merged(base.get("model.norm.weight"))),
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
    name = llama_name("v", 0)
    with CheckpointSource(f32) as source:
        shape = source.shape(name)
        blocks = -(-shape[0] // 16) * -(-shape[1] // 16)
        g = torch.Generator().manual_seed(7)
        idx = torch.stack([torch.randperm(16 * 9, generator=g)[:4] for _ in range(blocks)])
        values = torch.complex(torch.randn(blocks, 4, generator=g), torch.randn(blocks, 4, generator=g))
        truth = s2reg.PISAAdapter.from_coefficients(source, {name: ((16, 16), idx, values)}, base_name="t", scale=0.05)
    tuned_dir = tuned_copy(f32, tmp_path / "tuned", lambda n, t: to_torch(truth.targets[n].merged(t)) if n in truth.targets else t)
    with CheckpointSource(f32) as base, CheckpointSource(tuned_dir) as tuned:
        result = extract_pisa(base, tuned, base_name="t", budget=8, block=(16, 16))
        adapter, report = result.adapter, result.report
    assert [c.name for c in report.changes] == [name]
    assert report.changes[0].rel_error < 1e-5
    dense, expected = to_torch(adapter.to_dense(name)).double(), to_torch(truth.to_dense(name)).double()
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
        info = resolve_source(source)
        heads, channels = {0: [5], 1: [2, 3]}, {0: [10, 77, 100], 1: [4, 9]}
        perm = plan(info, heads, channels)
        g = torch.Generator().manual_seed(0)

        def official(name, t):
            t = permute_tensor(name, t, perm, info)
            c = info.coupled(name)
            if c and c.part == "weight" and c.role == "o":  # trained heads sit first after the permutation
                t[:, : 8 * len(heads[c.layer])] += torch.randn(t.shape[0], 8 * len(heads[c.layer]), generator=g) * 0.05
            if c and c.part == "weight" and c.role == "down":
                t[:, : len(channels[c.layer])] += torch.randn(t.shape[0], len(channels[c.layer]), generator=g) * 0.05
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
    down0 = adapter.targets[llama_name("down", 0)]
    assert down0.axis == "columns" and down0.indices.tolist() == [10, 77, 100]
    assert adapter.targets[llama_name("o", 1)].groups == [2, 3]
    s2reg.merge(base_dir, [adapter], tmp_path / "merged")
    import transformers

    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    theirs = transformers.LlamaForCausalLM.from_pretrained(tuned_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# -- issue 11: extract's diagnostics ------------------------------------------------------------------
def co_permuted_tuned(base_dir, out, heads, channels, *, seed=0, edit=None):
    """What the official S2FT code saves: the base co-permuted, the selected o/down slices trained."""
    from s2reg.ops.permute import permute_tensor, plan

    with CheckpointSource(base_dir) as source:
        info = resolve_source(source)
        perm = plan(info, heads, channels)
        g = torch.Generator().manual_seed(seed)
        hd = info.dims.head_dim

        def official(name, t):
            t = permute_tensor(name, t, perm, info)
            c = info.coupled(name)
            if c and c.part == "weight" and c.role == "o" and heads.get(c.layer):
                n = hd * len(heads[c.layer])
                t[:, :n] += (torch.randn(t.shape[0], n, generator=g) * 0.05).to(t.dtype)
            if c and c.part == "weight" and c.role == "down" and channels.get(c.layer):
                n = len(channels[c.layer])
                t[:, :n] += (torch.randn(t.shape[0], n, generator=g) * 0.05).to(t.dtype)
            return edit(name, t) if edit else t

        tensors = {n: official(n, source.get(n).clone()) for n in source.names()}
    return save_state_dict(out, tensors, extra_files={"config.json": (base_dir / "config.json").read_bytes()}), perm


def test_a_co_permuted_checkpoint_is_recognised_and_detect_permutation_suggested(tmp_path):
    base_dir = build_checkpoint(tmp_path / "base", "llama", dtype=torch.float32)
    tuned_dir, _ = co_permuted_tuned(base_dir, tmp_path / "tuned", {0: [3]}, {0: [10, 40], 1: [7]})
    result = CliRunner().invoke(main, ["extract", str(base_dir), str(tuned_dir), "-o", str(tmp_path / "a")])
    assert result.exit_code == 1
    assert "look like a co-permuted checkpoint" in result.output and "--detect-permutation" in result.output
    error = result.output[result.output.index("Error: "):]
    assert "--max-fraction" not in error and "--allow-dense" not in error  # they would only store it densely
    with CheckpointSource(base_dir) as base, CheckpointSource(tuned_dir) as tuned:
        with pytest.raises(ExtractRefused) as refused:
            extract_s2ft(base, tuned, base_name="b")
        assert sum(c.relocated for c in refused.value.report.changes) > 0


def test_detect_permutation_with_pisa_is_refused(base_dir, tmp_path):
    result = CliRunner().invoke(main, ["extract", str(base_dir), str(base_dir), "--kind", "pisa", "--budget", "4",
                                       "--detect-permutation", "-o", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--detect-permutation works with --kind s2ft only" in result.output
    assert not (tmp_path / "a").exists()


def test_a_gqa_selection_of_two_of_three_kv_groups_needs_no_max_fraction(tmp_path):
    base_dir = build_checkpoint(tmp_path / "base", "llama", dtype=torch.bfloat16, num_attention_heads=6,
                                num_key_value_heads=3, head_dim=8, hidden_size=48)
    g = torch.Generator().manual_seed(0)

    def edit(name, t):
        if name == "model.layers.0.self_attn.v_proj.weight":  # kv groups 0 and 2
            t[list(range(0, 8)) + list(range(16, 24))] += (torch.randn(16, t.shape[1], generator=g) * 0.05).to(t.dtype)
        if name == "model.layers.0.self_attn.o_proj.weight":  # their query heads 0, 1, 4, 5
            cols = [c for h in (0, 1, 4, 5) for c in range(8 * h, 8 * h + 8)]
            t[:, cols] += (torch.randn(t.shape[0], len(cols), generator=g) * 0.05).to(t.dtype)
        return t

    tuned_dir = tuned_copy(base_dir, tmp_path / "tuned", edit)
    with CheckpointSource(base_dir) as base, CheckpointSource(tuned_dir) as tuned:
        adapter = extract_s2ft(base, tuned, base_name="b").adapter
        assert adapter.targets["model.layers.0.self_attn.v_proj.weight"].groups == [0, 2]
        assert adapter.targets["model.layers.0.self_attn.o_proj.weight"].groups == [0, 1, 4, 5]
        with pytest.raises(ExtractRefused, match=r"--max-fraction 0\.67 admits the head/channel selections"):
            extract_s2ft(base, tuned, base_name="b", max_fraction=0.3)


def test_a_different_dtype_is_named_as_the_cause(tmp_path):
    base_dir = build_checkpoint(tmp_path / "base", "llama", dtype=torch.bfloat16)
    tuned_dir, _ = co_permuted_tuned(base_dir, tmp_path / "tuned", {0: [3]}, {0: [10]},
                                     edit=lambda n, t: t.to(torch.float32))
    for flags in ([], ["--detect-permutation"]):
        result = CliRunner().invoke(main, ["extract", str(base_dir), str(tuned_dir), *flags, "-o", str(tmp_path / "a")])
        assert result.exit_code == 1
        assert "the tuned checkpoint has a different dtype than the base" in result.output
        assert "too many" not in result.output


def test_identical_dead_channels_are_a_harmless_tie(tmp_path):
    base_dir = build_checkpoint(tmp_path / "base0", "llama", dtype=torch.float32)
    with CheckpointSource(base_dir) as source:
        tensors = {n: source.get(n).clone() for n in source.names()}
    for layer in range(2):  # channels 20 and 21 are dead (all zero) in gate, up and down
        for kind in ("gate_proj", "up_proj"):
            tensors[f"model.layers.{layer}.mlp.{kind}.weight"][[20, 21]] = 0
        tensors[f"model.layers.{layer}.mlp.down_proj.weight"][:, [20, 21]] = 0
    base_dir = save_state_dict(tmp_path / "base", tensors, extra_files={"config.json": (base_dir / "config.json").read_bytes()})
    # the selection moves both dead channels (they end up at other positions than 20, 21)
    tuned_dir, _ = co_permuted_tuned(base_dir, tmp_path / "tuned", {}, {0: [3, 20, 21, 50], 1: [0, 21]})
    result = CliRunner().invoke(main, ["extract", str(base_dir), str(tuned_dir), "--detect-permutation", "-o",
                                       str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    adapter = s2reg.load(tmp_path / "a")
    assert all("down_proj" in name for name in adapter.targets)  # the tie moved no gate/up row
    s2reg.merge(base_dir, [adapter], tmp_path / "merged")
    import transformers

    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    theirs = transformers.LlamaForCausalLM.from_pretrained(tuned_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_noise_in_untouched_rows_is_counted_and_a_bloated_adapter_refused(tmp_path):
    base_dir = build_checkpoint(tmp_path / "base", "llama", dtype=torch.bfloat16)

    def edit(name, t):
        if name == "model.layers.0.mlp.down_proj.weight":
            t[:, [5]] += 0.25  # the trained selection: one channel
        if ("self_attn" in name or "mlp" in name) and "down" not in name:  # one ulp in every other row: a round trip
            bits = t.view(torch.int16)
            bits[::2] += 1
        return t

    tuned_dir = tuned_copy(base_dir, tmp_path / "tuned", edit)
    result = CliRunner().invoke(main, ["extract", str(base_dir), str(tuned_dir), "--allow-dense", "-o", str(tmp_path / "a")])
    assert result.exit_code == 1 and "--allow-noise" in result.output and "rounding noise" in result.output
    assert not (tmp_path / "a").exists()
    with CheckpointSource(base_dir) as base, CheckpointSource(tuned_dir) as tuned:
        result = extract_s2ft(base, tuned, base_name="b", allow_dense=True, allow_noise=True)
        down = next(c for c in result.report.changes if c.name == "model.layers.0.mlp.down_proj.weight")
        q = next(c for c in result.report.changes if c.name == "model.layers.0.self_attn.q_proj.weight")
        rows = base.shape("model.layers.0.self_attn.q_proj.weight")[0]
        assert q.noise == q.count == rows // 2 and down.noise == down.count - 1
        assert any("rounding noise" in w for w in result.report.warnings)
    written = CliRunner().invoke(main, ["extract", str(base_dir), str(tuned_dir), "--allow-dense", "--allow-noise",
                                        "-o", str(tmp_path / "b")])
    assert written.exit_code == 0 and "warning" in written.output and "rounding noise" in written.output


def test_without_a_config_extract_names_a_flag_it_has(base_dir, tmp_path):
    with CheckpointSource(base_dir) as source:
        tensors = {n: source.get(n).clone() for n in source.names()}
    bare = save_state_dict(tmp_path / "bare", tensors)
    tensors["model.layers.0.self_attn.q_proj.weight"][3] += 1
    tuned = save_state_dict(tmp_path / "tuned", tensors)
    result = CliRunner().invoke(main, ["extract", str(bare), str(tuned), "-o", str(tmp_path / "a")])
    assert result.exit_code == 1 and "--allow-dense" in result.output and "--targets" not in result.output
    assert "no config.json" in result.output


def test_widened_heads_are_not_counted_as_noise(base_dir, tmp_path):
    tuned_dir = tuned_copy(base_dir, tmp_path / "tuned", s2ft_edit)
    with CheckpointSource(base_dir) as base, CheckpointSource(tuned_dir) as tuned:
        result = extract_s2ft(base, tuned, base_name="tiny")
    assert all(c.noise == 0 for c in result.report.changes) and not result.report.warnings


def test_detect_permutation_against_a_different_model_names_the_missing_tensor(base_dir, tmp_path):
    with CheckpointSource(base_dir) as source:
        tensors = {n: source.get(n) for n in source.names() if "layers.1.mlp.up_proj" not in n}
    other = save_state_dict(tmp_path / "other", tensors, extra_files={"config.json": (base_dir / "config.json").read_bytes()})
    result = CliRunner().invoke(main, ["extract", str(base_dir), str(other), "--detect-permutation", "-o", str(tmp_path / "a")])
    assert result.exit_code == 1 and "the tuned checkpoint has no tensor 'model.layers.1.mlp.up_proj.weight'" in result.output


def test_s2ft_extract_on_a_base_with_negative_zeros_is_exact(tmp_path):
    """FORMAT §4.3 restore lists: -0.0 in the changed slices (as in GGUF-dequantised checkpoints) no longer refuses."""
    base_dir = build_checkpoint(tmp_path / "base", "llama", dtype=torch.bfloat16, negative_zeros=0.05)
    down = "model.layers.0.mlp.down_proj.weight"

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
