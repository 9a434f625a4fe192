"""Exports that are true on another machine: the base is named by a Hub id or a directory's name, never a local
path (trained manifest, exported PEFT config, GGUF, Hub model card), and a checkpoint whose config.json has
no ``architectures`` (converted from GGUF) exports as ``s2reg train`` reads it (by ``model_type``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from s2reg import S2FTAdapter
from s2reg.basename import default_base_name, is_hub_id, portable_base_name
from s2reg.cli import main
from s2reg.registry.modelcard import model_card
from s2reg.tensors import CheckpointSource
from s2reg.train import S2FTConfig, export_adapter, prepare_s2ft

from ..families import zoo
from ..surgery.helpers import s2ft, tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("portable") / "base", dtype=torch.float32)


def test_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "base").mkdir(parents=True)
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_hub_id("runs/base")  # the same shape, but a directory here
    assert not is_hub_id("/abs/olute/base") and not is_hub_id("base") and not is_hub_id(None)
    assert portable_base_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_base_name("/abs/olute/base/") == "base" == portable_base_name("runs/base")
    assert default_base_name("org/model", tmp_path / "ckpt") == "org/model"
    assert default_base_name(str(tmp_path / "ckpt"), tmp_path / "ckpt") == "ckpt"
    assert default_base_name(None, None) == "unknown-base"


def _trained(directory, config_name: str | None = None):
    """A model loaded from ``directory`` (as train loads it), prepared and exported against the checkpoint."""
    import transformers

    if config_name is not None:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, "_name_or_path": config_name}))
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    prepare_s2ft(model, S2FTConfig(channels=2, heads=1, roles=("q", "down"), seed=0))
    with CheckpointSource(directory) as source:
        return export_adapter(model, base=source)


def test_training_records_the_directory_name_or_the_hub_id(tmp_path):
    directory = tiny(tmp_path / "my-base", dtype=torch.float32)
    assert _trained(directory).base.name == "my-base"  # transformers saw the absolute path
    assert _trained(directory, config_name="org/my-base").base.name == "org/my-base"
    assert _trained(directory, config_name=str(tmp_path / "elsewhere")).base.name == "my-base"


def test_export_names_the_base_portably_and_still_reads_its_layout(tmp_path):
    """An adapter recorded with an absolute path: the PEFT config names the directory; the task type still comes
    from that checkpoint's config (a bare BERT encoder is FEATURE_EXTRACTION, not the CAUSAL_LM guessed without it)."""
    directory = zoo.build("bert_model", tmp_path / "bert-base")
    with CheckpointSource(directory) as source:
        name = next(n for n in source.names() if n.endswith("attention.self.query.weight"))
        adapter = S2FTAdapter.from_slices(
            source, {name: ("rows", [0, 5], torch.ones(2, source.shape(name)[1]) * 0.01)}, base_name=str(directory))
    adapter.save(tmp_path / "a")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "a"), "-o", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "bert-base"
    assert config["task_type"] == "FEATURE_EXTRACTION"


def test_a_hub_id_is_kept(base, tmp_path):
    adapter = s2ft(base)
    adapter.base = dataclasses.replace(adapter.base, name="HuggingFaceTB/SmolLM2-135M")
    adapter.save(tmp_path / "a")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "a"), "-o", str(tmp_path / "lora"), "--base", str(base)])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"


def test_model_card_links_only_a_hub_base(base):
    adapter = s2ft(base)
    adapter.base = dataclasses.replace(adapter.base, name="HuggingFaceTB/SmolLM2-135M")
    card = model_card(adapter, "math:v1")
    assert "\nbase_model: HuggingFaceTB/SmolLM2-135M\nbase_model_relation: adapter\n" in card
    adapter.base = dataclasses.replace(adapter.base, name=str(base))
    card = model_card(adapter, "math:v1")
    assert "base_model" not in card and str(base) not in card and "adapter for `base`" in card


@pytest.mark.parametrize("to", ["peft-lora", "gguf-lora"])
def test_export_of_a_checkpoint_without_architectures(base, tmp_path, to):
    """As a GGUF-converted checkpoint: config.json has model_type but no architectures."""
    import shutil

    stripped = tmp_path / "stripped"
    shutil.copytree(base, stripped)
    config = json.loads((stripped / "config.json").read_text())
    del config["architectures"]
    (stripped / "config.json").write_text(json.dumps(config))
    s2ft(stripped).save(tmp_path / "a")
    output = tmp_path / ("lora" if to == "peft-lora" else "a.gguf")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "a"), "--to", to, "-o", str(output), "--base", str(stripped),
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    if to == "peft-lora":
        assert report["task_type"] == "CAUSAL_LM"  # the class train loads it with: AutoModelForCausalLM
    else:
        assert report["architecture"] == "llama"
