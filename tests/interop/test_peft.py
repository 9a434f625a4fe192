"""Interop with PEFT: exported LoRA loads in PeftModel and equals s2reg's merge; FourierFT imports exactly."""

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
from s2reg.errors import S2RegError
from s2reg.interop import export_lora, import_lora
from s2reg.tensors import CheckpointSource

from ..surgery.helpers import logits, model_of, pisa, s2ft, signed_zero_changes, tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("interop") / "base", dtype=torch.float32)


def test_s2ft_exports_to_a_lora_that_peft_merges_to_the_same_weights(base, tmp_path):
    from peft import PeftModel

    adapter = s2ft(base, heads=(1,), channels=(3, 60))
    adapter.save(tmp_path / "a")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "a"), "--to", "peft-lora", "-o", str(tmp_path / "lora"), "--json"])
    assert result.exit_code == 0, result.output
    error = json.loads(result.stdout)["max_relative_error"]
    # Snapped fp32 changes larger than the weights need F64 deltas, rounded to the LoRA's F32 factors (the
    # reported error); here PEFT's float32 merge rounds them back to s2reg's weights all the same.
    assert {t.delta.dtype for t in adapter.targets.values()} == {np.dtype(np.float64)}
    assert 0 < error < 1e-7
    peft_model = PeftModel.from_pretrained(model_of(base, torch.float32), tmp_path / "lora")
    merged = peft_model.merge_and_unload()
    s2reg.merge(base, [adapter], tmp_path / "merged")
    ours = model_of(tmp_path / "merged", torch.float32)
    theirs = merged.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    assert torch.equal(logits(merged), logits(ours))


def _f64_adapter(base):
    """An fp32 adapter whose changes span many binades, so its exact differences need F64 (FORMAT §4.3)."""
    with CheckpointSource(base) as source:
        info = resolve_source(source)
        g = torch.Generator().manual_seed(0)
        slices = {}
        for layer in range(info.dims.layers):
            for role, axis, idx in (("q", "rows", list(range(16, 32))), ("down", "columns", [3, 4, 40]), ("v", "rows", [5])):
                (name,) = info.tensors(role, layer)
                part = source.get(name).index_select(0 if axis == "rows" else 1, torch.tensor(idx)).double()
                scale = torch.exp2(torch.randint(-12, 3, part.shape, generator=g).double())
                slices[name] = (axis, idx, (part + torch.randn(part.shape, generator=g, dtype=torch.float64) * 0.02 * scale).float())
        return s2reg.S2FTAdapter.from_tuned(source, slices, base_name="tiny")


def test_f64_deltas_export_with_their_true_error_measured_by_peft(base, tmp_path):
    """An fp32 adapter with F64 deltas: the LoRA's F32 factors round them; export reports exactly PEFT's error."""
    from peft import PeftModel

    adapter = _f64_adapter(base)
    assert {t.delta.dtype for t in adapter.targets.values()} == {np.dtype(np.float64)}
    adapter.save(tmp_path / "a")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "a"), "-o", str(tmp_path / "lora"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    peft_model = PeftModel.from_pretrained(model_of(base, torch.float32), tmp_path / "lora")
    modules = dict(peft_model.named_modules())
    measured = {}
    for name, target in adapter.targets.items():
        layer = next(m for key, m in modules.items() if key.endswith(name.removesuffix(".weight")) and hasattr(m, "lora_A"))
        theirs = layer.get_delta_weight("default").double()  # PEFT's own delta, from the files as PEFT loads them
        true = to_torch(target.to_dense()).double()
        measured[name] = float((theirs - true).norm() / true.norm())
    assert report["relative_error"] == pytest.approx(measured, rel=1e-9, abs=0)
    assert 0 < report["max_relative_error"] == pytest.approx(max(measured.values()), rel=1e-9)
    # PEFT merges W + delta in float32: the merged weights are s2reg's up to that rounding and no more.
    merged = peft_model.merge_and_unload().state_dict()
    s2reg.merge(base, [adapter], tmp_path / "merged")
    ours = model_of(tmp_path / "merged", torch.float32).state_dict()
    with CheckpointSource(base) as source:
        for name, target in adapter.targets.items():
            stored = to_torch(target.to_dense()).to(torch.float32)
            assert torch.equal(merged[name], source.get(name) + stored), name  # PEFT's arithmetic, emulated
            assert not torch.equal(merged[name], ours[name])  # and so it differs from the exact merge


def test_signed_zero_changes_export_exactly_and_peft_merges_the_same_values(tmp_path):
    """A bf16 adapter with restore lists (FORMAT §4.3): its deltas hold the value changes, so the LoRA is exact."""
    from peft import PeftModel

    zeros = tiny(tmp_path / "base", negative_zeros=0.05)
    with CheckpointSource(zeros) as source:
        slices, expected = signed_zero_changes(source)
        adapter = s2reg.S2FTAdapter.from_tuned(source, slices, base_name="tiny")
    assert all(t.restore is not None for t in adapter.targets.values())
    report = export_lora(adapter, tmp_path / "lora")
    assert report.max_relative_error == 0.0
    merged = PeftModel.from_pretrained(model_of(zeros), tmp_path / "lora").merge_and_unload().state_dict()
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name  # equal values; only the signs of some zeros may differ


def test_lora_round_trip_and_refusal_of_a_general_lora(base, tmp_path):
    adapter = s2ft(base, heads=(0,), channels=(5, 6, 7))
    export_lora(adapter, tmp_path / "lora")
    with CheckpointSource(base) as source:
        back = import_lora(tmp_path / "lora", source)
        for name, target in adapter.targets.items():
            assert back.targets[name].indices.tolist() == target.indices.tolist()
            assert torch.equal(to_torch(back.targets[name].merged(source.get(name))), to_torch(target.merged(source.get(name))))
    from peft import LoraConfig, get_peft_model

    general = get_peft_model(model_of(base, torch.float32), LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False))
    general.save_pretrained(tmp_path / "general")
    with CheckpointSource(base) as source, pytest.raises(S2RegError, match="not one-hot"):
        import_lora(tmp_path / "general", source)


def test_pisa_exports_through_svd_with_its_error(base, tmp_path):
    adapter = pisa(base, k=3, roles=("down",))
    full = export_lora(adapter, tmp_path / "full", rank=64)
    low = export_lora(adapter, tmp_path / "low", rank=2, max_error=1.0)
    assert full.max_relative_error < 1e-5 < low.max_relative_error < 1.0
    with pytest.raises(S2RegError, match="over the tolerance 0.001; rank"):  # more tests: test_export_lowrank.py
        export_lora(adapter, tmp_path / "none", rank=2)


def test_fourierft_imports_as_pisa_equal_to_peft_merge(base, tmp_path):
    from peft import FourierFTConfig, get_peft_model

    model = get_peft_model(model_of(base, torch.float32),
                           FourierFTConfig(n_frequency=300, scaling=150.0, random_loc_seed=7, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fourierft_spectrum" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "fourierft")
    expected = model.merge_and_unload().state_dict()
    result = CliRunner().invoke(main, ["import", str(tmp_path / "fourierft"), "--base", str(base), "-o", str(tmp_path / "pisa")])
    assert result.exit_code == 0, result.output
    adapter = s2reg.load(tmp_path / "pisa")
    assert adapter.kind == "pisa" and len(adapter.targets) == 2 * 2
    with CheckpointSource(base) as source:
        for name, target in adapter.targets.items():
            ours = to_torch(target.merged(source.get(name)))
            torch.testing.assert_close(ours, expected[name], rtol=1e-5, atol=1e-6)
            assert not torch.equal(ours, source.get(name))


def test_import_errors(base, tmp_path):
    (tmp_path / "junk").mkdir()
    result = CliRunner().invoke(main, ["import", str(tmp_path / "junk"), "--base", str(base), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "adapter_config.json" in result.output and not (tmp_path / "x").exists()


def test_import_defaults_base_to_the_local_checkpoint_the_peft_config_names(base, tmp_path, monkeypatch):
    export_lora(s2ft(base), tmp_path / "lora")
    config_file = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    run = lambda *args: CliRunner().invoke(main, ["import", *map(str, args)])  # noqa: E731
    explicit = run(tmp_path / "lora", "--base", base, "-o", tmp_path / "explicit", "--json")
    assert explicit.exit_code == 0, explicit.output
    for recorded in (str(base), base.name):  # absolute, and relative to the working directory (as PEFT resolves it)
        config_file.write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
        monkeypatch.chdir(base.parent)
        implicit = run(tmp_path / "lora", "-o", tmp_path / "implicit", "--overwrite", "--json")
        assert implicit.exit_code == 0, implicit.output
        ours, theirs = s2reg.load(tmp_path / "implicit"), s2reg.load(tmp_path / "explicit")
        assert ours.base.name == recorded and ours.base.fingerprints == theirs.base.fingerprints
        assert ours.payload_bytes() == theirs.payload_bytes()
    for recorded, why in (("HuggingFaceTB/SmolLM2-135M", "is not a local checkpoint directory"), (None, "names no base model")):
        config_file.write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
        refused = run(tmp_path / "lora", "-o", tmp_path / "none")
        assert refused.exit_code == 1 and why in refused.output and "pass --base CKPT" in refused.output, refused.output
        assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "none").exists()
