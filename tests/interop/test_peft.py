"""Interop with PEFT: exported LoRA loads in PeftModel and equals s2reg's merge; FourierFT imports exactly."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.cli import main
from s2reg.errors import S2RegError
from s2reg.interop import export_lora, import_lora
from s2reg.tensors import CheckpointSource

from ..surgery.helpers import logits, model_of, pisa, s2ft, tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("interop") / "base", dtype=torch.float32)


def test_s2ft_exports_to_a_lora_that_peft_merges_to_the_same_weights(base, tmp_path):
    from peft import PeftModel

    adapter = s2ft(base, heads=(1,), channels=(3, 60))
    adapter.save(tmp_path / "a")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "a"), "--to", "peft-lora", "-o", str(tmp_path / "lora"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_relative_error"] == 0.0
    peft_model = PeftModel.from_pretrained(model_of(base, torch.float32), tmp_path / "lora")
    merged = peft_model.merge_and_unload()
    s2reg.merge(base, [adapter], tmp_path / "merged")
    ours = model_of(tmp_path / "merged", torch.float32)
    theirs = merged.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    assert torch.equal(logits(merged), logits(ours))


def test_lora_round_trip_and_refusal_of_a_general_lora(base, tmp_path):
    adapter = s2ft(base, heads=(0,), channels=(5, 6, 7))
    export_lora(adapter, tmp_path / "lora")
    with CheckpointSource(base) as source:
        back = import_lora(tmp_path / "lora", source)
        for name, target in adapter.targets.items():
            assert torch.equal(back.targets[name].indices.long(), target.indices.long())
            assert torch.equal(back.targets[name].merged(source.get(name)), target.merged(source.get(name)))
    from peft import LoraConfig, get_peft_model

    general = get_peft_model(model_of(base, torch.float32), LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False))
    general.save_pretrained(tmp_path / "general")
    with CheckpointSource(base) as source, pytest.raises(S2RegError, match="not one-hot"):
        import_lora(tmp_path / "general", source)


def test_pisa_exports_through_svd_with_its_error(base, tmp_path):
    adapter = pisa(base, k=3, roles=("down",))
    full = export_lora(adapter, tmp_path / "full", rank=64)
    low = export_lora(adapter, tmp_path / "low", rank=2)
    assert full["max_relative_error"] < 1e-5 < low["max_relative_error"] < 1.0
    with pytest.raises(S2RegError, match="--rank"):
        export_lora(adapter, tmp_path / "none")


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
            ours = target.merged(source.get(name))
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
